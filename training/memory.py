"""Memory: activation checkpointing, bounded-memory log-probs and KL, and a step's peak memory.

    checkpoint_activations   the policy recomputes each layer's activations in the backward
    linear_weights_in        a model's Linear weights stored in bfloat16 (the reference, on CUDA)
    step_peak_bytes          what a step of DPO or full TI-DPO needs on a GPU, term by term
    token_logps, sequence_kl tidpo.py's two formulas over the vocabulary, in bounded memory: the
                             backward written out, a few rows at a time, no float32 copy of the logits
    gradient_attribution     tidpo.py's Eq. 5-6, without a backward through the output layer at
                             every position

`python -m tools.memory_table` prints docs/training.md's tables from step_peak_bytes, and
tools/bench.py prints its figure next to the peak it measures.
"""

import weakref

import torch

import tidpo


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
def linear_weights_in(model, dtype):
    """Store a model's Linear weights and biases in `dtype`, as new frozen parameters (a tied
    output layer gets a copy of its own; embeddings and norms stay as they are, and so does a
    weight already in `dtype`). Returns [(the new parameter, the one it replaced)].

    Exact under autocast to `dtype`: autocast casts a Linear's float32 weight to that dtype before
    each matmul anyway, so the forward computes the same bits, without casting every weight again
    at every forward. Casting the whole model instead would not be exact: the embeddings, norms
    and residual stream, which autocast keeps in float32, would be rounded too.
    """
    replaced = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for name in ("weight", "bias"):
                source = getattr(module, name)
                if source is not None and source.dtype != dtype:
                    copied = torch.nn.Parameter(source.detach().to(dtype), requires_grad=False)
                    setattr(module, name, copied)
                    replaced.append((copied, source))
    return replaced


ACTIVATION_BYTES = {"float32": (32, 16, 8), "bfloat16": (30, 8, 4)}


