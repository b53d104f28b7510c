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
  evaluation   the same held-out numbers before and after the loop (and every --eval-every steps)
  save         the policy and tokenizer with save_pretrained, the metrics as JSON lines

--save-every N writes checkpoints; SIGTERM or Ctrl-C stops a run with one; --resume latest goes on.
The machinery it runs on (samplers, sharding, checkpoints, memory kernels) is in training/.
"""

import argparse
import copy
import dataclasses
import math
import os
import sys
from typing import Callable

import torch
from torch.profiler import record_function  # labels a step's parts for the benchmark's profile

import data
import tidpo
from training import (checkpoints, distributed, evaluate, lora, memory, plots, sampling, setup,
                      stopping, tracking)

# ------------------------------------------------------------------ set-up: the flags


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows each flag's default, unless the default is None
    (those flags say in their help what happens when they are left out)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(description=__doc__):
    """train.py's flags (tools/bench.py adds its own); docs/training.md says more of each."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument_group("model and data").add_argument
    a("--model", help="hub name or folder of a causal LM; default: a tiny Llama, built-in task")
    a("--data", help="preference JSONL, or a dataset (hub name, folder[:split]); default: built-in")
    a("--eval-data", help="held-out JSONL or dataset (split test); default: the last 5%% of --data")
    a("--max-length", type=int, default=256, help="prompt + response tokens (prompt cut first)")
    a("--max-prompt-length", type=int, help="a cut prompt keeps at least N tokens (default: half)")
    a("--output-dir", help="a new folder for the run; default: runs/<loss>-<date-time>")

    a = p.add_argument_group("loss").add_argument
    a("--loss", choices=["tidpo", "dpo"], default="tidpo", help="tidpo: Eq. 14; dpo: Eq. 3")
    a("--beta", type=float, default=0.1, help="inverse temperature of the preference margin")
    a("--gamma", type=float, default=0.1, help="weight of the triplet loss (0: no triplet)")
    a("--lam", type=float, default=0.7, help="lambda of Eq. 8: the attribution's share")
    a("--margin", type=float, default=0.01, help="alpha of the triplet loss, Eq. 13")
    a("--kl-alpha", type=float, default=0.0,
      help="weight of the release's TDPO2 KL term (0.5 in the paper's reported configuration)")

    a = p.add_argument_group("anchor sampling (triplet) and evaluation samples").add_argument
    a("--max-new-tokens", type=int, default=64, help="longest sampled response")
    a("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    a("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0: all)")
    a("--top-p", type=float, default=0.95, help="nucleus sampling's probability mass")
    a("--sampler", choices=sampling.METHODS, default="auto",
      help="auto: graph (a CUDA graph) on CUDA where the model allows it, else dynamic")

    a = p.add_argument_group("optimization").add_argument
    a("--steps", type=int, help="AdamW steps (default: one pass over the training pairs)")
    a("--batch-size", type=int, default=16, help="pairs per micro-batch, all processes together")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, help="default: 5e-4 for the built-in tiny model, 1e-6 with --model")
    a("--warmup-steps", type=int, default=10, help="linear warmup, then constant")
    a("--gradient-checkpointing", action="store_true", help="less memory, one forward more")
    a("--sft-steps", type=int, default=300, help="built-in model only: SFT steps before TI-DPO")
    a("--seed", type=int, default=0, help="seeds the model, data order, sampling, built-in task")
    a("--log-every", type=int, default=10, help="steps per progress line")
    a("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: off)")
    a("--report-to", choices=tracking.REPORT_TO, default="none", help="also log to this tracker")
    a("--device", help="cuda or cpu; default: cuda when available")
    a("--fp32", action="store_true", help="CUDA: float32 instead of bfloat16 autocast")
    a("--fsdp", action="store_true", help="under torchrun: shard policy and reference (FSDP2)")
    a("--lora-r", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (peft); "
      "the reference is the model with them off (0: full fine-tuning)")

    a = p.add_argument_group("checkpoints").add_argument
    a("--save-every", type=int, default=0, help="a checkpoint every N steps and at the end (the "
      "newest two are kept)")
    a("--resume", metavar="PATH|latest", help="continue a run from a checkpoint, or the newest in "
      "--output-dir; the flags must be the run's, except " +
      ", ".join("--" + name.replace("_", "-") for name in checkpoints.MAY_CHANGE_ON_RESUME))
    return p


