"""Benchmark: the step time and peak memory of DPO, TI-DPO without the triplet and full TI-DPO.

    python -m tools.bench                   # a tiny Llama, batch 16, prompt 32 + response 64 tokens
    python -m tools.bench --preset 0.5b     # a Llama of Qwen2.5-0.5B's shapes (0.49B parameters)
    python -m tools.bench --bench-hidden 256 --bench-layers 4 --bench-vocab 8000 --bench-profile
    python -m tools.bench --model models/smollm2 --batch-size 4 --bench-profile   # a real model
    python -m tools.bench --model models/smollm2 --data prefs.jsonl --batch-size 4

Each variant runs train.py's own training step (tidpo_step, backward, clipping, optimizer step) on
the same batches, interleaved, in one process, on one model and optimizer (a step's time does not
depend on the weights' values, and the anchors are always full length); the table gives each
one's median step time and its ratio to DPO's, and the last line the ratios alone:

    bench: tidpo_no_triplet/dpo=R1 tidpo/dpo=R2 peak_mem tidpo/dpo=R3

The batches: without --model, random tokens for a random-weight Llama of the --bench-* size, with
anchors as long as the responses. With --model, the folder's model as train.py loads it (its
weights in float32, its tokenizer and chat template) and real pairs: --data's, as train.py reads
them, or the built-in task's pairs as one-turn chats; its anchors are --max-new-tokens long.

Peak memory: on CUDA, max allocated over two steps of each variant, measured one after another
in this process (DPO first, full TI-DPO, whose sampler keeps its caches, last); on the CPU, the
growth of resident memory over three steps, each variant in a process of its own. Next to it, the
figure of training/memory.py's step_peak_bytes for the same settings (the CPU: without the weights of the policy
and the reference, which are in memory before the steps). Also printed:
the DPO step's model FLOP utilisation (6 x the parameters that multiply, all but the input
embedding, x the pairs' tokens per step / step time / the GPU's dense bfloat16 peak), the
anchor sampler's time per decoded token, and the ratios that a model of the step's FLOPs expects
(flop_model). --bench-profile adds the FLOPs that one step of each variant runs, as counted, and
where a full TI-DPO step's time and FLOPs go, phase by phase.

Every train.py flag applies too (--batch-size, --device, --fp32, --gradient-checkpointing, --lora-r, the
sampling flags, ...).
"""

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import record_function

import data
import train
from training import builtin_task, lora, memory, sampling, setup, static_sampler

BENCH_VARIANTS = {"dpo": {"loss": "dpo"}, "tidpo_no_triplet": {"loss": "tidpo", "gamma": 0.0},
                  "tidpo": {"loss": "tidpo"}}

# Qwen2.5-0.5B's shapes (its config.json): 14 query heads, 2 key/value heads, an MLP of 4864, tied
PRESETS = {"0.5b": {"bench_hidden": 896, "bench_layers": 24, "bench_heads": 14, "bench_kv_heads": 2,
                    "bench_intermediate": 4864, "bench_vocab": 151936, "bench_tied": True}}

# Dense bfloat16 peak of a GPU, in TFLOP/s (the vendor's figure without sparsity), by a part of its name.
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312}


def say(line):
    print(line, flush=True)


def bench_setup(args, device):
    """The policy, its frozen copy, a tokenizer and a few batches, cycled: --model's folder and real
    pairs (model_pairs), or a random-weight Llama of the --bench-* size and random tokens."""
    torch.manual_seed(args.seed)
    if args.model:
        tokenizer = setup.load_tokenizer(args)
        pairs = model_pairs(args, tokenizer)
        policy = setup.build_model(args, device, tokenizer)  # train.py's way: float32 weights
        # --max-new-tokens long anchors
        args.min_new_tokens = args.max_new_tokens
    else:
        policy, tokenizer, pairs = random_llama(args, device)
        # anchors as long as the responses
        args.max_new_tokens = args.min_new_tokens = args.bench_response_length
    # --lora-r: adapters, and the reference as the same weights with them off (train.py's way)
    policy, ref = lora.wrap(policy, args) if args.lora_r else (policy, copy.deepcopy(policy).requires_grad_(False))
    if args.gradient_checkpointing:
        memory.checkpoint_activations(policy)
    # a few distinct batches of --batch-size pairs
    batch_list = [data.collate([pairs[(i * args.batch_size + j) % len(pairs)] for j in range(args.batch_size)],
                               tokenizer.pad_token_id) for i in range(4)]
    return policy, ref, tokenizer, batch_list


