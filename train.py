"""Train a causal LM with TI-DPO (or DPO) in a plain PyTorch loop.

    python train.py                                  # built-in task, tiny model, offline
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --data prefs.jsonl

    torchrun --nproc_per_node=2 train.py ...         # DistributedDataParallel, one process per GPU/CPU share

The default run builds a tiny Llama from a config, trains a tokenizer on the built-in preference
task, fine-tunes the model on chosen and rejected responses alike (SFT, so the reference has no
preference between safe and risky), freezes a copy as pi_ref and trains the policy with TI-DPO.
It evaluates on held-out pairs before and after and saves the policy with save_pretrained.
With --save-every N it also writes checkpoints, and --resume latest continues a stopped run.
"""

import argparse
import atexit
import collections
import copy
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from datetime import datetime

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function  # labels the phases of a step for --bench-profile

import data
import tidpo

# ----------------------------------------------------------------------------- configuration


def parse_args(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # keeps the description's layout and shows each flag's default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
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
    a.add_argument("--weights", choices=["hybrid", "uniform", "random"], default="hybrid", help="tidpo token "
                   "weights: hybrid (Eq. 8), uniform (all 1), random (fresh positive weights scaled like hybrid)")
    a.add_argument("--kl-alpha", type=float, default=0.0, help="weight of TDPO2's sequential KL, as in the "
                   "authors' release (they use 0.5); 0 is the paper's Eq. 14")

    a = p.add_argument_group("anchor sampling (triplet) and evaluation samples")
    a.add_argument("--max-new-tokens", type=int, default=64, help="longest sampled response")
    a.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    a.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    a.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: the smallest set of "
                   "tokens whose probability reaches p")
    a.add_argument("--min-new-tokens", type=int, default=0, help="sampled responses are at least this long")

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
                   "the same, except " + ", ".join("--" + name.replace("_", "-") for name in MAY_CHANGE_ON_RESUME))

    a = p.add_argument_group("benchmark (--bench): DPO vs TI-DPO step time and memory on random tokens")
    a.add_argument("--bench", action="store_true", help="time training steps of dpo, tidpo without triplet "
                   "and full tidpo on the same batches, print a table and a line of ratios")
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
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-6 if args.model else 5e-4
    # Refused here rather than as a crash (or a silently wrong run) later.
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
    ]:
        if wrong:
            p.error(message)
    return args


# ----------------------------------------------------------------------------- data