def parse_args(argv=None, parser=None):
    """The flags, checked (training/setup.py): a bad value stops here with a usage error."""
    p = parser or build_parser()
    return setup.check_args(p, p.parse_args(argv))


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
        # cleared here: the loop clears only after its steps, and this must not reach its first
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
    logits, importance = memory.gradient_attribution(policy, input_ids, attention_mask,
                                                     response_mask)
    return logits, tidpo.hybrid_weights(importance, response_mask, lam=args.lam)


def anchor_logratios(module, ref, batch, tokenizer, args, device):
    """Eq. 13's anchors: a response sampled from the current policy for each prompt (no
    gradient), then its per-token log-ratios with gradient. Returns ([B, L_a] logratios, mask)."""
    prompt = batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)
    with record_function("sample anchors"), distributed.gathered(module):
        ids, attention_mask, response_mask = sampling.sample(module, *prompt, tokenizer,
                                                             **sampling.options(args))
    with record_function("anchor forwards"):
        logits = tidpo.forward_logits(module, ids, attention_mask)
        logps = memory.token_logps(logits, ids, response_mask)
        ref_logps = reference_logps(ref, ids, attention_mask, response_mask)[1]
    return logps - ref_logps, response_mask


def tidpo_step(policy, ref, batch, tokenizer, args, device, autocast, hooks=None):
    """Loss and metrics of one micro-batch: anchors, reference forward, policy forward with its
    attribution, loss.

    Chosen and rejected go through each model in one forward (rows [:n] and [n:]). The policy's
    forward also gives the attribution (one backward to the embeddings, no second forward).
    `policy` may be a DDP wrapper: the forward of chosen and rejected goes through it, sampling
    and the anchors' forward use the module inside (training/distributed.py says why).
    """
    hooks = hooks or Hooks()
    n = len(batch["chosen_input_ids"])
    tidpo_on = args.loss == "tidpo"
    anchor, anchor_mask, kl = None, None, {}
    # One autocast region for all of the step's forwards: autocast casts each float32 weight to
    # bfloat16 once per region, and every forward of the region shares that copy.
    with autocast:
        if tidpo_on and args.gamma != 0:
            anchor, anchor_mask = anchor_logratios(distributed.unwrap(policy), ref, batch,
                                                   tokenizer, args, device)
        stacked = data.stack_pair(batch, tokenizer.pad_token_id)
        input_ids, attention_mask, response_mask = (t.to(device) for t in stacked)
        with record_function("reference forward"):
            ref_logits, ref_logps = reference_logps(ref, input_ids, attention_mask, response_mask)
        kl_on = tidpo_on and args.kl_alpha != 0
        if not kl_on:
            ref_logits = None  # [2B, L, V]: freed before the policy's forward needs the memory
        with record_function("policy forward (+ attribution)"):
            if tidpo_on:
                logits, weights = hooks.weights(policy, input_ids, attention_mask, response_mask,
                                                batch, args)
            else:  # DPO: every response token weighs 1
                logits = tidpo.forward_logits(policy, input_ids, attention_mask)
                weights = response_mask.float()
            logps = memory.token_logps(logits, input_ids, response_mask)
        if kl_on:
            kl_both = memory.sequence_kl(logits, ref_logits, response_mask)
            kl = {"kl_chosen": kl_both[:n], "kl_rejected": kl_both[n:]}

    loss, metrics = tidpo.tidpo_loss(
        logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], weights[:n], weights[n:],
        beta=args.beta, anchor_logratios=anchor, anchor_mask=anchor_mask,
        chosen_mask=response_mask[:n], rejected_mask=response_mask[n:],
        gamma=args.gamma if tidpo_on else 0.0, margin=args.margin,
        kl_alpha=args.kl_alpha if tidpo_on else 0.0, triplet=hooks.triplet, **kl)
    metrics.update(hooks.step_metrics(batch, logps - ref_logps, response_mask, anchor, anchor_mask,
                                      args.margin, hooks.triplet))
    return loss, metrics


# ------------------------------------------------------------------ the loop


MAX_GRAD_NORM = 1.0  # gradient clipping by the global norm, as TRL and the DPO reference code


def make_optimizer(params, args):
    """AdamW without weight decay (tools/experiments.py can swap in the release's RMSprop)."""
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


@dataclasses.dataclass
class Hooks:
    """Where the research tools (tools/experiments.py) swap a part of a run for a variant beyond
    the paper. Each default is the paper's method, and each replacement takes the arguments and
    gives the result of the function it replaces."""
    weights: Callable = hybrid_token_weights     # Eq. 5-6 and 8: (logits, [2B, L] weights)
    triplet: Callable = tidpo.triplet_loss       # Eq. 13
    sft: Callable = sft                          # the built-in model's reference
    optimizer: Callable = make_optimizer
    step_metrics: Callable = evaluate.step_metrics  # a step's extra metrics (anchors' length, ...)
    diagnostics: dict = None  # evaluate's attribution variants beyond the paper, {name: function}
    task: dict = dataclasses.field(default_factory=dict)  # the built-in task's settings