def random_llama(args, device):
    """A random-weight Llama of the --bench-* size, made on the device, and random-token pairs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.bench_vocab, hidden_size=args.bench_hidden,
                         intermediate_size=args.bench_intermediate or args.bench_hidden * 3,
                         num_hidden_layers=args.bench_layers, num_attention_heads=args.bench_heads,
                         num_key_value_heads=args.bench_kv_heads or args.bench_heads,
                         tie_word_embeddings=args.bench_tied, max_position_embeddings=4096, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    with device:  # the weights are made where they are used: no copy from the CPU
        policy = LlamaForCausalLM(config).eval()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)

    def tokens(n):
        return torch.randint(3, args.bench_vocab, (n,)).tolist()

    pairs = [{"prompt_ids": tokens(args.bench_prompt_length),
              "chosen_ids": tokens(args.bench_response_length - 1) + [2],
              "rejected_ids": tokens(args.bench_response_length - 1) + [2]} for _ in range(4 * args.batch_size)]
    return policy, tokenizer, pairs


def model_pairs(args, tokenizer):
    """Encoded pairs for --model: --data's training pairs as train.py reads them, or the built-in
    task's pairs as one-turn chats through the model's chat template (short questions and answers)."""
    if args.data:
        return setup.load_pairs(args, tokenizer)[0]
    records = builtin_task.builtin_task(seed=args.seed, n_train=4 * args.batch_size, n_heldout=0)[0]
    pairs = []
    for record in records:
        chat = {field: [{"role": "user" if field == "prompt" else "assistant", "content": record[field]}]
                for field in data.FIELDS}
        pairs.append(data.encode_pair(tokenizer, *data.render(tokenizer, chat), args.max_length,
                                      record["source"], args.max_prompt_length))
    return pairs


def shapes(args, batch_list):
    """The model and the batches in words, for the summary line."""
    if not args.model:
        return (f"Llama, batch {args.batch_size} pairs, prompt {args.bench_prompt_length} + response "
                f"{args.bench_response_length} tokens")
    prompt = statistics.mean(float(b["prompt_attention_mask"].sum(-1).float().mean()) for b in batch_list)
    response = statistics.mean(float(b[f"{side}_response_mask"].sum(-1).float().mean())
                               for b in batch_list for side in data.RESPONSES)
    width = statistics.mean(data.stack_pair(b, 0)[0].shape[1] for b in batch_list)
    return (f"model {args.model}, batch {args.batch_size} pairs of {args.data or 'the built-in chat pairs'}: "
            f"prompt {prompt:.0f} + response {response:.0f} tokens on average, rows padded to {width:.0f}; "
            f"anchors {args.max_new_tokens} tokens")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_step(policy, ref, optimizer, batch, tokenizer, args, device, autocast):
    """Seconds of one full training step: (anchor sampling,) forwards, backward, optimizer step."""
    synchronize(device)
    start = time.perf_counter()
    loss, _ = train.tidpo_step(policy, ref, batch, tokenizer, args, device, autocast)
    with record_function("backward"):
        loss.backward()
    with record_function("clip + optimizer step"):
        torch.nn.utils.clip_grad_norm_(policy.parameters(), train.MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


PHASES = ["sample anchors", "anchor forwards", "reference forward", "policy forward (+ attribution)",
          "backward", "clip + optimizer step"]


def flop_model(policy, batch_list, anchor_tokens):
    """A model of each variant's FLOPs per step, phase by phase (PHASES), averaged over the batches:
    {"everywhere": {variant: {phase: FLOPs}}, "last": ...}. "everywhere": the attribution's backward
    goes through the output layer at every position (tidpo.gradient_attribution); "last": at the
    last response token only (training.memory.gradient_attribution).

    Only the Linear layers' matmuls are counted, N weights in all (the output layer's H among them),
    on every row as padded: a token's forward is 2N FLOPs, its backward 4N (the gradients of the
    weights and of the inputs), a backward to the inputs alone 2N. Full fine-tuning without
    gradient checkpointing. For B pairs of prompt width P, chosen and rejected stacked to 2B rows
    of width L, and anchors of A tokens:

        DPO          reference forward 2N 2BL, policy forward 2N 2BL, backward 4N 2BL
        attribution  2N 2BL, or 2(N - H) 2BL + 4H 2B (the output layer again on one position a row)
        anchors      sampling: the prompts' forward 2(N - H) BP + 2H B (the last position's
                     logits only), then A one-token steps 2N B; the anchors' forwards 2N B(P + A)
                     each, the policy's and the reference's; the policy's backward 4N B(P + A)
    """
    n = sum(p.numel() for m in policy.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    h = policy.get_output_embeddings().weight.numel()
    models = {"everywhere": {}, "last": {}}
    for way, variants in models.items():
        for name in BENCH_VARIANTS:
            variants[name] = dict.fromkeys(PHASES, 0.0)
        for batch in batch_list:
            pairs, prompt = batch["prompt_input_ids"].shape
            rows, length = data.stack_pair(batch, 0)[0].shape
            anchor_rows = pairs * (prompt + anchor_tokens)
            attribution = 2 * n * rows * length if way == "everywhere" else 2 * (n - h) * rows * length + 4 * h * rows
            dpo = {"reference forward": 2 * n * rows * length, "policy forward (+ attribution)": 2 * n * rows * length,
                   "backward": 4 * n * rows * length}
            no_triplet = {**dpo, "policy forward (+ attribution)": 2 * n * rows * length + attribution}
            full = {**no_triplet, "sample anchors": 2 * (n - h) * pairs * prompt + 2 * h * pairs
                    + anchor_tokens * 2 * n * pairs, "anchor forwards": 4 * n * anchor_rows,
                    "backward": 4 * n * (rows * length + anchor_rows)}
            for name, phases in zip(BENCH_VARIANTS, (dpo, no_triplet, full)):
                for phase, flops in phases.items():
                    variants[name][phase] += flops / len(batch_list)
    return models


@contextlib.contextmanager
def phases_measured(device, seconds, flops=None):
    """Within it, each labelled phase of a step (the record_function labels of train.py and of
    bench_step) adds its wall time to seconds[label] and, given `flops`, the matmul FLOPs that
    torch.utils.flop_counter counts in it to flops[label]. A timer around the labels rather than
    torch.profiler, which records every operator: on the CPU it made a 20 s full TI-DPO step of
    SmolLM2-135M take 28 s (47 s with its FLOP counts) and held 2.8 GB (8 GB) of events per step."""
    from torch.utils.flop_counter import FlopCounterMode

    real = train.record_function  # torch's, which bench_step uses too

    @contextlib.contextmanager
    def measured(label):
        counter = FlopCounterMode(display=False) if flops is not None else contextlib.nullcontext()
        synchronize(device)
        start = time.perf_counter()
        with real(label), counter:
            yield
        synchronize(device)
        seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start
        if flops is not None:
            flops[label] = flops.get(label, 0) + counter.get_total_flops()

    modules = [train, sys.modules[__name__]]
    for module in modules:
        module.record_function = measured
    try:
        yield
    finally:
        for module in modules:
            module.record_function = real


def count_flops(policy, ref, optimizer, batch_list, tokenizer, args, device, autocast):
    """{variant: {phase: FLOPs}}: the matmul FLOPs that one step of each variant runs in each
    labelled phase (all of a step's matmuls), as torch.utils.flop_counter counts them, averaged
    over the batches, and printed as ratios to DPO's. The anchors are sampled the dynamic way,
    whose decode steps the counter sees one by one (it would not see a CUDA graph's replays)."""
    counted = {}
    for name in BENCH_VARIANTS:
        counted[name] = {}
        dynamic = argparse.Namespace(**{**vars(variant_args(args, name)), "sampler": "dynamic"})
        with phases_measured(device, {}, counted[name]):
            for batch in batch_list:
                bench_step(policy, ref, optimizer, batch, tokenizer, dynamic, device, autocast)
        counted[name] = {phase: flops / len(batch_list) for phase, flops in counted[name].items()}
    total = {name: sum(phases.values()) for name, phases in counted.items()}
    say(f"counted (torch.utils.flop_counter, a step of each on each batch): dpo {total['dpo'] / 1e9:.3g} GFLOP; "
        f"x dpo: tidpo_no_triplet {total['tidpo_no_triplet'] / total['dpo']:.2f}, "
        f"tidpo {total['tidpo'] / total['dpo']:.2f}")
    return counted


def bench_profile(policy, ref, optimizer, variant_args, batch_list, tokenizer, device, autocast, flops):
    """Print where a full TI-DPO step's time goes: per labelled phase its wall time, the matmul
    FLOPs counted in it (`flops`, count_flops's) and their rate; on CUDA also, from torch.profiler,
    the GPU time of the kernels each phase launched and the kernels that take the most."""
    seconds = {}
    with phases_measured(device, seconds):
        total = sum(bench_step(policy, ref, optimizer, batch, tokenizer, variant_args, device, autocast)
                    for batch in batch_list)
    steps = len(batch_list)
    step = total / steps
    say(f"where the full tidpo step's time goes ({steps} steps, {step:.4f} s/step; each phase's wall time, "
        f"the matmul FLOPs counted in it and their rate):")
    rest = step
    for name in PHASES:
        wall = seconds.get(name, 0.0) / steps
        rest -= wall
        gflop = flops.get(name, 0) / 1e9
        say(f"  {name:<32} {wall:>8.4f} s {100 * wall / step:>5.1f}%  {gflop:>8.2f} GFLOP "
            f"{gflop / wall if wall else 0:>7.1f} GFLOP/s")
    say(f"  {'the rest (loss, batch copies)':<32} {rest:>8.4f} s {100 * rest / step:>5.1f}%")
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for batch in batch_list:
                bench_step(policy, ref, optimizer, batch, tokenizer, variant_args, device, autocast)
        phases = {event.key: event for event in profiler.key_averages() if event.key in PHASES}
        say("the same steps under torch.profiler: the GPU time of the kernels each phase launched")
        for name in PHASES:
            if name in phases:
                gpu = phases[name].device_time_total / 1e6 / steps
                say(f"  {name:<32} device {gpu:>8.4f} s")
        say(profiler.key_averages().table(sort_by="self_device_time_total", row_limit=15))


def memory_kib():
    """(current, peak) resident memory of this process in KiB (Linux)."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def peak_flops(device):
    """The device's dense bfloat16 peak in FLOP/s, or None (the CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for part, tflops in PEAK_TFLOPS.items() if part in name), None)


def decode_seconds_per_token(policy, batch_list, tokenizer, args, device, autocast, calls=3):
    """The anchor sampler's wall time per decoded token (the prompt's forward included), as
    tidpo_step calls it, after one call to warm up (on CUDA: to capture the graph)."""
    prompts = [(batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device))
               for batch in batch_list]
    settings = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, method=args.sampler)
    with autocast:
        sampling.sample(policy, *prompts[0], tokenizer, **settings)
        synchronize(device)
        start = time.perf_counter()
        for i in range(calls):
            sampling.sample(policy, *prompts[i % len(prompts)], tokenizer, **settings)
        synchronize(device)
    return (time.perf_counter() - start) / (calls * args.max_new_tokens)


