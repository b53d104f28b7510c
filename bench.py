"""Benchmark: the step time and peak memory of DPO, TI-DPO without the triplet and full TI-DPO.

    python bench.py                                   # a tiny Llama, batch 16, prompt 32 + response 64 tokens
    python bench.py --bench-hidden 256 --bench-layers 4 --bench-vocab 8000 --bench-profile

Each variant runs train.py's own training step (tidpo_step, backward, clipping, optimizer step) on
the same random-token batches, interleaved, in one process; the table gives each one's median step
time and its ratio to DPO's, and the last line the ratios alone:

    bench: tidpo_no_triplet/dpo=R1 tidpo/dpo=R2 peak_mem tidpo/dpo=R3

Every train.py flag applies too (--batch-size, --device, --fp32, the sampling flags, ...). The
anchors of full TI-DPO are as long as the responses.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from torch.profiler import record_function

import data
import train

BENCH_VARIANTS = {"dpo": {"loss": "dpo"}, "tidpo_no_triplet": {"loss": "tidpo", "gamma": 0.0},
                  "tidpo": {"loss": "tidpo"}}


def bench_setup(args, device):
    """A random-weight Llama of the --bench-* size, its frozen copy, and random-token batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.bench_vocab, hidden_size=args.bench_hidden,
                         intermediate_size=args.bench_hidden * 3, num_hidden_layers=args.bench_layers,
                         num_attention_heads=args.bench_heads, num_key_value_heads=args.bench_heads,
                         max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    policy = LlamaForCausalLM(config).to(device).eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)

    def tokens(n):
        return torch.randint(3, args.bench_vocab, (n,)).tolist()

    batch_list = []
    for _ in range(4):  # a few distinct batches, cycled
        pairs = [{"prompt_ids": tokens(args.bench_prompt_length),
                  "chosen_ids": tokens(args.bench_response_length - 1) + [2],
                  "rejected_ids": tokens(args.bench_response_length - 1) + [2]} for _ in range(args.batch_size)]
        batch_list.append(data.collate(pairs, 0))
    # anchors as long as the responses
    args.max_new_tokens = args.min_new_tokens = args.bench_response_length
    return policy, ref, tokenizer, batch_list