def load_data(args, tokenizer):
    """Encoded (train, held-out) pairs: lists of data.encode_pair dicts."""
    if args.data is None:
        train, heldout = data.builtin_task(seed=args.seed, label_noise=args.label_noise)
        return (data.encode_builtin(tokenizer, train, args.max_length),
                data.encode_builtin(tokenizer, heldout, args.max_length))

    def encode(records):
        return [data.encode_pair(tokenizer, *data.render(tokenizer, r), args.max_length, r["source"])
                for r in records]

    records = data.load_jsonl(args.data)
    if args.eval_data:
        return encode(records), encode(data.load_jsonl(args.eval_data))
    n_heldout = min(256, max(1, len(records) // 20))
    if len(records) < 2:
        raise data.DataError(f"{args.data}: needs at least 2 records (one is held out), or --eval-data")
    return encode(records[:-n_heldout]), encode(records[-n_heldout:])


def batches(pairs, batch_size, pad_id, generator=None, skip=0):
    """Collated batches over `pairs`, shuffled by `generator` when one is given; the first `skip`
    batches of that order are left out (a resumed run continues its epoch)."""
    order = torch.randperm(len(pairs), generator=generator).tolist() if generator else range(len(pairs))
    order = list(order)
    for start in range(skip * batch_size, len(order), batch_size):
        yield data.collate([pairs[i] for i in order[start:start + batch_size]], pad_id)


def shard(batch, rank, world_size):
    """This process's rows of a collated batch, and their share of the batch's pairs. The rows are
    cut from the whole collated batch, so they keep the padding they would have in one process."""
    n = len(batch["chosen_input_ids"])
    start, end = n * rank // world_size, n * (rank + 1) // world_size
    return {name: value[start:end] for name, value in batch.items()}, (end - start) / n


def stack_rows(parts, pad_id):
    """Concatenate (input_ids, attention_mask, response_mask) triples along the batch, right-padding
    them to one length, so that chosen, rejected and anchors go through the model in one forward."""
    length = max(ids.shape[1] for ids, _, _ in parts)
    out = []
    for k, fill in ((0, pad_id), (1, 0), (2, 0)):
        out.append(torch.cat([torch.nn.functional.pad(p[k], (0, length - p[k].shape[1]), value=fill)
                              for p in parts]))
    return out


def rows(batch, side, device):
    return tuple(batch[f"{side}_{name}"].to(device) for name in ("input_ids", "attention_mask", "response_mask"))


# ----------------------------------------------------------------------------- model


def build_models(args, device, tokenizer):
    """(policy, tokenizer): a hub/local model by name, or a tiny Llama for the built-in task."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        policy = from_pretrained(AutoModelForCausalLM, args.model)
    else:
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        policy = LlamaForCausalLM(config)
    # Dropout stays off for good: the attribution and log-probs must be reproducible forwards.
    return policy.to(device).eval()


def from_pretrained(auto_class, name):
    if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise SystemExit(f"error: --model {name}: no such folder (a hub name looks like 'org/name')")
    try:
        return auto_class.from_pretrained(name)
    except (OSError, ValueError) as error:  # no such folder or hub name, no network, not a causal LM
        raise SystemExit(f"error: --model {name}: cannot load it with {auto_class.__name__}: {error}")


def load_tokenizer(args):
    if args.model is None:
        train, heldout = data.builtin_task(seed=args.seed)
        texts = [r[k] for r in train + heldout for k in ("prompt", "chosen", "rejected")]
        return data.build_tokenizer(texts)
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def forward_logits(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=tidpo.position_ids(attention_mask)).logits


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, tokenizer, args):
    """Responses sampled from `model` for left-padded prompts, as (input_ids, attention_mask,
    response_mask) of prompt + response; a response ends at its first end-of-sequence token.

    Temperature, then top-k, then top-p (nucleus), as in transformers' generate(). Written out
    because it runs at every TI-DPO step: with the KV cache, and top-p applied to the k kept
    tokens only, it avoids a sort over the whole vocabulary and generate()'s per-token machinery.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    positions = tidpo.position_ids(prompt_mask)[:, -1:]
    attention_mask = prompt_mask
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=tidpo.position_ids(prompt_mask),
                use_cache=True)
    finished = torch.zeros(prompt_ids.shape[0], 1, dtype=torch.bool, device=prompt_ids.device)
    tokens, response = [], []
    for step in range(args.max_new_tokens):
        logits = out.logits[:, -1].float()
        if step < args.min_new_tokens:
            logits[:, eos] = float("-inf")
        if args.temperature <= 0:  # greedy
            token = logits.argmax(-1, keepdim=True)
        else:
            k = logits.shape[-1] if args.top_k <= 0 else min(args.top_k, logits.shape[-1])
            top_logits, top_ids = (logits / args.temperature).topk(k, dim=-1)  # sorted, largest first
            probs = top_logits.softmax(-1)
            # top-p: keep the smallest prefix whose probability reaches top_p (the first token always)
            probs = probs * ((probs.cumsum(-1) - probs) < args.top_p)
            token = top_ids.gather(-1, torch.multinomial(probs, 1))
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(token)
        response.append(~finished)
        finished = finished | (token == eos)
        if step % 8 == 7 and bool(finished.all()):  # an occasional check: each one waits for the device
            break
        attention_mask = torch.cat([attention_mask, (~finished).long()], 1)
        positions = positions + 1
        out = model(input_ids=token, attention_mask=attention_mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    response = torch.cat(response, 1).long()
    return (torch.cat([prompt_ids, torch.cat(tokens, 1)], 1), torch.cat([prompt_mask, response], 1),
            torch.cat([torch.zeros_like(prompt_mask), response], 1))


# ----------------------------------------------------------------------------- one step


def reference_logps(ref, input_ids, attention_mask, response_mask, autocast):
    """token_logps of the frozen reference, with its logits (for the optional KL term)."""
    with torch.inference_mode(), autocast:
        logits = forward_logits(ref, input_ids, attention_mask)
        logps = tidpo.token_logps(logits, input_ids, response_mask)
    return logits, logps.clone()  # inference tensors cannot be saved for backward: a plain copy can


def tidpo_step(policy, ref, batch, tokenizer, args, device, autocast):
    """Loss and metrics of one micro-batch.

    Chosen and rejected go through each model in one forward. The policy's forward also gives the
    attribution (one backward to the embeddings, no second forward). Anchors, when the triplet is
    on, are sampled first and get a forward of their own: they need log-probs, not attribution.

    `policy` may be a DistributedDataParallel wrapper. The forward of chosen and rejected (with
    the attribution) goes through it, so that DDP's hooks average the gradients over the processes
    in the backward; sampling and the anchors' forward use the module itself, since DDP expects one
    forward per backward. The anchors' gradients are not lost: autograd adds up all of a
    parameter's gradient in the backward before DDP's hook for that parameter fires.
    """
    module = policy.module if isinstance(policy, DistributedDataParallel) else policy
    chosen, rejected = rows(batch, "chosen", device), rows(batch, "rejected", device)
    n = chosen[0].shape[0]
    tidpo_on = args.loss == "tidpo"
    if tidpo_on and args.gamma != 0:
        # METHOD.md 5: the anchor is sampled from the current policy, without gradient, and its
        # log-ratio d is then computed with gradient.
        with autocast, record_function("sample anchors"):
            anchor = sample(module, batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device),
                            tokenizer, args)
        with autocast, record_function("anchor forwards"):
            anchor_logps = tidpo.token_logps(forward_logits(module, *anchor[:2]), anchor[0], anchor[2])
            anchor_logratio = (anchor_logps - reference_logps(ref, *anchor, autocast)[1]).sum(-1)
    else:
        anchor_logratio = None

    input_ids, attention_mask, response_mask = stack_rows([chosen, rejected], tokenizer.pad_token_id)
    with record_function("reference forward"):
        ref_logits, ref_logps = reference_logps(ref, input_ids, attention_mask, response_mask, autocast)
    kl_on = tidpo_on and args.kl_alpha != 0
    if not kl_on:
        ref_logits = None  # [2B, L, V]: free it before the policy's forward needs the memory
    with autocast, record_function("policy forward (+ attribution)"):
        if tidpo_on and args.weights == "hybrid":
            logits, importance = tidpo.gradient_attribution(policy, input_ids, attention_mask, response_mask)
        else:
            logits = forward_logits(policy, input_ids, attention_mask)
        logps = tidpo.token_logps(logits, input_ids, response_mask)

    if not tidpo_on or args.weights == "uniform":
        weights = response_mask.float()
    elif args.weights == "random":
        weights = tidpo.hybrid_weights(torch.rand(response_mask.shape, device=device), response_mask, lam=1.0,
                                       scale=args.weight_scale)
    else:
        weights = tidpo.hybrid_weights(importance, response_mask, lam=args.lam, scale=args.weight_scale)

    kl = {}
    if kl_on:
        kl_both = tidpo.sequence_kl(logits, ref_logits.clone(), response_mask)
        kl = {"kl_chosen": kl_both[:n], "kl_rejected": kl_both[n:]}
    loss, metrics = tidpo.tidpo_loss(
        logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], weights[:n], weights[n:], beta=args.beta,
        anchor_logratio=anchor_logratio, gamma=args.gamma if tidpo_on else 0.0, margin=args.margin,
        kl_alpha=args.kl_alpha if tidpo_on else 0.0, **kl)
    if kl:  # the KL term sits inside loss/dpo_w; logged apart, so that a bad KL can be told from a bad margin
        metrics["loss/kl"] = (args.kl_alpha * (kl["kl_rejected"] - kl["kl_chosen"])).detach().mean()
    return loss, metrics