def check_sampler(policy, batch, tokenizer, args, device, autocast):
    """CUDA: greedy anchors of the captured graph against the same static step run eagerly (the
    same kernels: must be equal) and against the dynamic way (the same rules, other kernel shapes:
    bfloat16 rounding may flip a near-tie of a random model, after which a row goes its own way)."""
    greedy = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, temperature=0.0)
    prompts = batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)
    with autocast:
        tokens = {method: sampling.sample(policy, *prompts, tokenizer, **greedy, method=method)[0]
                  for method in ("graph", "static", "dynamic")}
    length = min(t.shape[1] for t in tokens.values())
    same_rows = (tokens["dynamic"][:, :length] == tokens["graph"][:, :length]).all(-1).sum()
    equal = torch.equal(tokens["graph"], tokens["static"])
    say(f"sampler check (greedy, batch {len(prompts[0])}): graph vs eager static step "
        f"{'equal' if equal else 'DIFFERENT'}; dynamic way equal on {int(same_rows)} of {len(prompts[0])} rows")
    return equal


def variant_args(args, name):
    return argparse.Namespace(**{**vars(args), **BENCH_VARIANTS[name]})


def child_memory(policy, ref, batch_list, tokenizer, args, device, autocast):
    """The CPU's measure, in a process of its own: resident memory before and over three steps
    of one variant (--bench-variant)."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    before = memory_kib()[0] * 1024
    for batch in batch_list[:3]:
        bench_step(policy, ref, optimizer, batch, tokenizer, variant_args(args, args.bench_variant), device, autocast)
    peak = memory_kib()[1] * 1024
    print(json.dumps({"peak_bytes": peak, "step_bytes": peak - before}))


def cuda_memory(policy, ref, optimizer, batch_list, tokenizer, args, device, autocast):
    """Max allocated over two steps of each variant, one variant after another; the sampler's
    caches and graphs are dropped first, so that only full TI-DPO's steps make them again."""
    static_sampler.forget(policy)
    gc.collect()
    torch.cuda.empty_cache()
    measured = {}
    for name in BENCH_VARIANTS:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for batch in batch_list[:2]:
            bench_step(policy, ref, optimizer, batch, tokenizer, variant_args(args, name), device, autocast)
        peak = torch.cuda.max_memory_allocated(device)
        measured[name] = {"peak_bytes": peak, "step_bytes": peak - before}
        say(f"  peak memory of {name}: {peak / 2**20:.0f} MiB")
    return measured