def bench_step(policy, ref, optimizer, batch, tokenizer, args, device, autocast):
    """Seconds of one full training step: (anchor sampling,) forwards, backward, optimizer step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _ = train.tidpo_step(policy, ref, batch, tokenizer, args, device, autocast)
    with record_function("backward"):
        loss.backward()
    with record_function("clip + optimizer step"):
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_profile(variant, ref, batch_list, tokenizer, device, autocast):
    """Print the share of a full TI-DPO step spent in each labelled phase (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer, variant_args = variant
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        total = sum(bench_step(model, ref, optimizer, batch, tokenizer, variant_args, device, autocast)
                    for batch in batch_list)
    phases = {event.key: event for event in profiler.key_averages() if event.key in PHASES}
    print(f"where the full tidpo step's time goes ({len(batch_list)} profiled steps, {total / len(batch_list):.4f} s/step):")
    for name in PHASES:
        if name in phases:
            seconds = phases[name].cpu_time_total / 1e6  # wall time of the labelled region, host side
            if device.type == "cuda":
                seconds = max(seconds, phases[name].device_time_total / 1e6)
            print(f"  {name:<32}{seconds / len(batch_list):>9.4f} s {100 * seconds / total:>5.1f}%")


PHASES = ["sample anchors", "anchor forwards", "reference forward", "policy forward (+ attribution)",
          "backward", "clip + optimizer step"]


def memory_kib():
    """(current, peak) resident memory of this process in KiB (Linux)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def bench(args, argv, device, autocast):
    policy, ref, tokenizer, batch_list = bench_setup(args, device)
    variants = {}
    for name, overrides in BENCH_VARIANTS.items():
        variant_args = argparse.Namespace(**{**vars(args), **overrides})
        model = copy.deepcopy(policy)
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5), variant_args)
    if args.bench_variant:  # child process: this variant's peak memory alone
        model, optimizer, variant_args = variants.pop(args.bench_variant)
        variants.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = memory_kib()[0] * 1024
        for batch in batch_list[:3]:
            bench_step(model, ref, optimizer, batch, tokenizer, variant_args, device, autocast)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else memory_kib()[1] * 1024
        print(json.dumps({"peak_bytes": peak, "step_bytes": peak - before}))
        return None

    times = {name: [] for name in variants}
    for i in range(3 + args.bench_steps):  # 3 warm-up steps, then timed; the variants interleaved
        for name, (model, optimizer, variant_args) in variants.items():
            seconds = bench_step(model, ref, optimizer, batch_list[i % len(batch_list)], tokenizer,
                                 variant_args, device, autocast)
            if i >= 3:
                times[name].append(seconds)
    if args.bench_profile:
        bench_profile(variants["tidpo"], ref, batch_list, tokenizer, device, autocast)
    memory = {}
    for name in variants:  # each variant in its own process, so one peak cannot hide another
        child = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--bench-variant", name],
                               capture_output=True, text=True, check=True)
        memory[name] = json.loads(child.stdout.strip().splitlines()[-1])

    pair_tokens = sum(int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum())
                      for b in batch_list) / len(batch_list)
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"bench on {device}: {n_params / 1e6:.1f}M-parameter Llama, batch {args.batch_size} pairs, prompt "
          f"{args.bench_prompt_length} + response {args.bench_response_length} tokens, median of "
          f"{args.bench_steps} steps")
    print(f"{'variant':<18}{'s/step':>9}{'x dpo':>8}{'tokens/s':>10}{'peak MiB':>10}{'step MiB':>10}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in variants:
        print(f"{name:<18}{median[name]:>9.4f}{median[name] / median['dpo']:>8.2f}"
              f"{pair_tokens / median[name]:>10.0f}{memory[name]['peak_bytes'] / 2**20:>10.1f}"
              f"{memory[name]['step_bytes'] / 2**20:>10.1f}")
    # CUDA: peak allocated; CPU: the growth of resident memory over the steps (the process's
    # libraries would otherwise dilute the ratio)
    key = "peak_bytes" if device.type == "cuda" else "step_bytes"
    ratios = {"no_triplet": median["tidpo_no_triplet"] / median["dpo"], "full": median["tidpo"] / median["dpo"],
              "mem": memory["tidpo"][key] / memory["dpo"][key]}
    print(f"bench: tidpo_no_triplet/dpo={ratios['no_triplet']:.2f} tidpo/dpo={ratios['full']:.2f} "
          f"peak_mem tidpo/dpo={ratios['mem']:.2f}")
    return ratios


def parse_args(argv=None):
    parser = train.build_parser(description=__doc__)
    a = parser.add_argument_group("benchmark: DPO vs TI-DPO step time and memory on random tokens")
    a.add_argument("--bench-steps", type=int, default=20, help="timed steps per variant (after 3 warm-up steps)")
    a.add_argument("--bench-prompt-length", type=int, default=32, help="tokens per prompt")
    a.add_argument("--bench-response-length", type=int, default=64, help="also the anchors' length")
    a.add_argument("--bench-hidden", type=int, default=64, help="hidden size of the benchmark's Llama "
                   "(its MLP is 3x wider)")
    a.add_argument("--bench-layers", type=int, default=2, help="its layers")
    a.add_argument("--bench-heads", type=int, default=4, help="its attention heads")
    a.add_argument("--bench-vocab", type=int, default=1000, help="its vocabulary size")
    a.add_argument("--bench-profile", action="store_true", help="also profile the full tidpo step with "
                   "torch.profiler and print where its time goes")
    a.add_argument("--bench-variant", default=None, help=argparse.SUPPRESS)  # one variant's memory, in a child process
    return train.parse_args(argv, parser)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = device.type == "cuda" and not args.fp32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    return bench(args, argv, device, autocast)


if __name__ == "__main__":
    main()