def step_peak_bytes(config, pairs, length, anchor_length, full_tidpo, checkpointing, gpu=True, shards=1,
                    lora_r=0, sharded=None):
    """The peak memory of one training step of train.py on one device, term by term (bytes).

    Args:
        config: the model's transformers config (vocab_size, hidden_size, intermediate_size,
            num_hidden_layers, num_attention_heads, num_key_value_heads, tie_word_embeddings).
        pairs: preference pairs per micro-batch on this device (under torchrun, its share);
            length: prompt + response tokens of each of chosen and rejected (as padded);
            anchor_length: prompt + sampled tokens of an anchor.
        full_tidpo: True for TI-DPO with the triplet (anchors sampled and run with gradient),
            False for DPO (TI-DPO without the triplet: the same, the attribution adds no memory
            that outlives its backward).
        checkpointing: --gradient-checkpointing.
        gpu: True for CUDA with bfloat16 autocast (float32 weights, bfloat16 activations and
            logits, the reference's Linear weights in bfloat16); False for the CPU in float32.
        shards: the processes of a --fsdp run (1: not sharded, unless `sharded`). Sharded, the float32 weights,
            gradients, AdamW moments and reference are split over them; the whole model's own
            weights (embeddings, output layer, final norm) and two decoder layers' are gathered at
            a time, in bfloat16 on CUDA (FSDP's mixed precision: no autocast copies), and the
            anchors are sampled with the whole policy gathered ("sampling", a peak of its own).
            The gradients are reduce-scattered at every micro-batch (distributed.sync_unless), so
            with --grad-accum a process holds its shard of them between micro-batches, not the
            whole model's: what remains of a layer's gradient is its whole gradient before the
            reduction and the reduction's result, this process's slice, before it is added to
            the shard ("unsharded gradients"), one layer (and the root) at a time.
        sharded: whether the run is --fsdp; by default, whether shards > 1 (True for
            `torchrun --nproc_per_node=1 train.py --fsdp`, one process holding every shard).
        lora_r: --lora-r (0: full fine-tuning; not with shards). One copy of the weights, on CUDA
            with the frozen Linear weights in bfloat16 (and the output layer a bfloat16 copy, as
            the full run's reference); the adapters (A: R x in, B: out x R on q, k, v, o, gate,
            up, down) in float32 with their gradients and AdamW moments; no reference of its own.
            The activations are counted as without LoRA: the adapters' own saved tensors (R wide)
            are fewer bytes than the frozen layers no longer save (tests/test_lora.py measures it).

    The peak is at the start of the backward: every activation and the logits are still held,
    and the logits' gradient is being made. The policy's gradients are counted whole, as if all
    were already there (they fill in while the activations are freed). "total" is the larger of
    that peak and, sharded, the sampling's.
    """
    h, i, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * i  # one decoder layer's Linear weights: q, o; k, v; gate, up, down
    linear = layers * layer
    embedding = vocab * h
    root = embedding * (1 if config.tie_word_embeddings else 2) + h  # the whole model's own weights
    params = linear + root + 2 * layers * h
    element = 2 if gpu else 4  # bytes of an activation or a logit (and of a gathered weight, sharded)
    tokens = 2 * pairs * length + (pairs * anchor_length if full_tidpo else 0)  # with gradient
    per_h, per_i, per_kv = ACTIVATION_BYTES["bfloat16" if gpu else "float32"]
    one_layer = tokens * (per_h * h + per_i * i + per_kv * kv)
    rows = 1 << (pairs - 1).bit_length()  # a static sampler's batch bucket
    # the anchors' KV cache: keys in float32 (rotary embeddings compute in it), values bfloat16
    kv_cache = (4 + 2 if gpu else 8) * layers * rows * (anchor_length + 64) * kv
    # trained: every weight (sharded: this process's part), or with LoRA the adapters alone
    adapters = layers * lora_r * (9 * h + 2 * kv + 3 * i)  # A: R x in, B: out x R of the 7 Linear
    trained = adapters if lora_r else params // shards
    terms = {
        "weights": 4 * trained,  # float32
        "gradients": 4 * trained,
        "adamw": 8 * trained,  # two float32 moments
        "activations": tokens * layers * 4 * h + one_layer if checkpointing else layers * one_layer,
        # the logits and, in the backward, their gradient; token_logps's float32 temporaries
        "logits": 2 * tokens * vocab * element + 3 * 4 * min(2 ** 24, tokens * vocab),
    }
    sharded = shards > 1 if sharded is None else sharded
    if lora_r:
        # the frozen base, which is also the reference; on CUDA its Linear weights in bfloat16 (the
        # output layer a copy of its own), the embeddings and the norms in float32
        norms = params - linear - root + h  # 2 per layer and the final one
        terms["weights"] += 2 * (linear + embedding) + 4 * (embedding + norms) if gpu else 4 * params
        terms["reference"] = 0  # the same weights with the adapters off
        if gpu:
            terms["autocast copies"] = 2 * adapters  # the base's Linear weights are bfloat16 already
            if full_tidpo:  # the sampler's shadow shares those: the adapters' copies, and the cache
                terms["sampler"] = 2 * adapters + kv_cache
    elif sharded:
        terms["reference"] = 4 * params // shards
        # the root's weights and two layers' (the one computing, the one prefetched), gathered; a
        # layer's and the root's gradients before their reduction (and its float32 copy on CUDA),
        # and the reduction's float32 result, this process's slice, before it joins the shard
        terms["gathered"] = element * (root + 2 * layer)
        terms["unsharded gradients"] = (element + (4 if gpu else 0)) * (root + layer) + 4 * (root + layer) // shards
    else:
        # on CUDA a frozen copy with bfloat16 Linear weights (the output layer its own copy)
        terms["reference"] = 2 * (linear + embedding) + 4 * embedding if gpu else 4 * params
        if gpu:
            terms["autocast copies"] = 2 * (linear + embedding)  # bfloat16 Linear weights, forward to backward
            if full_tidpo:  # the sampler's shadow (bfloat16 Linear weights) and its static KV cache
                terms["sampler"] = 2 * (linear + embedding) + kv_cache
    backward = sum(terms.values())
    terms["total"] = backward
    if sharded and full_tidpo:  # before the forward: the whole policy gathered, and the cache
        static = sum(terms[name] for name in ("weights", "gradients", "adamw", "reference"))
        terms["sampling"] = static + element * params + kv_cache + rows * vocab * 4
        terms["total"] = max(backward, terms["sampling"])
    return terms


