"""Train a causal LM with TI-DPO (or DPO) in a plain PyTorch loop.

    python train.py                                  # built-in task, tiny model, offline
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl
    torchrun --nproc_per_node=2 train.py ...         # DDP: one process per GPU (or CPU share)
    torchrun --nproc_per_node=8 train.py --fsdp ...  # FSDP2: the models sharded over the GPUs

A run has five phases, in the order main() shows them:
  set-up       flags, tokenizer, data and model, all checked before the output folder is made
  reference    the built-in tiny model is first fine-tuned on chosen and rejected responses alike
               (SFT, so that it prefers neither); a frozen copy becomes pi_ref (Algorithm 1)
  loop         TI-DPO (Eq. 14) or DPO (Eq. 3) steps; one step is tidpo_step
  evaluation   the same held-out numbers before and after the loop (evaluate.py)
  save         the policy and tokenizer with save_pretrained, the metrics as JSON lines

With --save-every N it also writes checkpoints, and --resume latest continues a stopped run.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
from torch.profiler import record_function  # labels a step's parts for bench.py --bench-profile

import checkpoints
import data
import distributed
import evaluate
import memory
import plots
import sampling
import static_sampler
import tidpo
from sampling import sample

# ------------------------------------------------------------------ set-up: flags, data, model


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows each flag's default, unless the default is None
    (those flags say in their help what happens when they are left out)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(description=__doc__):
    """train.py's flags (bench.py adds its own to these); docs/training.md says more of each."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument_group("model and data").add_argument
    a("--model", help="hub name or folder of a causal LM; default: a tiny Llama, built-in task")
    a("--data", help="preference JSONL, or a dataset (hub name or folder[:split]); default: built-in")
    a("--eval-data", help="held-out JSONL or dataset (split test); default: the last 5%% of --data")
    a("--max-length", type=int, default=256, help="prompt + response tokens (prompt cut first)")
    a("--output-dir", help="a new folder for the run; default: runs/<loss>-<date-time>")

    a = p.add_argument_group("loss").add_argument
    a("--loss", choices=["tidpo", "dpo"], default="tidpo", help="tidpo: Eq. 14; dpo: Eq. 3")
    a("--beta", type=float, default=0.1, help="inverse temperature of the preference margin")
    a("--gamma", type=float, default=0.1, help="weight of the triplet loss (0: no triplet)")
    a("--lam", type=float, default=0.7, help="lambda of Eq. 8: the attribution's share")
    a("--margin", type=float, default=0.01, help="alpha of the triplet loss, Eq. 13")
    a("--weight-scale", choices=["mean", "sum"], default="mean",
      help="mean: weights average 1 over a response; sum: Eq. 8 as written (they sum to 1)")
    a("--kl-alpha", type=float, default=0.0,
      help="weight of the release's TDPO2 KL term (0.5 in the paper's reported configuration)")

    a = p.add_argument_group("anchor sampling (triplet) and evaluation samples").add_argument
    a("--max-new-tokens", type=int, default=64, help="longest sampled response")
    a("--min-new-tokens", type=int, default=0, help="shortest sampled response")
    a("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    a("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    a("--top-p", type=float, default=0.95, help="nucleus sampling's probability mass")
    a("--sampler", choices=sampling.METHODS, default="auto",
      help="auto: graph (a CUDA graph) on CUDA where the model allows it, else dynamic")

    a = p.add_argument_group("optimization").add_argument
    a("--steps", type=int, help="optimizer steps (default: --epochs over the data)")
    a("--epochs", type=float, default=1.0, help="passes over the training pairs, without --steps")
    a("--batch-size", type=int, default=16, help="pairs per micro-batch, all processes together")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, help="default: 5e-4 for the built-in tiny model, 1e-6 with --model")
    a("--optimizer", choices=["adamw", "rmsprop"], default="adamw",
      help="the authors' release used rmsprop, lr 5e-6, 150 warmup steps")
    a("--warmup-steps", type=int, default=10, help="linear warmup, then constant")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    a("--gradient-checkpointing", action="store_true", help="less memory, one forward more")
    a("--sft-steps", type=int, default=300, help="built-in model only: SFT steps before TI-DPO")
    a("--seed", type=int, default=0, help="seeds the model, data order, sampling, built-in task")
    a("--log-every", type=int, default=10, help="steps per progress line")
    a("--device", help="cuda or cpu; default: cuda when available")
    a("--fp32", action="store_true", help="CUDA: float32 instead of bfloat16 autocast")
    a("--fsdp", action="store_true", help="under torchrun: shard policy and reference (FSDP2)")

    a = p.add_argument_group("checkpoints").add_argument
    a("--save-every", type=int, default=0, help="a checkpoint every N steps and at the end")
    a("--keep-last", type=int, default=2, help="checkpoints kept; older ones are deleted")
    a("--resume", metavar="PATH|latest", help="continue a run from a checkpoint, or the newest in "
      "--output-dir; the flags must be the run's, except " +
      ", ".join("--" + name.replace("_", "-") for name in checkpoints.MAY_CHANGE_ON_RESUME))
    return p