def bench(args, argv, device, autocast):
    started = time.perf_counter()
    say(f"bench: loading {args.model} on {device}" if args.model else
        f"bench: building a Llama of hidden {args.bench_hidden}, {args.bench_layers} layers, vocabulary "
        f"{args.bench_vocab} on {device}")
    policy, ref, tokenizer, batch_list = bench_setup(args, device)
    if device.type == "cuda" and not args.fp32:
        memory.linear_weights_in(ref, torch.bfloat16)  # as train.py keeps it on CUDA
    if args.bench_variant:  # child process (CPU): this variant's memory alone
        return child_memory(policy, ref, batch_list, tokenizer, args, device, autocast)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    n_params = sum(p.numel() for p in policy.parameters())
    # the weights that multiply: the Linear layers' (the output layer's too, tied or not; the
    # embedding lookup multiplies nothing)
    matmul_params = sum(p.numel() for m in policy.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    say(f"bench: {n_params / 1e6:.1f}M parameters, {'loaded' if args.model else 'built'} in "
        f"{time.perf_counter() - started:.1f} s; {args.bench_warmup} warm-up "
        f"steps of each variant, then {args.bench_steps} timed")

    times = {name: [] for name in BENCH_VARIANTS}
    warmup = args.bench_warmup
    for i in range(warmup + args.bench_steps):  # warm-up steps, then timed; the variants interleaved
        step_times = {name: bench_step(policy, ref, optimizer, batch_list[i % len(batch_list)], tokenizer,
                                       variant_args(args, name), device, autocast) for name in BENCH_VARIANTS}
        for name, seconds in step_times.items():
            if i >= warmup:
                times[name].append(seconds)
        say(f"  step {i + 1}/{warmup + args.bench_steps}{' (warm-up)' if i < warmup else ''}: "
            + " ".join(f"{name} {seconds:.4f} s" for name, seconds in step_times.items()))
    decode = decode_seconds_per_token(policy, batch_list, tokenizer, variant_args(args, "tidpo"), device, autocast)
    captures = dict(static_sampler.static_sampler(policy).capture_seconds) if device.type == "cuda" else {}
    if device.type == "cuda":
        check_sampler(policy, batch_list[0], tokenizer, variant_args(args, "tidpo"), device, autocast)
    flops = None if args.lora_r or args.gradient_checkpointing else flop_model(policy, batch_list, args.max_new_tokens)
    if args.bench_profile:
        counted = count_flops(policy, ref, optimizer, batch_list, tokenizer, args, device, autocast)
        bench_profile(policy, ref, optimizer, variant_args(args, "tidpo"), batch_list, tokenizer, device, autocast,
                      counted["tidpo"])
    # the rows as padded: chosen and rejected stacked, and the anchors after their prompts
    length = round(statistics.mean(data.stack_pair(b, 0)[0].shape[1] for b in batch_list))
    anchor_length = round(statistics.mean(b["prompt_input_ids"].shape[1] for b in batch_list)) + args.max_new_tokens
    formula = {name: memory.step_peak_bytes(policy.config, args.batch_size, length, anchor_length, name == "tidpo",
                                            args.gradient_checkpointing, gpu=device.type == "cuda",
                                            lora_r=args.lora_r)
               for name in BENCH_VARIANTS}
    if device.type == "cuda":
        measured = cuda_memory(policy, ref, optimizer, batch_list, tokenizer, args, device, autocast)
    else:
        del policy, ref, optimizer  # free the parent's share before the children run
        gc.collect()
        measured = {}
        for name in BENCH_VARIANTS:  # each variant in its own process, so one peak cannot hide another
            say(f"  peak memory of {name} (own process)")
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where tools/ is
            child = subprocess.run([sys.executable, "-m", "tools.bench", *argv, "--bench-variant", name],
                                   capture_output=True, text=True, check=True, cwd=root)
            measured[name] = json.loads(child.stdout.strip().splitlines()[-1])

    pair_tokens = sum(int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum())
                      for b in batch_list) / len(batch_list)
    median = {name: statistics.median(t) for name, t in times.items()}
    peak = peak_flops(device)
    mfu = "n/a" if peak is None else f"{100 * 6 * matmul_params * pair_tokens / median['dpo'] / peak:.1f}%"
    sampler = "static cache + CUDA graph" if captures else "dynamic cache"
    say(f"bench on {device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}: "
        f"{n_params / 1e6:.1f}M-parameter {shapes(args, batch_list)}, median of {args.bench_steps} steps, "
        f"{time.perf_counter() - started:.0f} s in all")
    say(f"dpo step MFU {mfu} (6 x {matmul_params / 1e6:.1f}M x {pair_tokens:.0f} tokens / step time / "
        f"{'bf16 peak' if peak else 'no known peak for this device'}); anchor sampler ({sampler}): "
        f"{1000 * decode:.2f} ms per token, batch {args.batch_size}"
        + (f"; graph capture {', '.join(f'{1000 * s:.0f} ms' for s in captures.values())}" if captures else ""))
    if flops:
        modelled = {way: {name: sum(phases.values()) for name, phases in variants.items()}
                    for way, variants in flops.items()}
        ratio = {way: {name: total / totals["dpo"] for name, total in totals.items()}
                 for way, totals in modelled.items()}
        say(f"FLOP model (Linear layers' matmuls; attention scores, softmax, norms and AdamW left out): dpo "
            f"{modelled['everywhere']['dpo'] / 1e9:.3g} GFLOP/step; x dpo: tidpo_no_triplet "
            f"{ratio['everywhere']['tidpo_no_triplet']:.2f}, tidpo {ratio['everywhere']['tidpo']:.2f} with the "
            f"attribution's backward through the output layer at every position; "
            f"{ratio['last']['tidpo_no_triplet']:.2f} and {ratio['last']['tidpo']:.2f} at the last response token only")
    # CUDA: peak allocated; CPU: the growth of resident memory over the steps (the process's
    # libraries would otherwise dilute the ratio), which the formula gives without the weights
    key = "peak_bytes" if device.type == "cuda" else "step_bytes"
    for terms in formula.values():
        terms["step"] = terms["total"] - terms["weights"] - terms["reference"]
    formula_key = "total" if device.type == "cuda" else "step"
    say(f"{'variant':<18}{'s/step':>9}{'x dpo':>8}{'tokens/s':>10}{'peak MiB':>10}{'step MiB':>10}"
        f"{'formula':>10}  (memory.step_peak_bytes: the {'peak' if device.type == 'cuda' else 'step'} MiB, "
        f"{'with' if args.gradient_checkpointing else 'without'} checkpointing)")
    for name in BENCH_VARIANTS:
        say(f"{name:<18}{median[name]:>9.4f}{median[name] / median['dpo']:>8.2f}"
            f"{pair_tokens / median[name]:>10.0f}{measured[name]['peak_bytes'] / 2**20:>10.1f}"
            f"{measured[name]['step_bytes'] / 2**20:>10.1f}{formula[name][formula_key] / 2**20:>10.1f}")
    ratios = {"no_triplet": median["tidpo_no_triplet"] / median["dpo"], "full": median["tidpo"] / median["dpo"],
              "mem": measured["tidpo"][key] / measured["dpo"][key]}
    say(f"bench: tidpo_no_triplet/dpo={ratios['no_triplet']:.2f} tidpo/dpo={ratios['full']:.2f} "
        f"peak_mem tidpo/dpo={ratios['mem']:.2f}")
    return ratios


