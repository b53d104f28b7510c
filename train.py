"""Train a causal LM with TI-DPO (or DPO) in a plain PyTorch loop.

    python train.py                                  # built-in task, tiny model, offline
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl
    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, one process per GPU/CPU share

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
from torch.profiler import record_function  # labels the parts of a step for bench.py --bench-profile

import checkpoints
import data
import distributed
import memory
import tidpo
import evaluate
import sampling
from sampling import sample

# ----------------------------------------------------------------------------- set-up: flags, tokenizer, data, model


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and shows each flag's default, unless the default is None
    (those flags say in their help what happens when they are left out)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(description=__doc__):
    """train.py's flags (bench.py adds its own to these)."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    a = p.add_argument_group("model and data")
    a.add_argument("--model", default=None, help="hub name or local folder of a causal LM "
                   "(AutoModelForCausalLM); default: a tiny Llama built from a config, trained on the built-in task")
    a.add_argument("--data", default=None, help="preference JSONL: {prompt, chosen, rejected} as strings or as "
                   "lists of {role, content} messages; default: the built-in task")
    a.add_argument("--eval-data", default=None, help="held-out JSONL; default: the built-in held-out split, or "
                   "the last 5%% (at least 1, at most 256) of --data")
    a.add_argument("--max-length", type=int, default=256, help="prompt + response tokens; the prompt is cut "
                   "from the left first, then the response")
    a.add_argument("--label-noise", type=float, default=0.0, help="built-in task: fraction of training pairs "
                   "with chosen and rejected swapped")
    a.add_argument("--task", choices=data.SETTINGS, default="default", help="built-in task's setting: default, "
                   "or spurious (each response ends with a cue sentence that sides with the chosen response in "
                   "90%% of the training pairs and with the rejected one in every held-out pair)")
    a.add_argument("--output-dir", default=None, help="where the policy, tokenizer, metrics and checkpoints go; "
                   "must not hold an earlier run unless --resume continues it; default: runs/<loss>-<date-time>")

    a = p.add_argument_group("loss")
    a.add_argument("--loss", choices=["tidpo", "dpo"], default="tidpo", help="tidpo: Eq. 14; dpo: Eq. 3")
    a.add_argument("--beta", type=float, default=0.1, help="inverse temperature of the preference margin")
    a.add_argument("--gamma", type=float, default=0.1, help="weight of the triplet loss (0: no triplet, no anchors)")
    a.add_argument("--lam", type=float, default=0.7, help="lambda of Eq. 8: share of the attribution in the "
                   "weights (1: no Gaussian prior, 0: prior only)")
    a.add_argument("--margin", type=float, default=0.01, help="alpha of the triplet loss, Eq. 13")
    a.add_argument("--weight-scale", choices=["mean", "sum"], default="mean", help="mean: weights average 1 "
                   "over a response (uniform = DPO); sum: Eq. 8 as written (weights sum to 1)")
    a.add_argument("--weights", choices=["hybrid", "uniform", "random", "oracle"], default="hybrid", help="tidpo "
                   "token weights: hybrid (Eq. 8), uniform (all 1), random (fresh positive weights scaled like "
                   "hybrid), oracle (built-in task only: the known critical tokens, scaled by --oracle-scale)")
    a.add_argument("--oracle-scale", choices=["unit", "hybrid"], default="unit", help="--weights oracle: unit "
                   "(1 on each critical token, 0 elsewhere: DPO on the critical tokens alone), or hybrid (the "
                   "critical tokens as the attribution of Eq. 8, with --lam and --weight-scale)")
    a.add_argument("--kl-alpha", type=float, default=0.0, help="weight of TDPO2's sequential KL, as in the "
                   "authors' release; 0.5 in the paper's reported configuration, 0 is Eq. 14 as written")

    a = p.add_argument_group("anchor sampling (triplet) and evaluation samples")
    a.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled response")
    a.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    a.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    a.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: the smallest set of "
                   "tokens whose probability reaches p")
    a.add_argument("--min-new-tokens", type=int, default=0, help="sampled responses are at least this long")
    a.add_argument("--sampler", choices=sampling.METHODS, default="auto", help="dynamic, static, graph (static in "
                   "a CUDA graph); auto: graph on CUDA unless the model has sliding-window attention, else dynamic")

    a = p.add_argument_group("optimization")
    a.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    a.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs, when "
                   "--steps is not given")
    a.add_argument("--batch-size", type=int, default=16, help="pairs per micro-batch, all processes together: "
                   "under torchrun each process takes its share of every micro-batch (at least one pair)")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a.add_argument("--lr", type=float, default=None, help="default: 5e-4 for the built-in tiny model, 1e-6 "
                   "with --model")
    a.add_argument("--optimizer", choices=["adamw", "rmsprop"], default="adamw", help="the authors' release "
                   "used rmsprop with lr 5e-6 and 150 warmup steps")
    a.add_argument("--warmup-steps", type=int, default=10, help="linear warmup, then constant")
    a.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    a.add_argument("--gradient-checkpointing", action="store_true", help="the policy recomputes each layer's "
                   "activations in the backward instead of keeping them: less memory, a forward more of compute")
    a.add_argument("--sft-steps", type=int, default=300, help="built-in model only: SFT steps before TI-DPO")
    a.add_argument("--sft-lr", type=float, default=3e-3, help="learning rate of that SFT")
    a.add_argument("--seed", type=int, default=0, help="seeds the model, data order, sampling and the "
                   "built-in task")
    a.add_argument("--log-every", type=int, default=10, help="steps per progress line")
    a.add_argument("--device", default=None, help="cuda or cpu; default: cuda when available")
    a.add_argument("--fp32", action="store_true", help="CUDA: compute in float32 instead of bfloat16 autocast "
                   "(slower; for runs whose numbers overflow in bfloat16)")

    a = p.add_argument_group("checkpoints")
    a.add_argument("--save-every", type=int, default=0, help="write a checkpoint (policy, optimizer, scheduler, "
                   "random states, data position) to <output-dir>/checkpoints every N steps and at the last "
                   "step (0: none)")
    a.add_argument("--keep-last", type=int, default=2, help="checkpoints kept; older ones are deleted")
    a.add_argument("--resume", default=None, metavar="PATH|latest", help="continue a run from a checkpoint "
                   "file, or from the newest one in --output-dir ('latest'); the run's other flags must be "
                   "the same, except " + ", ".join("--" + name.replace("_", "-") for name in checkpoints.MAY_CHANGE_ON_RESUME))
    return p