# ----------------------------------------------------------------------------- metrics
# Pure functions of lists and tensors, so that each can be checked on a hand-made case.


def distinct_n(sequences, n):
    """Distinct-n: unique n-grams / all n-grams, pooled over `sequences` (lists of tokens).

    N-grams stay inside one sequence. Example: "the cat saw the cat" has the bigrams (the, cat),
    (cat, saw), (saw, the), (the, cat): 3 unique of 4, Distinct-2 = 0.75. 0 when there is no n-gram.
    """
    ngrams = [tuple(sequence[i:i + n]) for sequence in sequences for i in range(len(sequence) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def token_entropy(sequences):
    """Entropy in bits of the unigram distribution of all tokens in `sequences`.

    Example: the tokens a, a, b, c have p = (1/2, 1/4, 1/4) and entropy 1.5 bits. 0 for no tokens.
    """
    counts = collections.Counter(token for sequence in sequences for token in sequence)
    total = sum(counts.values())
    return sum(-count / total * math.log2(count / total) for count in counts.values())


def win_rate(scores, baseline_scores):
    """Share of prompts on which `scores` beat `baseline_scores` (the same prompts, in the same
    order); a tie counts half, so two equal lists give 0.5."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError(f"need two equally long, non-empty lists, got {len(scores)} and {len(baseline_scores)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)) / len(scores)


def self_bleu(texts):
    """Self-BLEU (Zhu et al., 2018): the mean sentence BLEU (0-100, sacrebleu) of each text against
    all the other texts as references. Lower means more diverse samples."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)  # the setting sacrebleu recommends for single sentences
    scores = [bleu.sentence_score(text, texts[:i] + texts[i + 1:]).score for i, text in enumerate(texts)]
    return sum(scores) / len(scores)


def critical_share(weights, critical_mask, response_mask):
    """[B] the share of each row's total response weight that sits on its critical tokens.

    Args: weights, critical_mask, response_mask: [B, L]; critical tokens are response tokens.
    Uniform weights give (critical tokens) / (response tokens): the share a method has to beat.
    """
    weights = weights.float() * response_mask
    return (weights * critical_mask).sum(-1) / weights.sum(-1)


def topk_hit_rate(weights, critical_mask, response_mask):
    """[B] the share of the k highest-weighted response tokens that are critical, k = the row's
    number of critical tokens (nan for a row without one, e.g. truncated away).

    Weights tied at the k-th value share the places left among them evenly: the expected hit
    rate when ties are broken at random. So uniform weights score k / T, and the Gaussian prior,
    whose halves mirror each other, is not favoured by an arbitrary tie-break. Example: weights
    (2, 2, 2, 1), critical (1, 0, 0, 1): k = 2, three tokens tie for the two places, the critical
    one among them gets 2/3 of a place: 1/3.
    """
    response = response_mask.bool()
    critical = critical_mask.bool() & response
    weights = weights.float().masked_fill(~response, float("-inf"))
    k = critical.sum(-1)
    kth_largest = weights.sort(-1, descending=True).values.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))
    above, tied = weights > kth_largest, weights == kth_largest
    places_left = k - above.sum(-1)
    hits = (above & critical).sum(-1) + places_left * (tied & critical).sum(-1) / tied.sum(-1)
    return hits / k


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(policy, ref, pairs, tokenizer, args, device, autocast, with_samples):
    """The same held-out evaluation for every method.

    - accuracy, margin: the preference by the plain DPO implicit reward (weights 1, so every
      method is scored alike; ties count half).
    - weights/{kind}/{side}/{share,top_k} (pairs with known critical tokens: the built-in task):
      critical_share and topk_hit_rate of four weightings of the pair's tokens, from the policy's
      attribution: attribution alone (lambda 1), hybrid (--lam), prior alone (lambda 0), uniform.
    - with_samples (the built-in task's judge: safe phrases count up, risky ones down): the mean
      judge score of responses sampled from the policy and from the reference for the held-out
      prompts, the policy's win rate against the reference's response to the same prompt, and
      the diversity of the policy's samples: distinct_2, distinct_4, token_entropy, self_bleu.
    """
    correct, margins, placement = 0.0, [], collections.defaultdict(list)
    for batch in batches(pairs, args.batch_size, tokenizer.pad_token_id):
        chosen, rejected = rows(batch, "chosen", device), rows(batch, "rejected", device)
        n = chosen[0].shape[0]
        input_ids, attention_mask, response_mask = stack_rows([chosen, rejected], tokenizer.pad_token_id)
        critical = "chosen_critical_mask" in batch
        with autocast:
            if critical:  # the attribution's forward also gives the logits for the accuracy
                with torch.enable_grad():
                    policy_logits, importance = tidpo.gradient_attribution(policy, input_ids, attention_mask,
                                                                           response_mask)
                policy_logits = policy_logits.detach()
            else:
                policy_logits = forward_logits(policy, input_ids, attention_mask)
            logratio = (tidpo.token_logps(policy_logits, input_ids, response_mask)
                        - tidpo.token_logps(forward_logits(ref, input_ids, attention_mask), input_ids, response_mask))
        margin = args.beta * (logratio[:n].sum(-1) - logratio[n:].sum(-1))
        correct += (margin > 0).sum().item() + 0.5 * (margin == 0).sum().item()
        margins.append(margin.float())
        if critical:
            critical_mask = torch.cat([torch.nn.functional.pad(mask, (0, input_ids.shape[1] - mask.shape[1]))
                                       for mask in (batch["chosen_critical_mask"], batch["rejected_critical_mask"])])
            critical_mask = critical_mask.to(device)
            weightings = {"attribution": tidpo.hybrid_weights(importance, response_mask, lam=1.0),
                          "hybrid": tidpo.hybrid_weights(importance, response_mask, lam=args.lam),
                          "prior": tidpo.hybrid_weights(importance, response_mask, lam=0.0),
                          "uniform": response_mask.float()}
            for kind, weights in weightings.items():
                for side, part in (("chosen", slice(None, n)), ("rejected", slice(n, None))):
                    placement[f"weights/{kind}/{side}/share"].append(
                        critical_share(weights[part], critical_mask[part], response_mask[part]))
                    placement[f"weights/{kind}/{side}/top_k"].append(
                        topk_hit_rate(weights[part], critical_mask[part], response_mask[part]))
    result = {"accuracy": correct / len(pairs), "margin": torch.cat(margins).mean().item()}
    result.update({name: torch.cat(values).nanmean().item() for name, values in placement.items()})
    if with_samples:
        scores, policy_tokens, policy_texts = {}, [], []
        for name, model in (("policy", policy), ("reference", ref)):
            scores[name] = []
            for batch in batches(pairs, args.batch_size, tokenizer.pad_token_id):
                with autocast:
                    ids, _, response_mask = sample(model, batch["prompt_input_ids"].to(device),
                                                   batch["prompt_attention_mask"].to(device), tokenizer, args)
                for row, keep in zip(ids, response_mask.bool()):
                    text = tokenizer.decode(row[keep], skip_special_tokens=True)
                    scores[name].append(data.judge(text))
                    if name == "policy":
                        policy_tokens.append([t for t in row[keep].tolist() if t != tokenizer.eos_token_id])
                        policy_texts.append(text)
            result[f"judge/{name}"] = sum(scores[name]) / len(scores[name])
        result["win_rate"] = win_rate(scores["policy"], scores["reference"])
        result["distinct_2"] = distinct_n(policy_tokens, 2)
        result["distinct_4"] = distinct_n(policy_tokens, 4)
        result["token_entropy"] = token_entropy(policy_tokens)
        result["self_bleu"] = self_bleu(policy_texts)
    return result