def count_steps(args, n_pairs):
    return args.steps or max(1, math.ceil(n_pairs / (args.batch_size * args.grad_accum)))


def warmup(step, args):
    return min(1.0, (step + 1) / (args.warmup_steps + 1))


def train_loop(policy, ref, train_pairs, tokenizer, args, run, resume, before, heldout_pairs):
    """The preference steps; returns the history of logged means. Each step: --grad-accum
    micro-batches of tidpo_step and backward, one look at the step's numbers (the only wait for
    the device), clipping, the update; then the log, evaluation and checkpoint when they are due."""
    device, rank, world_size, log = run.device, run.rank, run.world_size, run.log
    # in training mode until the end of the loop
    end_checkpointing = (memory.checkpoint_activations(policy) if args.gradient_checkpointing
                         else policy.eval)
    train_policy = distributed.wrap(policy, device, world_size)
    optimizer = run.hooks.optimizer(policy.parameters(), args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup(s, args))
    steps = count_steps(args, len(train_pairs))
    epochs = data.Epochs(train_pairs, args.batch_size, tokenizer.pad_token_id, args.seed,
                         min_pairs=world_size)
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
        # forward anyway: the same numbers, without the casts (saved above in float32).
        memory.linear_weights_in(ref, torch.bfloat16)

    speed, stop = tracking.Throughput(), stopping.Stop(ref, args, run, steps)
    for step in range(first_step, steps + 1):
        step_sums, whole = {}, [speed.count(epochs.next()) for _ in range(args.grad_accum)]
        for micro_step, micro_batch in enumerate(whole):
            batch, share = distributed.shard(micro_batch, rank, world_size, whole)
            with distributed.sync_unless(train_policy, world_size, micro_step == len(whole) - 1):
                loss, metrics = tidpo_step(train_policy, ref, batch, tokenizer, args, device,
                                           run.autocast, run.hooks)
                # DDP averages the processes' gradients. Weighting each process's batch-mean loss
                # by its share of the step's pairs (an epoch's last micro-batch may be short) times
                # the number of processes makes the sum the gradient of the step's mean loss.
                (loss * (share * world_size)).backward()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                step_sums[name] = step_sums.get(name, 0) + value * share
        names = [*step_sums, "grad_norm"]
        grad_norm = distributed.clip_grad_norm(policy, MAX_GRAD_NORM)
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
            seconds, rates = speed.window(count, logged)  # s/step, tokens/s since the last line
            left = round(seconds * (steps - step))
            # The training batch's accuracy and margin are those of the WEIGHTED rewards (Eq. 11);
            # the held-out accuracy and margin use the plain, unweighted DPO reward.
            log(f"step {step}/{steps} | loss {logged['loss']:.4f} | weighted acc "
                f"{logged['rewards/accuracies']:.2f} | weighted margin "
                f"{logged['rewards/margins']:.4f} | {tracking.rates_text(rates)} | {seconds:.2f} "
                f"s/step, {left // 60}:{left % 60:02d} left",
                {"phase": "train", "step": step, "seconds_per_step": seconds, **rates, **logged})
            history.append({"step": step, **logged})
            sums, count = {}, 0
        if args.eval_every and step % args.eval_every == 0 and step < steps:  # at the end: "after"
            held_out(policy, ref, heldout_pairs, tokenizer, args, run, "step", step)
        if stop.asked() or args.save_every and (step % args.save_every == 0 or step == steps):
            checkpoint = checkpoints.save_checkpoint(
                args, step, policy, optimizer, scheduler, device, rank, world_size,
                data=epochs.state(), window={"sums": sums, "count": count}, history=history,
                before=before) or checkpoint
            stop.exit_if_asked(step, checkpoint)  # one line: the checkpoint, how to continue
    end_checkpointing()
    return history


# ------------------------------------------------------------------ the run: main() and its phases