def parse_args(argv=None, parser=None):
    """The flags, checked: a bad value stops here with a usage error, not as a crash later."""
    p = parser or build_parser()
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-6 if args.model else 5e-4
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    for wrong, message in [
        (args.steps is not None and args.steps < 1, f"--steps must be at least 1, got {args.steps}"),
        (not args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.batch_size < world_size, f"--batch-size {args.batch_size} is smaller than the {world_size} "
                                       "processes: each process needs at least one pair of every micro-batch"),
        (args.grad_accum < 1, f"--grad-accum must be at least 1, got {args.grad_accum}"),
        (not args.lr > 0, f"--lr must be positive, got {args.lr}"),
        (not args.beta > 0, f"--beta must be positive, got {args.beta}"),
        (not 0 <= args.lam <= 1, f"--lam must be between 0 and 1, got {args.lam}"),
        (not args.gamma >= 0, f"--gamma must be at least 0, got {args.gamma}"),
        (not args.margin >= 0, f"--margin must be at least 0, got {args.margin}"),
        (not args.kl_alpha >= 0, f"--kl-alpha must be at least 0, got {args.kl_alpha}"),
        (not 0 <= args.label_noise <= 1, f"--label-noise must be between 0 and 1, got {args.label_noise}"),
        (args.max_length < 2, f"--max-length must be at least 2 (a prompt and a response token), got "
                              f"{args.max_length}"),
        (args.max_new_tokens < 1, f"--max-new-tokens must be at least 1, got {args.max_new_tokens}"),
        (not 0 <= args.min_new_tokens <= args.max_new_tokens, f"--min-new-tokens must be between 0 and "
                                                              f"--max-new-tokens, got {args.min_new_tokens}"),
        (not args.temperature >= 0, f"--temperature must be at least 0 (0: greedy), got {args.temperature}"),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (not args.warmup_steps >= 0, f"--warmup-steps must be at least 0, got {args.warmup_steps}"),
        (not args.max_grad_norm >= 0, f"--max-grad-norm must be at least 0, got {args.max_grad_norm}"),
        (args.sft_steps < 0, f"--sft-steps must be at least 0, got {args.sft_steps}"),
        (args.log_every < 1, f"--log-every must be at least 1, got {args.log_every}"),
        (args.save_every < 0, f"--save-every must be at least 0, got {args.save_every}"),
        (args.keep_last < 1, f"--keep-last must be at least 1, got {args.keep_last}"),
        (args.weights == "oracle" and args.data is not None, "--weights oracle needs the known critical tokens of "
                                                             "the built-in task; it cannot be used with --data"),
        (args.task != "default" and args.data is not None, f"--task {args.task} is a setting of the built-in "
                                                           "task; it cannot be used with --data"),
    ]:
        if wrong:
            p.error(message)
    return args