# ---------------------------------------------------------------------------------------------
# token_logps and sequence_kl in bounded memory: tidpo.py's formulas for a large vocabulary
#
# With plain autograd, log_softmax of bfloat16 logits keeps a float32 copy of the whole [B, L, V]
# for the backward (2x the logits), and makes float32 temporaries and gradients of the same size:
# 8x the logits at the peak, 37 GiB for 16 pairs (32 rows) x 512 tokens of a 152k vocabulary. A
# loop over chunks of rows alone would not help: autograd would still keep every chunk's float32
# copy. So these two functions have their backward written out: the forward keeps only the logits
# (which exist anyway) and one log-sum-exp per row; the backward recomputes the softmax of a
# chunk of rows at a time and writes the gradient straight into one tensor of the logits' dtype.
# The arithmetic is the plain formula's, in float32 (or float64 when that came in).
# ---------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 2 ** 24  # a chunk is about this many logits (64 MiB in float32)


def _row_chunks(logits):
    rows = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    return [slice(start, start + rows) for start in range(0, logits.shape[0], rows)]


def _compute_dtype(*logits):
    # float32 at least (as tidpo.py computes), float64 when that came in
    dtype = torch.float32
    for tensor in logits:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class _LogSoftmaxAtTarget(torch.autograd.Function):
    """[N] log_softmax(logits[n])[targets[n]] for logits [N, V] and targets [N]."""

    @staticmethod
    def forward(ctx, logits, targets):
        dtype = _compute_dtype(logits)
        out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        logsumexp = torch.empty_like(out)
        for rows in _row_chunks(logits):
            chunk = logits[rows].to(dtype)
            logsumexp[rows] = torch.logsumexp(chunk, dim=-1)
            out[rows] = chunk.gather(-1, targets[rows, None]).squeeze(-1) - logsumexp[rows]
        ctx.save_for_backward(logits, targets, logsumexp)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, targets, logsumexp = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for rows in _row_chunks(logits):
            # d(x_target - logsumexp(x)) / dx = onehot(target) - softmax(x)
            scale = grad_out[rows, None]
            softmax = torch.exp(logits[rows].to(logsumexp.dtype) - logsumexp[rows, None])
            grad[rows] = (-scale * softmax).scatter_add_(-1, targets[rows, None], scale)
        return grad, None


class _SequentialKL(torch.autograd.Function):
    """[N] KL(softmax(ref_logits[n]) || softmax(policy_logits[n])) for logits [N, V]."""

    @staticmethod
    def forward(ctx, policy_logits, ref_logits):
        dtype = _compute_dtype(policy_logits, ref_logits)
        kl = torch.empty(policy_logits.shape[0], dtype=dtype, device=policy_logits.device)
        for rows in _row_chunks(policy_logits):
            policy_logps = torch.log_softmax(policy_logits[rows].to(dtype), dim=-1)
            ref_logps = torch.log_softmax(ref_logits[rows].to(dtype), dim=-1)
            # KL(p_ref || p_theta) = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v))
            kl[rows] = (ref_logps.exp() * (ref_logps - policy_logps)).sum(dim=-1)
        ctx.save_for_backward(policy_logits, ref_logits, kl)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        policy_logits, ref_logits, kl = ctx.saved_tensors
        needs_policy, needs_ref = ctx.needs_input_grad
        grad_policy = torch.empty_like(policy_logits) if needs_policy else None
        grad_ref = torch.empty_like(ref_logits) if needs_ref else None
        for rows in _row_chunks(policy_logits):
            policy_logps = torch.log_softmax(policy_logits[rows].to(kl.dtype), dim=-1)
            ref_logps = torch.log_softmax(ref_logits[rows].to(kl.dtype), dim=-1)
            scale, ref_probs = grad_kl[rows, None], ref_logps.exp()
            if needs_policy:  # dKL / d policy_logits = p_theta - p_ref
                grad_policy[rows] = scale * (policy_logps.exp() - ref_probs)
            if needs_ref:  # dKL / d ref_logits = p_ref * (log p_ref - log p_theta - KL)
                grad_ref[rows] = scale * ref_probs * (ref_logps - policy_logps - kl[rows, None])
        return grad_policy, grad_ref