# the flags that have a lowest value, and that value
AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "gamma": 0, "margin": 0, "kl_alpha": 0,
            "max_new_tokens": 1, "warmup_steps": 0, "max_grad_norm": 0, "sft_steps": 0,
            "log_every": 1, "save_every": 0, "keep_last": 1}


def parse_args(argv=None, parser=None):
    """The flags, checked: a bad value stops here with a usage error, not as a crash later."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-6 if args.model else 5e-4
    for name, lowest in AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and not value >= lowest:
            p.error(f"--{name.replace('_', '-')} must be at least {lowest}, got {value}")
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    for wrong, message in [
        (not args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (not args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (not args.beta > 0, f"--beta must be positive, got {args.beta}"),
        (not 0 <= args.lam <= 1, f"--lam must be between 0 and 1, got {args.lam}"),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (not args.temperature >= 0,
         f"--temperature must be at least 0 (0: greedy), got {args.temperature}"),
        (args.max_length < 2, "--max-length must be at least 2 (a prompt and a response token), "
                              f"got {args.max_length}"),
        (not 0 <= args.min_new_tokens <= args.max_new_tokens,
         f"--min-new-tokens must be between 0 and --max-new-tokens, got {args.min_new_tokens}"),
        (args.batch_size < world_size, f"--batch-size {args.batch_size} is smaller than the "
         f"{world_size} processes: each process needs at least one pair of every micro-batch"),
        (args.fsdp and args.sampler in ("static", "graph"), f"--sampler {args.sampler} cannot run "
         "a sharded model (--fsdp): its shadow copy needs whole weights; use --sampler dynamic"),
    ]:
        if wrong:
            p.error(message)
    return args


def build_model(args, device, tokenizer, rank=0):
    """The policy: --model by hub name or folder, or a tiny Llama built from a config. A sharded
    run (--fsdp) loads --model on rank 0's CPU only, the other processes on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model and args.fsdp:
        if rank != 0:  # the architecture without its weights, which rank 0 sends later
            with torch.device("meta"):
                config = data.from_pretrained(AutoConfig, args.model)
                return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        device = torch.device("cpu")
    if args.model:
        # float32 weights whatever the checkpoint's dtype: in bfloat16, lr 1e-6 updates round away
        policy = data.from_pretrained(AutoModelForCausalLM, args.model, dtype=torch.float32)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        policy = LlamaForCausalLM(config)
    # Dropout stays off for good: the attribution and log-probs must be reproducible forwards.
    return policy.to(device).eval()


# ------------------------------------------------------------------ the reference

SFT_LR = 3e-3  # the built-in tiny model learns its task in --sft-steps at this rate