def load_tokenizer(args):
    """The model's own tokenizer, or, for the tiny model built from scratch, a word-level tokenizer
    trained on the run's texts (the built-in task, or the --data and --eval-data records), so that
    every word of the data has a token of its own and none is encoded as <unk>."""
    if args.model is not None:
        from transformers import AutoTokenizer

        tokenizer = from_pretrained(AutoTokenizer, args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if args.data is None:
        train, heldout = data.builtin_task(seed=args.seed, setting=args.task)
        records = train + heldout
    else:
        records = data.load_jsonl(args.data) + (data.load_jsonl(args.eval_data) if args.eval_data else [])
        conversational = [r["source"] for r in records if not isinstance(r["prompt"], str)]
        if conversational:
            raise data.DataError(f"{conversational[0]}: the record is conversational (lists of messages), but the "
                                 "tiny model's tokenizer, trained from scratch, has no chat template: give --model, "
                                 "whose tokenizer has one, or use plain-text records")
    return data.build_tokenizer([r[field] for r in records for field in data.FIELDS])


def load_data(args, tokenizer):
    """Encoded (train, held-out) pairs: lists of data.encode_pair dicts."""
    if args.data is None:
        train, heldout = data.builtin_task(seed=args.seed, label_noise=args.label_noise, setting=args.task)
        return (data.encode_builtin(tokenizer, train, args.max_length),
                data.encode_builtin(tokenizer, heldout, args.max_length))

    def encode(records):
        return [data.encode_pair(tokenizer, *data.render(tokenizer, r), args.max_length, r["source"])
                for r in records]

    records = data.load_jsonl(args.data)
    if args.eval_data:
        return encode(records), encode(data.load_jsonl(args.eval_data))
    if len(records) < 2:
        raise data.DataError(f"{args.data}: needs at least 2 records (one is held out), or --eval-data")
    n_heldout = min(256, max(1, len(records) // 20))
    return encode(records[:-n_heldout]), encode(records[-n_heldout:])


def from_pretrained(auto_class, name, **options):
    if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise SystemExit(f"error: --model {name}: no such folder (a hub name looks like 'org/name')")
    try:
        return auto_class.from_pretrained(name, **options)
    except (OSError, ValueError) as error:  # no such folder or hub name, no network, not a causal LM
        raise SystemExit(f"error: --model {name}: cannot load it with {auto_class.__name__}: {error}")


def build_model(args, device, tokenizer):
    """The policy: --model by hub name or folder, or a tiny Llama built from a config for the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        # Float32 weights whatever the checkpoint's dtype: in bfloat16, updates at lr 1e-6 would round away
        policy = from_pretrained(AutoModelForCausalLM, args.model, dtype=torch.float32)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        policy = LlamaForCausalLM(config)
    # Dropout stays off for good: the attribution and log-probs must be reproducible forwards.
    return policy.to(device).eval()


def dtypes_note(args, autocast):
    """--model: the dtype its checkpoint was saved in and the one the policy trains in."""
    from transformers import AutoConfig

    saved = str(from_pretrained(AutoConfig, args.model).dtype or torch.float32).removeprefix("torch.")
    autocast_dtype = isinstance(autocast, torch.autocast) and str(autocast.fast_dtype).removeprefix("torch.")
    return f" (saved in {saved}, trained in float32{f' under {autocast_dtype} autocast' if autocast_dtype else ''})"


# ----------------------------------------------------------------------------- the reference


def sft(model, pairs, tokenizer, args, device, autocast, log):
    """Supervised fine-tuning on chosen AND rejected responses, so that the reference built from
    this model has no preference between them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    while step < args.sft_steps:
        for batch in data.batches(pairs, args.batch_size, tokenizer.pad_token_id, generator):
            stacked = data.stack_pair(batch, tokenizer.pad_token_id)
            input_ids, attention_mask, response_mask = (tensor.to(device) for tensor in stacked)
            with autocast:
                logits = tidpo.forward_logits(model, input_ids, attention_mask)
                logps = memory.token_logps(logits, input_ids, response_mask)
            loss = -logps.sum() / response_mask.sum()
            loss.backward()
            optimizer.step()
            # cleared after the step, so that the last SFT gradient is not added to the first
            # preference step's (that loop only clears after its own steps)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % (args.log_every * 10) == 0 or step == args.sft_steps:
                log(f"sft step {step}/{args.sft_steps} | loss {loss.item():.4f}")
            if step == args.sft_steps:
                break


# ----------------------------------------------------------------------------- one step of TI-DPO (Eq. 14) or DPO (Eq. 3)


def reference_logps(ref, input_ids, attention_mask, response_mask, autocast):
    """token_logps of the frozen reference, with its logits (for the optional KL term)."""
    with torch.inference_mode(), autocast:
        logits = tidpo.forward_logits(ref, input_ids, attention_mask)
        logps = memory.token_logps(logits, input_ids, response_mask)
    return logits, logps.clone()  # inference tensors cannot be saved for backward: a plain copy can


def tidpo_step(policy, ref, batch, tokenizer, args, device, autocast, hooks=None):
    """Loss and metrics of one micro-batch.

    Chosen and rejected go through each model in one forward. The policy's forward also gives the
    attribution (one backward to the embeddings, no second forward). Anchors, when the triplet is
    on, are sampled first and get a forward of their own: they need log-probs, not attribution.

    `policy` may be a DistributedDataParallel wrapper. The forward of chosen and rejected (with
    the attribution) goes through it, so that DDP's hooks average the gradients over the processes
    in the backward; sampling and the anchors' forward use the module itself, since DDP expects one
    forward per backward. The anchors' gradients are not lost: autograd adds up all of a
    parameter's gradient in the backward before DDP's hook for that parameter fires.

    `hooks` lets experiments.py swap in a variant beyond the paper: {"triplet": a function with
    tidpo.triplet_loss's arguments, "attribution": one with tidpo.gradient_attribution's};
    "diagnostics": True turns on evaluate's research metrics.
    """
    triplet = (hooks or {}).get("triplet", tidpo.triplet_loss)
    module = distributed.unwrap(policy)
    n = len(batch["chosen_input_ids"])
    tidpo_on = args.loss == "tidpo"
    if tidpo_on and args.gamma != 0:
        # Eq. 13's anchor: a response sampled from the current policy for the same prompt, without
        # gradient; its per-token log-ratios are then computed with gradient.
        with autocast, record_function("sample anchors"):
            anchor = sample(module, batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device),
                            tokenizer, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, method=args.sampler)
        with autocast, record_function("anchor forwards"):
            anchor_logps = memory.token_logps(tidpo.forward_logits(module, *anchor[:2]), anchor[0], anchor[2])
        # outside the `with`: reference_logps enters the autocast itself (nested, it would stay on after the exit)
        anchor_logratios = anchor_logps - reference_logps(ref, *anchor, autocast)[1]  # [B, L_a], per token
        anchor_mask = anchor[2]
    else:
        anchor_logratios = anchor_mask = None

    stacked = data.stack_pair(batch, tokenizer.pad_token_id)  # chosen rows [:n], rejected rows [n:]
    input_ids, attention_mask, response_mask = (tensor.to(device) for tensor in stacked)
    with record_function("reference forward"):
        ref_logits, ref_logps = reference_logps(ref, input_ids, attention_mask, response_mask, autocast)
    kl_on = tidpo_on and args.kl_alpha != 0
    if not kl_on:
        ref_logits = None  # [2B, L, V]: free it before the policy's forward needs the memory
    with autocast, record_function("policy forward (+ attribution)"):
        if tidpo_on and args.weights == "hybrid":
            attribute = (hooks or {}).get("attribution", tidpo.gradient_attribution)
            logits, importance = attribute(policy, input_ids, attention_mask, response_mask)
        else:
            logits = tidpo.forward_logits(policy, input_ids, attention_mask)
        logps = memory.token_logps(logits, input_ids, response_mask)

    if not tidpo_on or args.weights == "uniform":
        weights = response_mask.float()
    elif args.weights == "random":
        weights = tidpo.hybrid_weights(torch.rand(response_mask.shape, device=device), response_mask, lam=1.0,
                                       scale=args.weight_scale)
    elif args.weights == "oracle":
        # Weights only on the known critical tokens: the placement no attribution can beat. "unit" keeps
        # DPO's per-token scale (weight 1), so the oracle differs from DPO only in which tokens count.
        # "hybrid" passes them through Eq. 8 as a perfect attribution would; at mean scale and lambda 1
        # each critical token then weighs T/k (about 6-8 on the built-in task), like a beta T/k times larger.
        critical = data.stack_critical(batch, input_ids.shape[1]).to(device, torch.float32)
        weights = critical if args.oracle_scale == "unit" else tidpo.hybrid_weights(
            critical, response_mask, lam=args.lam, scale=args.weight_scale)
    else:
        weights = tidpo.hybrid_weights(importance, response_mask, lam=args.lam, scale=args.weight_scale)

    kl = {}
    if kl_on:
        kl_both = memory.sequence_kl(logits, ref_logits.clone(), response_mask)
        kl = {"kl_chosen": kl_both[:n], "kl_rejected": kl_both[n:]}
    loss, metrics = tidpo.tidpo_loss(
        logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], weights[:n], weights[n:], beta=args.beta,
        anchor_logratios=anchor_logratios, anchor_mask=anchor_mask, chosen_mask=response_mask[:n],
        rejected_mask=response_mask[n:], gamma=args.gamma if tidpo_on else 0.0, margin=args.margin,
        kl_alpha=args.kl_alpha if tidpo_on else 0.0, triplet=triplet, **kl)
    if anchor_logratios is not None and "flipped" in batch:  # built-in task: where the hinge acts
        metrics.update(evaluate.triplet_active_by_label(
            logps - ref_logps, response_mask, anchor_logratios, anchor_mask, batch["flipped"].to(device),
            args.margin, triplet))
    if kl:  # the KL term sits inside loss/dpo_w; logged apart, so that a bad KL can be told from a bad margin
        metrics["loss/kl"] = (args.kl_alpha * (kl["kl_rejected"] - kl["kl_chosen"])).detach().mean()
    return loss, metrics


# ----------------------------------------------------------------------------- the loop


def make_optimizer(policy, args):
    """The optimizer and its schedule: linear warmup over --warmup-steps, then constant."""
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup(s, args))
    return optimizer, scheduler