def held_out(policy, ref, pairs, tokenizer, args, run, when, step=None):
    """evaluate.evaluate on the held-out pairs, logged; when "before" or "after" the loop, or at
    a `step` of it. After the loop on the built-in task, with samples that its judge scores."""
    judge = when == "after" and args.data is None
    result = evaluate.evaluate(policy, ref, pairs, tokenizer, args, run.device, run.autocast,
                               with_samples=judge, diagnostics=run.hooks.diagnostics)
    result = {"step": step, **result} if step else result
    line = (f"held-out {f'at step {step}' if step else when}: accuracy {result['accuracy']:.3f}, "
            f"margin {result['margin']:.4f}")
    if judge:
        line += (f"; judge score of samples: policy {result['judge/policy']:+.3f}, reference "
                 f"{result['judge/reference']:+.3f}, policy wins {result['win_rate']:.3f}")
    run.log(line, {"phase": "eval", "when": when, **result})
    return result


def main(argv=None, hooks=None):
    """One run; `hooks` (a Hooks) for the research tools' variants beyond the paper."""
    args = parse_args(argv := sys.argv[1:] if argv is None else list(argv))
    run = setup.Run(args, hooks or Hooks(), argv)
    log = run.log

    # Set-up. Everything that can fail on the user's input comes before the output folder is made.
    tokenizer = setup.load_tokenizer(args, run.hooks.task)
    train_pairs, heldout_pairs = setup.load_pairs(args, tokenizer, run.hooks.task)
    if len(train_pairs) < run.world_size:
        raise SystemExit(f"error: too few training pairs ({len(train_pairs)}) for "
                         f"{run.world_size} processes: each process needs at least one")
    policy = setup.build_model(args, run.device, tokenizer, run.rank)
    # refuses a sampler that cannot run this model, and lengths it cannot hold
    sampling.choose_method(policy, args.sampler, run.device.type == "cuda")
    warnings = setup.check_fit(args, policy.config, train_pairs, heldout_pairs,
                               count_steps(args, len(train_pairs)))
    resume_path = checkpoints.find_resume_checkpoint(args) if args.resume else None
    resume = checkpoints.load_checkpoint(resume_path, args, run.world_size) if resume_path else None
    started_over = checkpoints.make_output_dir(args, resume_path, run.rank, run.world_size)
    run.start_log(args, resume)  # metrics.jsonl, and --report-to's tracker
    log(f"model: {setup.model_note(args, run.autocast)}, "
        f"{sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, on {run.device}"
        f"{f' x {run.world_size} processes' if run.world_size > 1 else ''}; "
        f"{len(train_pairs)} training pairs, {len(heldout_pairs)} held-out")
    for warning in [started_over, *warnings] if started_over else warnings:
        log(warning, {"phase": "warning", "message": warning})

    # Reference. Algorithm 1 starts from pi_theta = pi_ref, a frozen copy of the starting policy
    # (the tiny model's after its SFT; on --resume, that of the run that wrote the checkpoint).
    if args.model is None and not resume:
        run.hooks.sft(policy, train_pairs, tokenizer, args, run.device, run.autocast, log)
    if args.fsdp:  # both sharded, from rank 0's weights
        policy, ref = distributed.fsdp(policy, run.device, isinstance(run.autocast, torch.autocast))
    elif args.lora_r:  # one copy of the weights: pi_ref is the policy with its adapters off
        policy, ref = lora.wrap(policy, args)
    else:
        ref = copy.deepcopy(policy).requires_grad_(False).eval()
    if resume:
        checkpoints.load_models(policy, ref, resume)

    # Evaluation before the loop: the starting policy's held-out numbers.
    before = resume["before"] if resume else held_out(policy, ref, heldout_pairs, tokenizer, args,
                                                      run, "before")

    # Loop.
    history = train_loop(policy, ref, train_pairs, tokenizer, args, run, resume, before,
                         heldout_pairs)

    # Evaluation after the loop: the same numbers, and samples scored by the built-in task's judge.
    after = held_out(policy, ref, heldout_pairs, tokenizer, args, run, "after")

    # Save.
    folder = os.path.join(args.output_dir, "policy")
    saved = checkpoints.save_policy(policy, tokenizer, folder, run.rank, args.fsdp)
    curves = plots.run_curves(args.output_dir) if run.rank == 0 else None  # with matplotlib only
    log(f"saved the policy and tokenizer to {saved} and the metrics to {run.metrics_path}"
        + (f" (curves: {curves})" if curves else ""))
    run.close()
    return {"before": before, "after": after, "history": history, "output_dir": args.output_dir}


if __name__ == "__main__":
    first = int(os.environ.get("RANK", 0)) == 0  # under torchrun, every process meets the error
    try:
        main()
    except (data.DataError, sampling.SamplerError) as error:  # the message says what to fix
        sys.exit(f"error: {error}" if first else 1)
    except SystemExit as error:  # one message is enough
        sys.exit(error.code if first or not isinstance(error.code, str) else 1)