def sft(model, pairs, tokenizer, args, device, autocast, log):
    """Supervised fine-tuning on chosen AND rejected responses, so that the reference built from
    this model has no preference between them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR)
    epochs = data.Epochs(pairs, args.batch_size, tokenizer.pad_token_id, args.seed)
    for step in range(1, args.sft_steps + 1):
        stacked = data.stack_pair(epochs.next(), tokenizer.pad_token_id)
        input_ids, attention_mask, response_mask = (t.to(device) for t in stacked)
        with autocast:
            logits = tidpo.forward_logits(model, input_ids, attention_mask)
            logps = memory.token_logps(logits, input_ids, response_mask)
        loss = -logps.sum() / response_mask.sum()
        loss.backward()
        optimizer.step()
        # cleared after the step, so that the last SFT gradient is not added to the first
        # preference step's (that loop only clears after its own steps)
        optimizer.zero_grad(set_to_none=True)
        if step % (args.log_every * 10) == 0 or step == args.sft_steps:
            log(f"sft step {step}/{args.sft_steps} | loss {loss.item():.4f}")


# ------------------------------------------------------------------ one step: Eq. 14 (or Eq. 3)


def reference_logps(ref, input_ids, attention_mask, response_mask):
    """token_logps of the frozen reference, with its logits (for the optional KL term)."""
    with torch.no_grad():
        logits = tidpo.forward_logits(ref, input_ids, attention_mask)
        return logits, memory.token_logps(logits, input_ids, response_mask)


def hybrid_token_weights(policy, input_ids, attention_mask, response_mask, batch, args):
    """(logits, weights): the policy's forward with its attribution (Eq. 5-6, one backward to the
    embeddings), then the hybrid weights of Eq. 8."""
    logits, importance = tidpo.gradient_attribution(policy, input_ids, attention_mask,
                                                    response_mask)
    weights = tidpo.hybrid_weights(importance, response_mask, lam=args.lam, scale=args.weight_scale)
    return logits, weights


def tidpo_step(policy, ref, batch, tokenizer, args, device, autocast, hooks=None):
    """Loss and metrics of one micro-batch.

    Chosen and rejected go through each model in one forward. The policy's forward also gives the
    attribution (one backward to the embeddings, no second forward). Anchors, when the triplet is
    on, are sampled first and get a forward of their own: they need log-probs, not attribution.

    `policy` may be a DDP wrapper: the forward of chosen and rejected goes through it, sampling
    and the anchors' forward use the module inside (distributed.py says why that is right).

    `hooks` lets experiments.py swap in a variant beyond the paper: "weights", a function with
    hybrid_token_weights' arguments and result; "triplet", one with tidpo.triplet_loss's.
    """
    hooks = hooks or {}
    module = distributed.unwrap(policy)
    n = len(batch["chosen_input_ids"])
    tidpo_on = args.loss == "tidpo"
    anchor_logratios = anchor_mask = None
    # One autocast region for all of the step's forwards: autocast casts each float32 weight to
    # bfloat16 once per region, and every forward of the region shares that copy.
    with autocast:
        if tidpo_on and args.gamma != 0:
            # Eq. 13's anchor: a response sampled from the current policy for the same prompt,
            # without gradient; its per-token log-ratios are then computed with gradient.
            prompt_ids = batch["prompt_input_ids"].to(device)
            prompt_mask = batch["prompt_attention_mask"].to(device)
            with record_function("sample anchors"), distributed.gathered(module):
                anchor = sample(module, prompt_ids, prompt_mask, tokenizer,
                                **sampling.options(args))
            with record_function("anchor forwards"):
                anchor_logits = tidpo.forward_logits(module, *anchor[:2])
                anchor_logps = memory.token_logps(anchor_logits, anchor[0], anchor[2])
                anchor_logratios = anchor_logps - reference_logps(ref, *anchor)[1]  # [B, L_a]
            anchor_mask = anchor[2]

        stacked = data.stack_pair(batch, tokenizer.pad_token_id)  # chosen rows [:n], rejected [n:]
        input_ids, attention_mask, response_mask = (t.to(device) for t in stacked)
        with record_function("reference forward"):
            ref_logits, ref_logps = reference_logps(ref, input_ids, attention_mask, response_mask)
        kl_on = tidpo_on and args.kl_alpha != 0
        if not kl_on:
            ref_logits = None  # [2B, L, V]: freed before the policy's forward needs the memory
        with record_function("policy forward (+ attribution)"):
            if tidpo_on:
                token_weights = hooks.get("weights", hybrid_token_weights)
                logits, weights = token_weights(policy, input_ids, attention_mask, response_mask,
                                                batch, args)
            else:  # DPO: every response token weighs 1
                logits = tidpo.forward_logits(policy, input_ids, attention_mask)
                weights = response_mask.float()
            logps = memory.token_logps(logits, input_ids, response_mask)
        kl = {}
        if kl_on:
            kl_both = memory.sequence_kl(logits, ref_logits, response_mask)
            kl = {"kl_chosen": kl_both[:n], "kl_rejected": kl_both[n:]}

    triplet = hooks.get("triplet", tidpo.triplet_loss)
    loss, metrics = tidpo.tidpo_loss(
        logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], weights[:n], weights[n:],
        beta=args.beta, anchor_logratios=anchor_logratios, anchor_mask=anchor_mask,
        chosen_mask=response_mask[:n], rejected_mask=response_mask[n:],
        gamma=args.gamma if tidpo_on else 0.0, margin=args.margin,
        kl_alpha=args.kl_alpha if tidpo_on else 0.0, triplet=triplet, **kl)
    if anchor_logratios is not None and "flipped" in batch:  # built-in task: where the hinge acts
        metrics.update(evaluate.triplet_active_by_label(
            logps - ref_logps, response_mask, anchor_logratios, anchor_mask,
            batch["flipped"].to(device), args.margin, triplet))
    return loss, metrics


# ------------------------------------------------------------------ the loop


def make_optimizer(policy, args):
    """The optimizer and its schedule: linear warmup over --warmup-steps, then constant."""
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup(s, args))
    return optimizer, scheduler


def count_steps(args, n_pairs):
    return args.steps or max(1, math.ceil(args.epochs * n_pairs / (args.batch_size * args.grad_accum)))


def warmup(step, args):
    return min(1.0, (step + 1) / (args.warmup_steps + 1))


def train_loop(policy, ref, train_pairs, tokenizer, args, run, resume, before):
    """The preference steps; returns the history of logged means. Each step: --grad-accum
    micro-batches of tidpo_step and backward, one look at the step's numbers (the only wait for
    the device), clipping, the update."""
    device, rank, world_size, log = run.device, run.rank, run.world_size, run.log
    # in training mode until the end of the loop
    end_checkpointing = (memory.checkpoint_activations(policy) if args.gradient_checkpointing
                         else policy.eval)
    train_policy = distributed.wrap(policy, device, world_size)
    optimizer, scheduler = make_optimizer(policy, args)
    steps = count_steps(args, len(train_pairs))
    pad_id = tokenizer.pad_token_id
    epochs = data.Epochs(train_pairs, args.batch_size, pad_id, args.seed, min_pairs=world_size)
    sums, count, history, first_step = {}, 0, [], 1
    torch.manual_seed(args.seed + rank)  # each process samples its anchors from its own stream
    checkpoint = None  # the newest checkpoint this run wrote or resumed from
    if resume:  # the optimizer, schedule, random streams, data position and log window as saved
        sums, count, history, first_step, checkpoint = checkpoints.restore_loop(
            resume, policy, optimizer, scheduler, epochs, lambda s: warmup(s, args), args.lr,
            device, rank)
        log(f"resumed from {checkpoint}: step {resume['step']} of {steps} done",
            {"phase": "resume", "step": resume["step"], "checkpoint": checkpoint})
    if args.save_every:
        checkpoints.save_reference(ref, args.output_dir, rank, args.fsdp)  # all checkpoints need it
    if device.type == "cuda" and not args.fp32 and not args.fsdp:
        # The reference's Linear weights in bfloat16, the dtype autocast casts them to at every
        # forward anyway: the same numbers, without the casts. After the save (float32 on disk).
        static_sampler.linear_weights_in(ref, torch.bfloat16)

    t0 = time.perf_counter()
    for step in range(first_step, steps + 1):
        step_sums = {}
        for micro_step in range(args.grad_accum):
            batch, share = distributed.shard(epochs.next(), rank, world_size)
            last = micro_step == args.grad_accum - 1
            with distributed.sync_unless(train_policy, world_size, last):
                loss, metrics = tidpo_step(train_policy, ref, batch, tokenizer, args, device,
                                           run.autocast, run.hooks)
                # DDP averages the processes' gradients. Weighting each process's batch-mean loss
                # by its share of the pairs times the number of processes makes that average the
                # gradient of the whole batch's mean loss, however the pairs split.
                (loss * (share * world_size / args.grad_accum)).backward()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                step_sums[name] = step_sums.get(name, 0) + value * (share / args.grad_accum)
        names = [*step_sums, "grad_norm"]
        grad_norm = distributed.clip_grad_norm(policy, args.max_grad_norm)
        # the processes' shares add up to the whole batch's means
        means = distributed.all_reduce_sum(torch.stack(list(step_sums.values())), world_size)
        # The step's one wait for the device: its numbers, checked before the update is applied.
        values = dict(zip(names, torch.cat([means, grad_norm.reshape(1).to(means)]).tolist()))
        if not all(math.isfinite(value) for value in values.values()):
            raise SystemExit(checkpoints.non_finite_message(step, values, args, device, checkpoint))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        count += 1

        if step % args.log_every == 0 or step == steps:
            logged = evaluate.with_shares({name: value / count for name, value in sums.items()})
            seconds = (time.perf_counter() - t0) / count
            # The training batch's accuracy and margin are those of the WEIGHTED rewards (Eq. 11);
            # the held-out accuracy and margin use the plain, unweighted DPO reward.
            left = round(seconds * (steps - step))
            log(f"step {step}/{steps} | loss {logged['loss']:.4f} | weighted acc "
                f"{logged['rewards/accuracies']:.2f} | weighted margin "
                f"{logged['rewards/margins']:.4f} | {seconds:.2f} s/step, {left // 60}:{left % 60:02d} left",
                {"phase": "train", "step": step, "seconds_per_step": seconds, **logged})
            history.append({"step": step, **logged})
            sums, count, t0 = {}, 0, time.perf_counter()
        if args.save_every and (step % args.save_every == 0 or step == steps):
            checkpoint = checkpoints.save_checkpoint(
                args, step, policy, optimizer, scheduler, device, rank, world_size,
                data=epochs.state(), window={"sums": sums, "count": count}, history=history,
                before=before) or checkpoint
    end_checkpointing()
    return history


# ------------------------------------------------------------------ the run: main() and its phases


def pick_device(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: PyTorch sees no CUDA device here (torch "
                         f"{torch.__version__}); leave --device out, or use --device cpu")
    return device


def autocast_for(device, args):
    """bfloat16 autocast on CUDA (unless --fp32); plain float32 on the CPU."""
    use_bf16 = device.type == "cuda" and not args.fp32
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()


class Run:
    """What the phases share: the device and its autocast, this process's rank among world_size,
    experiments.py's hooks, and the log (printed by rank 0, and kept in metrics.jsonl once the
    output folder exists)."""

    def __init__(self, args, hooks):
        torch.manual_seed(args.seed)
        self.rank, self.world_size, self.device = distributed.setup(pick_device(args), args.fsdp)
        self.autocast = autocast_for(self.device, args)
        self.hooks, self.metrics_path = hooks or {}, None

    def log(self, line, record=None):
        if self.rank != 0:  # every process computes the same numbers; one of them reports
            return
        print(line, flush=True)
        if record is not None and self.metrics_path:
            with open(self.metrics_path, "a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")


def held_out(policy, ref, pairs, tokenizer, args, run, when):
    """evaluate.evaluate on the held-out pairs, logged; after the loop on the built-in task, with
    samples that its judge scores."""
    judge = when == "after" and args.data is None
    result = evaluate.evaluate(policy, ref, pairs, tokenizer, args, run.device, run.autocast,
                               with_samples=judge, diagnostics=run.hooks.get("diagnostics", False))
    line = f"held-out {when}: accuracy {result['accuracy']:.3f}, margin {result['margin']:.4f}"
    if judge:
        line += (f"; judge score of samples: policy {result['judge/policy']:+.3f}, reference "
                 f"{result['judge/reference']:+.3f}, policy wins {result['win_rate']:.3f}")
    run.log(line, {"phase": "eval", "when": when, **result})
    return result


def main(argv=None, hooks=None):
    """One run. `hooks` are for experiments.py's variants beyond the paper: "weights" and
    "triplet" (see tidpo_step), "task" (data.builtin_task's settings) and "diagnostics"
    (evaluate's research metrics)."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    run = Run(args, hooks)
    log = run.log

    # Set-up. Everything that can fail on the user's input comes before the output folder is made.
    tokenizer = data.load_tokenizer(args, run.hooks.get("task"))
    train_pairs, heldout_pairs = data.load_pairs(args, tokenizer, run.hooks.get("task"))
    if len(train_pairs) < run.world_size:
        raise SystemExit(f"error: too few training pairs ({len(train_pairs)}) for "
                         f"{run.world_size} processes: each process needs at least one")
    policy = build_model(args, run.device, tokenizer, run.rank)
    # refuses a sampler that cannot run this model, and lengths it cannot hold
    sampling.choose_method(policy, args.sampler, run.device.type == "cuda")
    warnings = data.check_fit(args, policy.config, train_pairs, heldout_pairs,
                              count_steps(args, len(train_pairs)))
    resume_path = checkpoints.find_resume_checkpoint(args) if args.resume else None
    resume = checkpoints.load_checkpoint(resume_path, args, run.world_size) if resume_path else None
    started_over = checkpoints.make_output_dir(args, resume_path, run.rank, run.world_size)
    run.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    log(f"model: {data.model_note(args, run.autocast)}, "
        f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, on {run.device}"
        f"{f' x {run.world_size} processes' if run.world_size > 1 else ''}; "
        f"{len(train_pairs)} training pairs, {len(heldout_pairs)} held-out")
    for warning in [started_over, *warnings] if started_over else warnings:
        log(warning, {"phase": "warning", "message": warning})

    # Reference. Algorithm 1 starts from pi_theta = pi_ref, a frozen copy of the starting policy
    # (the tiny model's after its SFT; on --resume, that of the run that wrote the checkpoint).
    if args.model is None and not resume:
        sft(policy, train_pairs, tokenizer, args, run.device, run.autocast, log)
    if args.fsdp:  # both sharded, from rank 0's weights
        policy, ref = distributed.fsdp(policy, run.device, isinstance(run.autocast, torch.autocast))
    else:
        ref = copy.deepcopy(policy).requires_grad_(False).eval()
    if resume:
        checkpoints.load_models(policy, ref, resume)

    # Evaluation before the loop: the starting policy's held-out numbers.
    if resume:
        before = resume["before"]
    else:
        before = held_out(policy, ref, heldout_pairs, tokenizer, args, run, "before")

    # Loop.
    history = train_loop(policy, ref, train_pairs, tokenizer, args, run, resume, before)

    # Evaluation after the loop: the same numbers, and samples scored by the built-in task's judge.
    after = held_out(policy, ref, heldout_pairs, tokenizer, args, run, "after")

    # Save.
    folder = os.path.join(args.output_dir, "policy")
    checkpoints.save_policy(policy, tokenizer, folder, run.rank, args.fsdp)
    curves = plots.run_curves(args.output_dir) if run.rank == 0 else None  # with matplotlib only
    log(f"saved the policy and tokenizer to {folder} and the metrics to {run.metrics_path}"
        + (f" (curves: {curves})" if curves else ""))
    return {"before": before, "after": after, "history": history, "output_dir": args.output_dir}


if __name__ == "__main__":
    first = int(os.environ.get("RANK", 0)) == 0  # under torchrun, every process meets the error
    try:
        main()
    except (data.DataError, sampling.SamplerError) as error:  # the message says what to fix
        sys.exit(f"error: {error}" if first else 1)
    except SystemExit as error:  # one message is enough
        sys.exit(error.code if first or not isinstance(error.code, str) else 1)