def warmup(step, args):
    return min(1.0, (step + 1) / (args.warmup_steps + 1))


def train_loop(policy, ref, train_pairs, tokenizer, args, run, resume, before):
    """The preference steps; returns the history of logged means.

    Each step: --grad-accum micro-batches of tidpo_step and backward, one look at the step's
    numbers (the only wait for the device), clipping, the update. Under torchrun the policy runs
    through DistributedDataParallel, which averages the gradients over the processes.
    """
    device, autocast, rank, world_size, log = run.device, run.autocast, run.rank, run.world_size, run.log
    # in training mode until the end of the loop
    end_checkpointing = memory.checkpoint_activations(policy) if args.gradient_checkpointing else policy.eval
    train_policy = distributed.wrap(policy, device, world_size)
    optimizer, scheduler = make_optimizer(policy, args)
    steps = args.steps or max(1, math.ceil(args.epochs * len(train_pairs) / (args.batch_size * args.grad_accum)))
    generator = torch.Generator().manual_seed(args.seed)
    # The data position: the generator's state when this epoch's order was drawn, and how many of
    # the epoch's batches were taken. A checkpoint keeps both, and a resumed run redraws the same
    # order and skips what was taken.
    epoch_start, taken, stream = None, 0, iter(())
    sums, count, history, first_step = {}, 0, [], 1
    torch.manual_seed(args.seed + rank)  # each process samples its anchors from a stream of its own
    checkpoint = None  # the newest checkpoint this run wrote or resumed from
    if resume:  # the optimizer, schedule, random streams, data position and log window as saved
        epoch_start, taken, sums, count, history, first_step, checkpoint = checkpoints.restore_loop(
            resume, optimizer, scheduler, generator, lambda step: warmup(step, args), args.lr, device, rank)
        stream = data.batches(train_pairs, args.batch_size, tokenizer.pad_token_id, generator, skip=taken)
        log(f"resumed from {checkpoint}: step {resume['step']} of {steps} done",
            {"phase": "resume", "step": resume["step"], "checkpoint": checkpoint})
    reference_path = os.path.join(args.output_dir, "checkpoints", "reference.pt")
    if args.save_every and rank == 0 and not os.path.exists(reference_path):
        os.makedirs(os.path.dirname(reference_path), exist_ok=True)
        checkpoints.save_atomically(ref.state_dict(), reference_path)  # once: every checkpoint needs it
    if device.type == "cuda" and not args.fp32:
        # after the reference is saved: its file keeps the float32 weights (a resumed run may use --fp32)
        static_sampler.linear_weights_in(ref, torch.bfloat16)

    t0 = time.perf_counter()
    for step in range(first_step, steps + 1):
        step_sums = {}
        for micro_step in range(args.grad_accum):
            batch = next(stream, None)
            # A new epoch. A last batch with fewer pairs than processes is left out (never in one process).
            if batch is None or len(batch["chosen_input_ids"]) < world_size:
                epoch_start, taken = generator.get_state(), 0
                stream = data.batches(train_pairs, args.batch_size, tokenizer.pad_token_id, generator)
                batch = next(stream)
            taken += 1
            batch, share = distributed.shard(batch, rank, world_size)
            with distributed.sync_unless(train_policy, world_size, last=micro_step == args.grad_accum - 1):
                loss, metrics = tidpo_step(train_policy, ref, batch, tokenizer, args, device, autocast, run.hooks)
                # DDP averages the processes' gradients. Weighting each process's batch-mean loss by
                # its share of the pairs times the number of processes makes that average the
                # gradient of the whole batch's mean loss, however the pairs split.
                (loss * (share * world_size / args.grad_accum)).backward()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                step_sums[name] = step_sums.get(name, 0) + value * (share / args.grad_accum)
        names = list(step_sums)
        # the processes' shares add up to the whole batch's means
        values = distributed.all_reduce_sum(torch.stack([step_sums[name] for name in names]), world_size)
        if args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in policy.parameters() if p.grad is not None])
        # The step's one wait for the device: its numbers, checked before the update is applied.
        values = dict(zip([*names, "grad_norm"], torch.cat([values, grad_norm.reshape(1).to(values)]).tolist()))
        if not all(math.isfinite(value) for value in values.values()):
            raise SystemExit(checkpoints.non_finite_message(step, values, args, device, checkpoint))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        count += 1

        if step % args.log_every == 0 or step == steps:
            means = evaluate.with_shares({name: value / count for name, value in sums.items()})
            seconds = (time.perf_counter() - t0) / count
            # The training batch's accuracy and margin are those of the WEIGHTED rewards (Eq. 11);
            # the held-out accuracy and margin use the plain, unweighted DPO reward.
            log(f"step {step}/{steps} | loss {means['loss']:.4f} | weighted acc {means['rewards/accuracies']:.2f} | "
                f"weighted margin {means['rewards/margins']:.4f} | {seconds:.2f} s/step",
                {"phase": "train", "step": step, "seconds_per_step": seconds, **means})
            history.append({"step": step, **means})
            sums, count, t0 = {}, 0, time.perf_counter()
        if args.save_every and (step % args.save_every == 0 or step == steps):
            state = {"format": checkpoints.CHECKPOINT_FORMAT, "step": step, "args": vars(args), "world_size": world_size,
                     "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(),
                     "random": checkpoints.random_states(device, world_size),
                     "data": {"epoch_start": epoch_start, "taken": taken},
                     "window": {"sums": sums, "count": count}, "history": history, "before": before}
            if rank == 0:
                checkpoint = checkpoints.save_checkpoint(state, args.output_dir, args.keep_last)
    end_checkpointing()
    return history


