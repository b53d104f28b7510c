"""Print docs/training.md's memory tables: a step's GPU memory by training/memory.py's formula.

    python -m tools.memory_table      # Qwen2.5 0.5B-7B on one GPU; Llama-3.1-8B and Qwen2.5-7B on
                                      # one GPU with LoRA (--lora-r 16) next to full fine-tuning;
                                      # Llama-3.2-3B, Llama-3.1-8B and Qwen2.5-7B sharded (--fsdp)
                                      # over 2, 4 and 8 GPUs
"""

import argparse

from training.memory import step_peak_bytes

# Qwen2.5's shapes (their config.json files), for the table of docs/training.md
QWEN25 = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


# The paper's models and Qwen2.5-7B (their config.json files), for the sharded table
PAPER_MODELS = {
    "Llama-3.2-3B": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "Qwen2.5-7B": QWEN25["7B"],
}


LORA_R = 16  # the rank of docs/training.md's 8B command


def main(pairs=8, prompt=256, response=256, new_tokens=64, sharded_pairs=4, gpus=(2, 4, 8)):
    """Print docs/training.md's tables: GiB per step and GPU, bfloat16 autocast, AdamW; one GPU,
    the 7-8B models on one GPU with LoRA, then sharded (--fsdp) over 2, 4 and 8."""
    from transformers import LlamaConfig, Qwen2Config

    print(f"One GPU: {pairs} pairs, prompt {prompt} + response {response} tokens, anchors {prompt} + "
          f"{new_tokens}; GiB")
    print("| model | loss | weights, gradients, AdamW, reference | without checkpointing | with checkpointing |")
    print("|---|---|---:|---:|---:|")
    for name, shape in QWEN25.items():
        for loss, full in (("DPO", False), ("TI-DPO", True)):
            off, on = (step_peak_bytes(Qwen2Config(**shape), pairs, prompt + response, prompt + new_tokens, full,
                                       checkpointing) for checkpointing in (False, True))
            static = off["weights"] + off["gradients"] + off["adamw"] + off["reference"]
            print(f"| {name} | {loss} | {static / 2**30:.1f} | {off['total'] / 2**30:.1f} | "
                  f"{on['total'] / 2**30:.1f} |")
    print(f"\nOne GPU, full fine-tuning and LoRA (--lora-r {LORA_R}): the same batch; GiB")
    print("| model | loss | training | weights, gradients, AdamW, reference | without checkpointing | "
          "with checkpointing |")
    print("|---|---|---|---:|---:|---:|")
    for name in ("Llama-3.1-8B", "Qwen2.5-7B"):
        config = LlamaConfig(**PAPER_MODELS[name])
        for loss, full in (("DPO", False), ("TI-DPO", True)):
            for training, rank in (("full", 0), (f"LoRA r {LORA_R}", LORA_R)):
                off, on = (step_peak_bytes(config, pairs, prompt + response, prompt + new_tokens, full, checkpointing,
                                           lora_r=rank) for checkpointing in (False, True))
                static = off["weights"] + off["gradients"] + off["adamw"] + off["reference"]
                print(f"| {name} | {loss} | {training} | {static / 2**30:.1f} | {off['total'] / 2**30:.1f} | "
                      f"{on['total'] / 2**30:.1f} |")
    print(f"\nSharded (--fsdp): {sharded_pairs} pairs per GPU, the same lengths; GiB per GPU")
    print("| model | loss | checkpointing | " + " | ".join(f"{n} GPUs" for n in gpus) + " |")
    print("|---|---|---|" + "---:|" * len(gpus))
    for name, shape in PAPER_MODELS.items():
        config = LlamaConfig(**shape)
        for loss, full in (("DPO", False), ("TI-DPO", True)):
            for checkpointing in (False, True):
                cells = [step_peak_bytes(config, sharded_pairs, prompt + response, prompt + new_tokens, full,
                                         checkpointing, shards=n)["total"] / 2**30 for n in gpus]
                print(f"| {name} | {loss} | {'on' if checkpointing else 'off'} | "
                      + " | ".join(f"{cell:.1f}" for cell in cells) + " |")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