# ----------------------------------------------------------------------------- the run


def sft(model, pairs, tokenizer, args, device, autocast, log):
    """Supervised fine-tuning on chosen AND rejected responses, so that the reference built from
    this model has no preference between them."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr)
    generator = torch.Generator().manual_seed(args.seed)
    step = 0
    while step < args.sft_steps:
        for batch in batches(pairs, args.batch_size, tokenizer.pad_token_id, generator):
            input_ids, attention_mask, response_mask = stack_rows(
                [rows(batch, "chosen", device), rows(batch, "rejected", device)], tokenizer.pad_token_id)
            with autocast:
                logps = tidpo.token_logps(forward_logits(model, input_ids, attention_mask), input_ids, response_mask)
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
    loss, _ = tidpo_step(policy, ref, batch, tokenizer, args, device, autocast)
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
    import statistics
    import subprocess

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


# ----------------------------------------------------------------------------- processes, checkpoints, failures


def setup_distributed(device):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this process joins the group that
    torchrun's environment variables describe: NCCL on CUDA, one GPU per process, else gloo. A plain
    `python train.py` is one process, with no group."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world_size, device


# A checkpoint continues the run that wrote it: these flags may differ on --resume, the rest may not.
MAY_CHANGE_ON_RESUME = ("steps", "epochs", "lr", "fp32", "device", "log_every", "save_every", "keep_last",
                        "output_dir", "resume")
CHECKPOINT_FORMAT = "tidpo train.py checkpoint, version 1"
CHECKPOINT_NAME = re.compile(r"step-(\d+)\.pt")


def saved_checkpoints(run_dir):
    """[(step, path)] of the checkpoints in a run folder, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(m[1]), os.path.join(folder, m[0])) for m in map(CHECKPOINT_NAME.fullmatch, names) if m)