def token_logps(logits, input_ids, response_mask):
    """tidpo.token_logps in bounded memory: [B, L] log p(input_ids[b, t] | input_ids[b, <t]) on the
    response, 0 elsewhere. The log-softmax is evaluated at the target only, a few rows at a time,
    and the shift is applied to the [B, L] results rather than to the [B, L, V] logits."""
    sizes = tidpo.check_logits("token_logps", "logits", logits)
    tidpo.check_shapes("token_logps", sizes, "B, L", input_ids=input_ids, response_mask=response_mask)
    next_ids = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))  # next_ids[b, t] = input_ids[b, t + 1]
    next_logps = _LogSoftmaxAtTarget.apply(logits.flatten(0, 1), next_ids.flatten()).view(next_ids.shape)
    logps = torch.nn.functional.pad(next_logps[:, :-1], (1, 0))  # token t's score at index t
    return torch.where(response_mask.bool(), logps, torch.zeros_like(logps))


def sequence_kl(policy_logits, ref_logits, response_mask):
    """tidpo.sequence_kl in bounded memory: [B] the summed KL(pi_ref || pi_theta) of the distributions
    that predict each response token."""
    sizes = tidpo.check_logits("sequence_kl", "policy_logits", policy_logits)
    tidpo.check_shapes("sequence_kl", sizes, "B, L, V", ref_logits=ref_logits)
    tidpo.check_shapes("sequence_kl", sizes, "B, L", response_mask=response_mask)
    kl = _SequentialKL.apply(policy_logits.flatten(0, 1), ref_logits.flatten(0, 1)).view(policy_logits.shape[:2])
    return (kl[:, :-1] * response_mask[:, 1:].to(kl.dtype)).sum(dim=-1)



# ----------------------------------------------------------------------------- Eq. 5-6, one position


# model -> whether its logits are its output layer's output (checked once per model: a host wait)
_plain_output_layer = weakref.WeakKeyDictionary()


def gradient_attribution(model, input_ids, attention_mask, response_mask):
    """tidpo.gradient_attribution's (logits, importance), the same numbers, in less work.

    Eq. 5's target is one logit per row, at the last response token. Differentiated through the
    [B, L, V] logits, its gradient is a [B, L, V] tensor of zeros but for that one entry, which the
    backward then multiplies through the output layer at every position (2 B L V E multiply-adds,
    as many as the layer's forward). Here the target is taken from the output layer's input at
    that position instead, run through the layer once more for B rows: the same top logit, with the
    same gradient (its row of the layer's weight at that position, 0 elsewhere). Only where the
    model's logits are its output layer's output: a model that changes them after it (a soft cap, a
    scale) takes tidpo's way, as does one whose output layer is not a Linear.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or _plain_output_layer.get(model) is False:
        return tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
    embedded, hidden = [], []

    def keep(layer, inputs, embeddings):  # as tidpo.target_gradient takes the embeddings
        if not embeddings.requires_grad:
            embeddings = embeddings.detach().requires_grad_(True)
        embedded.append(embeddings)
        return embeddings

    hooks = [model.get_input_embeddings().register_forward_hook(keep),
             head.register_forward_hook(lambda layer, inputs, output: hidden.append(inputs[0]))]
    try:
        logits = tidpo.forward_logits(model, input_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    last = tidpo.last_response_position(response_mask)
    final_logits = logits[rows, last]  # [B, V]
    again = head(hidden[0][rows, last])  # the output layer on the last response tokens alone
    if model not in _plain_output_layer:
        scale = final_logits.detach().abs().amax().clamp(min=1)
        plain = bool((again.detach() - final_logits.detach()).abs().amax() <= 2 ** -6 * scale)
        _plain_output_layer[model] = plain
        if not plain:
            return tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
    # Eq. 5: L_target = max_v logits[last response position, v], the model's own top logit
    target = again.gather(-1, final_logits.argmax(dim=-1, keepdim=True)).sum()
    (grad,) = torch.autograd.grad(target, embedded[0], retain_graph=logits.requires_grad)
    return logits, tidpo.importance_scores(grad, response_mask)