# ----------------------------------------------------------------------------- the run: main() and its phases


def pick_device(args):
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def autocast_for(device, args):
    """bfloat16 autocast on CUDA (unless --fp32); plain float32 on the CPU."""
    use_bf16 = device.type == "cuda" and not args.fp32
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()


def setup_run(args):
    """Device, processes and the run's log: a namespace that the phases share."""
    torch.manual_seed(args.seed)
    rank, world_size, device = distributed.setup(pick_device(args))
    autocast = autocast_for(device, args)
    run = argparse.Namespace(device=device, autocast=autocast, rank=rank, world_size=world_size, metrics_path=None)

    def log(line, record=None):
        if rank != 0:  # every process computes the same numbers; one of them reports
            return
        print(line, flush=True)
        if record is not None and run.metrics_path:
            with open(run.metrics_path, "a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")

    run.log = log
    return run


def main(argv=None, hooks=None):
    """One run; `hooks` (see tidpo_step) are for experiments.py's variants beyond the paper."""
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    run = setup_run(args)
    run.hooks = hooks or {}
    log = run.log

    # Set-up. Everything that can fail on the user's input comes before the output folder is made.
    tokenizer = load_tokenizer(args)
    train_pairs, heldout_pairs = load_data(args, tokenizer)
    if len(train_pairs) < run.world_size:
        raise SystemExit(f"error: too few training pairs ({len(train_pairs)}) for {run.world_size} processes: "
                         f"each process needs at least one")
    policy = build_model(args, run.device, tokenizer)
    sampling.choose_method(policy, args.sampler, run.device.type == "cuda")  # refuses a sampler the model cannot run
    resume_path = checkpoints.find_resume_checkpoint(args) if args.resume else None
    resume = checkpoints.load_checkpoint(resume_path, args, run.world_size) if resume_path else None
    checkpoints.make_output_dir(args, resume_path, run.rank, run.world_size)
    run.metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    tokenizer_note = "" if args.model or args.data is None else f", tokenizer trained on {args.data}"
    model_note = args.model + dtypes_note(args, run.autocast) if args.model else "tiny Llama (built-in)"
    log(f"model: {model_note}, {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M "
        f"parameters, on {run.device}{f' x {run.world_size} processes' if run.world_size > 1 else ''}"
        f"{tokenizer_note}; {len(train_pairs)} training pairs, {len(heldout_pairs)} held-out")

    # Reference. Algorithm 1 starts from pi_theta = pi_ref, a frozen copy of the starting policy
    # (for the tiny model, after its SFT; on --resume, the reference of the run that wrote the checkpoint).
    if resume:
        checkpoints.load_weights(policy, resume["policy"], resume_path)
    elif args.model is None:
        sft(policy, train_pairs, tokenizer, args, run.device, run.autocast, log)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    if resume:
        checkpoints.load_weights(ref, resume["reference"], resume_path)
        resume["path"] = resume_path

    # Evaluation before the loop: the starting policy's held-out numbers.
    if resume:
        before = resume["before"]
    else:
        before = evaluate.evaluate(policy, ref, heldout_pairs, tokenizer, args, run.device, run.autocast,
                                   with_samples=False, diagnostics=run.hooks.get("diagnostics", False))
        log(f"held-out before: accuracy {before['accuracy']:.3f}, margin {before['margin']:.4f}",
            {"phase": "eval", "when": "before", **before})

    # Loop.
    history = train_loop(policy, ref, train_pairs, tokenizer, args, run, resume, before)

    # Evaluation after the loop: the same numbers, and samples scored by the built-in task's judge.
    judge = args.data is None
    after = evaluate.evaluate(policy, ref, heldout_pairs, tokenizer, args, run.device, run.autocast,
                              with_samples=judge, diagnostics=run.hooks.get("diagnostics", False))
    line = f"held-out after: accuracy {after['accuracy']:.3f}, margin {after['margin']:.4f}"
    if judge:
        line += (f"; judge score of samples: policy {after['judge/policy']:+.3f}, reference "
                 f"{after['judge/reference']:+.3f}, policy wins {after['win_rate']:.3f}")
    log(line, {"phase": "eval", "when": "after", **after})

    # Save.
    save(policy, tokenizer, args, run)
    return {"before": before, "after": after, "history": history, "output_dir": args.output_dir}


def save(policy, tokenizer, args, run):
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # the save's progress bar would interleave with the log lines
    folder = os.path.join(args.output_dir, "policy")
    if run.rank == 0:
        policy.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    run.log(f"saved the policy and tokenizer to {folder} and the metrics to {run.metrics_path}")


if __name__ == "__main__":
    try:
        main()
    except (data.DataError, sampling.SamplerError) as error:  # the user's data or flags: the message says which
        sys.exit(f"error: {error}" if int(os.environ.get("RANK", 0)) == 0 else 1)
    except SystemExit as error:
        # Under torchrun every process meets the same error; one message is enough.
        sys.exit(error.code if int(os.environ.get("RANK", 0)) == 0 or not isinstance(error.code, str) else 1)