def save_atomically(obj, path):
    """torch.save to a temporary name in the same folder, then rename: a crash while writing leaves
    the previous file whole, never a torn one (os.replace is atomic within a file system)."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(temporary, path)


def save_checkpoint(state, run_dir, keep_last):
    """Write checkpoints/step-N.pt and delete all but the newest `keep_last`; returns its path."""
    path = os.path.join(run_dir, "checkpoints", f"step-{state['step']:06d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_atomically(state, path)
    for _, old in saved_checkpoints(run_dir)[:-keep_last]:
        os.remove(old)
    return path


def random_states(device, world_size):
    """Every process's random-number states (a collective call under torchrun): anchors are sampled
    from them, so a resumed run draws what the uninterrupted run would have drawn."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def find_resume_checkpoint(args):
    """The checkpoint file that --resume names. Without --output-dir, the run continues in the folder
    of the run that wrote it."""
    if args.resume == "latest":
        if args.output_dir is None:
            raise SystemExit("error: --resume latest needs --output-dir, the folder of the run to continue")
        saved = saved_checkpoints(args.output_dir)
        if not saved:
            raise SystemExit(f"error: --resume latest: {args.output_dir} holds no checkpoints "
                             f"({os.path.join(args.output_dir, 'checkpoints', 'step-N.pt')}); a run writes them "
                             f"with --save-every N")
        return saved[-1][1]
    if not os.path.exists(args.resume):
        raise SystemExit(f"error: --resume {args.resume}: no such file")
    if os.path.isdir(args.resume):
        raise SystemExit(f"error: --resume {args.resume}: is a folder; name a checkpoint file "
                         f"(<run>/checkpoints/step-N.pt), or use --resume latest --output-dir <run>")
    if args.output_dir is None:
        args.output_dir = run_dir_of(args.resume)
    return args.resume