def parse_args(argv=None):
    parser = train.build_parser(description=__doc__)
    a = parser.add_argument_group("benchmark: DPO vs TI-DPO step time and memory (--model: a real model "
                                   "on real pairs; else random tokens)")
    a.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a model size: 0.5b is "
                   "Qwen2.5-0.5B's shapes, --bench-hidden 896 --bench-layers 24 --bench-heads 14 --bench-kv-heads 2 "
                   "--bench-intermediate 4864 --bench-vocab 151936 --bench-tied (flags given as well win)")
    a.add_argument("--bench-steps", type=int, default=20, help="timed steps per variant, after the warm-up")
    a.add_argument("--bench-warmup", type=int, default=3, help="untimed steps per variant first")
    a.add_argument("--bench-prompt-length", type=int, default=32, help="tokens per prompt")
    a.add_argument("--bench-response-length", type=int, default=64, help="also the anchors' length")
    a.add_argument("--bench-hidden", type=int, default=64, help="hidden size of the benchmark's Llama")
    a.add_argument("--bench-intermediate", type=int, default=None, help="its MLP width (default: 3x hidden)")
    a.add_argument("--bench-layers", type=int, default=2, help="its layers")
    a.add_argument("--bench-heads", type=int, default=4, help="its attention heads")
    a.add_argument("--bench-kv-heads", type=int, default=None, help="its key/value heads (default: as many)")
    a.add_argument("--bench-tied", action="store_true", help="its output layer is its embedding")
    a.add_argument("--bench-vocab", type=int, default=1000, help="its vocabulary size")
    a.add_argument("--bench-profile", action="store_true", help="also count each variant's FLOPs in one "
                   "step and profile the full tidpo step with torch.profiler: where its time and FLOPs go")
    a.add_argument("--bench-variant", default=None, help=argparse.SUPPRESS)  # one variant's memory, in a child process
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    return train.parse_args(argv, parser)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = setup.pick_device(args)
    return bench(args, argv, device, setup.autocast_for(device, args))


if __name__ == "__main__":
    main()
