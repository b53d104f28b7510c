"""Memory: activation checkpointing for the policy, and the formula for a step's peak memory.

    checkpoint_activations   the policy recomputes each layer's activations in the backward
    step_peak_bytes          what a step of DPO or full TI-DPO needs on a GPU, term by term

    python memory.py         # docs/training.md's table: a step's GPU memory for Qwen2.5 0.5B, 1.5B, 7B

bench.py prints step_peak_bytes's figure next to the peak it measures.
"""

import torch


def checkpoint_activations(model):
    """Turn on transformers' activation checkpointing, non-reentrant, and put `model` in training
    mode (transformers checkpoints only there) with every dropout probability set to 0. Returns a
    function that turns it off again.

    Dropout at 0 keeps a training-mode forward exactly the eval-mode forward, so the attribution
    (Eq. 5-6) and the log-probs stay deterministic. Non-reentrant checkpointing lets the
    attribution's autograd.grad to the input embeddings and the loss's backward each recompute the
    layers they need from the same forward; the reentrant kind refuses torch.autograd.grad.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):  # attention dropout kept as a number
                setattr(module, name, 0.0)
    # transformers 5.24 renamed gradient_checkpointing_enable (deprecated there) to
    # activation_checkpointing_enable; both take the torch.utils.checkpoint arguments first.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    # A training forward builds no KV cache (transformers would turn it off with a warning); the
    # sampler asks for its cache explicitly.
    use_cache, model.config.use_cache = model.config.use_cache, False
    model.train()

    def undo():
        """Back to eval mode, checkpointing off, and the config's use_cache as it came (it is saved
        with the policy, and users' generate() reads it)."""
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        model.config.use_cache = use_cache
        model.eval()

    return undo


# Bytes that one decoder layer (Llama, Qwen2: RMSNorm, attention through SDPA, SwiGLU MLP) keeps
# for the backward, per token, in its hidden size h, MLP width i and key/value width kv. Counted
# from what autograd saves (torch.autograd.graph.saved_tensors_hooks, the weights left out):
#   float32:                   8 numbers of h (residual, norms, q, attention output, ...), 4 of i
#                              (gate, up, SiLU, their product), 2 of kv (k, v): 32h + 16i + 8kv
#   bfloat16 autocast (GPU):   the residual stream and the norms stay float32, the rest bfloat16:
#                              30h + 8i + 4kv (counted under the CPU's bfloat16 autocast)
# With checkpointing a layer keeps only its float32 input (4h) and recomputes the rest in the
# backward, one layer at a time.
ACTIVATION_BYTES = {"float32": (32, 16, 8), "bfloat16": (30, 8, 4)}


def step_peak_bytes(config, pairs, length, anchor_length, full_tidpo, checkpointing, gpu=True):
    """The peak memory of one training step of train.py, term by term (a dict of bytes).

    Args:
        config: the model's transformers config (vocab_size, hidden_size, intermediate_size,
            num_hidden_layers, num_attention_heads, num_key_value_heads, tie_word_embeddings).
        pairs: preference pairs per micro-batch; length: prompt + response tokens of each of
            chosen and rejected (as padded); anchor_length: prompt + sampled tokens of an anchor.
        full_tidpo: True for TI-DPO with the triplet (anchors sampled and run with gradient),
            False for DPO (TI-DPO without the triplet: the same, the attribution adds no memory
            that outlives its backward).
        checkpointing: --gradient-checkpointing.
        gpu: True for CUDA with bfloat16 autocast (float32 weights, bfloat16 activations and
            logits, the reference's Linear weights in bfloat16); False for the CPU in float32.

    The peak is at the start of the backward: every activation and the logits are still held,
    and the logits' gradient is being made. The policy's gradients are counted whole, as if all
    were already there (they fill in while the activations are freed).
    """
    h, i, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    embedding = vocab * h
    params = linear + embedding * (1 if config.tie_word_embeddings else 2) + (2 * layers + 1) * h
    element = 2 if gpu else 4  # bytes of an activation or a logit
    tokens = 2 * pairs * length + (pairs * anchor_length if full_tidpo else 0)  # with gradient
    per_h, per_i, per_kv = ACTIVATION_BYTES["bfloat16" if gpu else "float32"]
    one_layer = tokens * (per_h * h + per_i * i + per_kv * kv)
    terms = {
        "weights": 4 * params,  # float32
        "gradients": 4 * params,
        "adamw": 8 * params,  # two float32 moments
        # on CUDA a frozen copy with bfloat16 Linear weights (the output layer its own copy)
        "reference": 2 * (linear + embedding) + 4 * embedding if gpu else 4 * params,
        "activations": tokens * layers * 4 * h + one_layer if checkpointing else layers * one_layer,
        # the logits and, in the backward, their gradient; token_logps's float32 temporaries
        "logits": 2 * tokens * vocab * element + 3 * 4 * min(2 ** 24, tokens * vocab),
    }
    if gpu:
        terms["autocast copies"] = 2 * (linear + embedding)  # bfloat16 Linear weights, forward to backward
        if full_tidpo:  # the sampler's shadow (bfloat16 Linear weights) and its static KV cache
            rows = 1 << (pairs - 1).bit_length()
            terms["sampler"] = 2 * (linear + embedding) + 2 * 2 * layers * rows * (anchor_length + 64) * kv
    terms["total"] = sum(terms.values())
    return terms


# Qwen2.5's shapes (their config.json files), for the table of docs/training.md
QWEN25 = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def main(pairs=8, prompt=256, response=256, new_tokens=64):
    """Print docs/training.md's table: GiB per step on a GPU, bfloat16 autocast, AdamW."""
    from transformers import Qwen2Config

    print(f"{pairs} pairs, prompt {prompt} + response {response} tokens, anchors {prompt} + {new_tokens}; GiB")
    print("| model | loss | weights, gradients, AdamW, reference | without checkpointing | with checkpointing |")
    print("|---|---|---:|---:|---:|")
    for name, shape in QWEN25.items():
        for loss, full in (("DPO", False), ("TI-DPO", True)):
            off, on = (step_peak_bytes(Qwen2Config(**shape), pairs, prompt + response, prompt + new_tokens, full,
                                       checkpointing) for checkpointing in (False, True))
            static = off["weights"] + off["gradients"] + off["adamw"] + off["reference"]
            print(f"| {name} | {loss} | {static / 2**30:.1f} | {off['total'] / 2**30:.1f} | {on['total'] / 2**30:.1f} |")


if __name__ == "__main__":
    main()