def run_dir_of(checkpoint_path):
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))  # <run>/checkpoints/step-N.pt


def load_checkpoint(path, args, world_size):
    """The checkpoint's state, with the frozen reference's weights under "reference", after checking
    that it continues this run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, a truncated one, a pickle of something else
        raise SystemExit(f"error: --resume {path}: cannot be read as a checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: --resume {path}: not a checkpoint written by train.py")
    saved, now = state["args"], vars(args)
    changed = [f"--{name.replace('_', '-')} {saved[name]} (now {now[name]})" for name in saved
               if name in now and name not in MAY_CHANGE_ON_RESUME and not name.startswith("bench")
               and saved[name] != now[name]]
    if changed:
        raise SystemExit(f"error: --resume {path}: that run had {', '.join(changed)}; resume with the run's "
                         f"own flags, or start a new run in another --output-dir")
    if state["world_size"] != world_size:
        raise SystemExit(f"error: --resume {path}: it was written by a run of world size {state['world_size']}, "
                         f"this one has world size {world_size}; resume with torchrun "
                         f"--nproc_per_node={state['world_size']} (each process continues its own random stream)")
    reference = os.path.join(os.path.dirname(path), "reference.pt")
    if not os.path.isfile(reference):
        raise SystemExit(f"error: --resume {path}: {reference}, the frozen reference of that run, is missing")
    state["reference"] = torch.load(reference, map_location="cpu", weights_only=True)
    return state


def load_weights(model, state_dict, checkpoint_path):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # missing or extra tensors, other shapes: the model is not the run's
        raise SystemExit(f"error: --resume {checkpoint_path}: its weights do not fit this model "
                         f"({str(error).splitlines()[0]})") from None


def make_output_dir(args, resume_path=None, rank=0, world_size=1):
    """Create --output-dir. It must be new or empty, unless --resume continues the run that lives there."""
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.loss}-{datetime.now():%Y%m%d-%H%M%S}")
        if world_size > 1:  # rank 0's clock names the folder of every process
            name = [args.output_dir]
            dist.broadcast_object_list(name)
            args.output_dir = name[0]
    held = sorted(os.listdir(args.output_dir)) if os.path.isdir(args.output_dir) else []
    own_run = bool(held and resume_path) and os.path.samefile(run_dir_of(resume_path), args.output_dir)
    if held and not own_run:
        saved = saved_checkpoints(args.output_dir)
        if saved:
            how = (f"to continue that run from its checkpoint of step {saved[-1][0]}, add --resume latest; to "
                   f"start a new one, choose another --output-dir")
        else:
            how = "it has no checkpoints to continue from; choose another --output-dir (or remove that folder)"
        raise SystemExit(f"error: --output-dir {args.output_dir} already holds an earlier run "
                         f"({', '.join(held)}); {how}")
    if world_size > 1:
        dist.barrier()  # every process has looked at the folder before rank 0 writes to it
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)


def non_finite_message(step, values, args, device, checkpoint):
    terms = {"dpo_w": "loss/dpo_w", "triplet": "loss/triplet", "kl": "loss/kl"}
    bad = [term for term, name in terms.items() if name in values and not math.isfinite(values[name])]
    if bad:
        what = f"the loss is {values['loss']} (not finite in: {', '.join(bad)})"
    else:
        what = f"the gradient norm is {values['grad_norm']} while the loss is finite ({values['loss']:.4g})"
    terms_now = ", ".join(f"{term} {values[name]:.4g}" for term, name in terms.items() if name in values)
    advice = [f"a lower --lr (now {args.lr:g})", "a check of the training data (very long or degenerate "
              "responses, the same text as chosen and rejected)"]
    if device.type == "cuda" and not args.fp32:
        advice.append("--fp32 (bfloat16 overflows sooner)")
    if checkpoint:
        where = (f"the last checkpoint, {checkpoint}, is intact: continue from it with --resume latest "
                 f"--output-dir {args.output_dir} (a new --lr is allowed)")
    else:
        where = "no checkpoint was written (--save-every N writes them)"
    return (f"error: step {step}: {what}; loss terms: {terms_now}; grad_norm {values['grad_norm']:.4g}. The run "
            f"stopped before applying this update; {where}. Try {'; '.join(advice)}.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bfloat16 autocast on CUDA (unless --fp32); plain float32 on the CPU
    use_bf16 = device.type == "cuda" and not args.fp32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    if args.bench:
        return bench(args, argv, device, autocast)
    rank, world_size, device = setup_distributed(device)
    # Everything that can fail on the user's input comes before the output folder is made.
    tokenizer = load_tokenizer(args)
    train_pairs, heldout_pairs = load_data(args, tokenizer)
    if len(train_pairs) < world_size:
        raise SystemExit(f"error: too few training pairs ({len(train_pairs)}) for {world_size} processes: each "
                         f"process needs at least one")
    resume_path = find_resume_checkpoint(args) if args.resume else None
    resume = load_checkpoint(resume_path, args, world_size) if resume_path else None
    make_output_dir(args, resume_path, rank, world_size)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")

    def log(line, record=None):
        if rank != 0:  # every process computes the same numbers; one of them reports
            return
        print(line, flush=True)
        if record is not None:
            with open(metrics_path, "a") as metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
    policy = build_models(args, device, tokenizer)
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"model: {args.model or 'tiny Llama (built-in)'}, {n_params / 1e6:.2f}M parameters, on {device}"
        f"{f' x {world_size} processes' if world_size > 1 else ''}; "
        f"{len(train_pairs)} training pairs, {len(heldout_pairs)} held-out")
    if resume:
        load_weights(policy, resume["policy"], resume_path)
    elif args.model is None:
        sft(policy, train_pairs, tokenizer, args, device, autocast, log)
    # The training step runs the policy through DDP, which averages the gradients over the
    # processes; its constructor also gives every process rank 0's weights.
    train_policy = policy
    if world_size > 1:
        train_policy = DistributedDataParallel(policy, device_ids=[device] if device.type == "cuda" else None,
                                               forward_sync_buffers=False)  # the buffers are constants (rotary)
        # gradient_attribution takes the embedding layer from the model it runs: lend it the module's
        train_policy.get_input_embeddings = policy.get_input_embeddings
    # Algorithm 1: pi_ref is a frozen copy of the starting policy.
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    if resume:  # the starting policy of the run that wrote the checkpoint (for the built-in task, after SFT)
        load_weights(ref, resume["reference"], resume_path)
    judge = args.data is None

    if resume:
        before = resume["before"]
    else:
        before = evaluate(policy, ref, heldout_pairs, tokenizer, args, device, autocast, with_samples=False)
        log(f"held-out before: accuracy {before['accuracy']:.3f}, margin {before['margin']:.4f}",
            {"phase": "eval", "when": "before", **before})

    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=args.lr)
    steps = args.steps or max(1, math.ceil(args.epochs * len(train_pairs) / (args.batch_size * args.grad_accum)))

    def warmup(s):
        return min(1.0, (s + 1) / (args.warmup_steps + 1))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)

    generator = torch.Generator().manual_seed(args.seed)
    # The data position: the generator's state when this epoch's order was drawn, and how many of
    # the epoch's batches were taken. A checkpoint keeps both, and a resumed run redraws the same
    # order and skips what was taken.
    epoch_start, taken = None, 0
    stream = iter(())
    sums, count, history, first_step = {}, 0, [], 1
    torch.manual_seed(args.seed + rank)  # each process samples its anchors from a stream of its own
    reference_path = os.path.join(args.output_dir, "checkpoints", "reference.pt")
    checkpoint = None  # the newest checkpoint this run wrote or resumed from
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if args.lr != resume["args"]["lr"]:  # a new learning rate from here on (say, after a non-finite loss)
            scheduler.base_lrs = [args.lr for _ in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["initial_lr"], group["lr"] = args.lr, args.lr * warmup(scheduler.last_epoch)
        generator.set_state(resume["data"]["epoch_start"])
        epoch_start, taken = resume["data"]["epoch_start"], resume["data"]["taken"]
        stream = batches(train_pairs, args.batch_size, tokenizer.pad_token_id, generator, skip=taken)
        torch.set_rng_state(resume["random"][rank]["cpu"])
        if device.type == "cuda" and resume["random"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(resume["random"][rank]["cuda"], device)
        sums, count, history = resume["window"]["sums"], resume["window"]["count"], resume["history"]
        first_step, checkpoint = resume["step"] + 1, resume_path
        log(f"resumed from {resume_path}: step {resume['step']} of {steps} done",
            {"phase": "resume", "step": resume["step"], "checkpoint": resume_path})
    if args.save_every and rank == 0 and not os.path.exists(reference_path):
        os.makedirs(os.path.dirname(reference_path), exist_ok=True)
        save_atomically(ref.state_dict(), reference_path)  # once: every checkpoint of this run needs it
    t0 = time.perf_counter()
    for step in range(first_step, steps + 1):
        step_sums = {}
        for micro_step in range(args.grad_accum):
            batch = next(stream, None)
            # A new epoch. A last batch with fewer pairs than processes is left out (never in one process).
            if batch is None or len(batch["chosen_input_ids"]) < world_size:
                epoch_start, taken = generator.get_state(), 0
                stream = batches(train_pairs, args.batch_size, tokenizer.pad_token_id, generator)
                batch = next(stream)
            taken += 1
            batch, share = shard(batch, rank, world_size)
            # DDP reduces the gradients only at the last micro-batch of a step.
            last = micro_step == args.grad_accum - 1
            with train_policy.no_sync() if world_size > 1 and not last else nullcontext():
                loss, metrics = tidpo_step(train_policy, ref, batch, tokenizer, args, device, autocast)
                # DDP averages the processes' gradients. Weighting each process's batch-mean loss by
                # its share of the pairs times the number of processes makes that average the
                # gradient of the whole batch's mean loss, however the pairs split.
                (loss * (share * world_size / args.grad_accum)).backward()
            for name, value in {"loss": loss.detach(), **metrics}.items():
                step_sums[name] = step_sums.get(name, 0) + value * (share / args.grad_accum)
        names = list(step_sums)
        values = torch.stack([step_sums[name] for name in names])
        if world_size > 1:
            dist.all_reduce(values)  # the shares add up to the whole batch's means
        if args.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in policy.parameters() if p.grad is not None])
        # The step's one wait for the device: its numbers, checked before the update is applied.
        values = dict(zip([*names, "grad_norm"], torch.cat([values, grad_norm.reshape(1).to(values)]).tolist()))
        if not all(math.isfinite(value) for value in values.values()):
            raise SystemExit(non_finite_message(step, values, args, device, checkpoint))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        count += 1

        if step % args.log_every == 0 or step == steps:
            means = {name: value / count for name, value in sums.items()}
            seconds = (time.perf_counter() - t0) / count
            log(f"step {step}/{steps} | loss {means['loss']:.4f} | acc {means['rewards/accuracies']:.2f} | "
                f"margin {means['rewards/margins']:.4f} | {seconds:.2f} s/step",
                {"phase": "train", "step": step, "seconds_per_step": seconds, **means})
            history.append({"step": step, **means})
            sums, count, t0 = {}, 0, time.perf_counter()
        if args.save_every and (step % args.save_every == 0 or step == steps):
            state = {"format": CHECKPOINT_FORMAT, "step": step, "args": vars(args), "world_size": world_size,
                     "policy": policy.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "random": random_states(device, world_size),
                     "data": {"epoch_start": epoch_start, "taken": taken},
                     "window": {"sums": sums, "count": count}, "history": history, "before": before}
            if rank == 0:
                checkpoint = save_checkpoint(state, args.output_dir, args.keep_last)

    after = evaluate(policy, ref, heldout_pairs, tokenizer, args, device, autocast, with_samples=judge)
    line = f"held-out after: accuracy {after['accuracy']:.3f}, margin {after['margin']:.4f}"
    if judge:
        line += (f"; judge score of samples: policy {after['judge/policy']:+.3f}, reference "
                 f"{after['judge/reference']:+.3f}, policy wins {after['win_rate']:.3f}")
    log(line, {"phase": "eval", "when": "after", **after})

    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # the save's progress bar would interleave with the log lines
    if rank == 0:
        policy.save_pretrained(os.path.join(args.output_dir, "policy"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "policy"))
    log(f"saved the policy and tokenizer to {os.path.join(args.output_dir, 'policy')} and the metrics to "
        f"{metrics_path}")
    return {"before": before, "after": after, "history": history, "output_dir": args.output_dir}


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # a user's data mistake: the message names file, line and field
        sys.exit(f"error: {error}" if int(os.environ.get("RANK", 0)) == 0 else 1)
    except SystemExit as error:
        # Under torchrun every process meets the same error; one message is enough.
        sys.exit(error.code if int(os.environ.get("RANK", 0)) == 0 or not isinstance(error.code, str) else 1)
