"""The held-out evaluation, the same for every method, and its metrics.

    evaluate(policy, ref, pairs, ...)   a dict of held-out numbers, used by train.py and tools/experiments.py
    process_rounds(pairs, batch_size)   under torchrun, this process's share of the pairs, in batches

The metrics are pure functions of lists and tensors, so that each can be checked on a hand-made case:
    distinct_n, token_entropy, self_bleu   diversity of sampled responses (the paper's Table B9)
    win_rate                               policy against reference, prompt by prompt
    critical_share, topk_hit_rate          where a weighting puts its weight (built-in task)
    critical_margin                        the preference on the critical tokens alone (built-in task)
    triplet_active_by_label, with_shares   where Eq. 13's hinge acts: flipped or clean pairs (built-in task)
"""

import collections
import math

import torch

import data
import tidpo
from training import distributed, memory, sampling
from training.builtin_task import judge


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


def critical_margin(chosen_logratio, rejected_logratio, chosen_critical, rejected_critical, beta):
    """[B] beta * (the chosen response's summed log-ratio on its critical tokens - the rejected one's).

    Args: chosen_logratio, rejected_logratio: [B, L] per-token log-ratios (0 off the response);
    chosen_critical, rejected_critical: [B, L] 1 on each response's critical tokens.
    The plain DPO margin with every other token left out: whether a policy prefers the safe phrase
    to the risky one, whatever it learned about the rest of the responses.
    """
    return beta * ((chosen_logratio * chosen_critical).sum(-1) - (rejected_logratio * rejected_critical).sum(-1))


# ----------------------------------------------------------------------------- the evaluation


def triplet_active_by_label(logratios, response_mask, anchor_logratios, anchor_mask, flipped, margin,
                            triplet=tidpo.triplet_loss):
    """Where Eq. 13's hinge is active, split by the built-in task's flipped labels.

    Args:
        logratios, response_mask: [2B, L] per-token log-ratios of the chosen rows, then the rejected.
        anchor_logratios, anchor_mask: [B, L_a] the anchors'.
        flipped: [B] bool, True where the training pair's labels were swapped (label noise).

    Returns shares of the whole batch (so that they average over micro-batches and processes like
    every other metric): triplet/active_flipped_pairs, triplet/active_clean_pairs, flipped_pairs.
    with_shares turns them into the share of flipped and of clean pairs whose hinge is active.
    """
    n = len(flipped)
    with torch.no_grad():
        active = triplet(anchor_logratios, anchor_mask, logratios[:n], response_mask[:n],
                         logratios[n:], response_mask[n:], margin) > 0
    flipped = flipped.bool()
    active = active & anchor_mask.bool().any(-1)  # an empty anchor: the margin alone, no hinge acts
    return {"triplet/active_flipped_pairs": (active & flipped).float().mean(),
            "triplet/active_clean_pairs": (active & ~flipped).float().mean(),
            "flipped_pairs": flipped.float().mean()}


def step_metrics(batch, logratios, response_mask, anchor_logratios, anchor_mask, margin, triplet):
    """train.py's default step metrics, with the triplet's anchors (none without them):
    anchor_tokens, the anchors' mean sampled length (their tokens per second come from it), and on
    the built-in task, whose batches say which pairs' labels were flipped, triplet_active_by_label."""
    if anchor_logratios is None:
        return {}
    lengths = {"anchor_tokens": anchor_mask.sum(-1).float().mean()}
    if "flipped" not in batch:
        return lengths
    return {**lengths, **triplet_active_by_label(logratios, response_mask, anchor_logratios, anchor_mask,
                                                 batch["flipped"].to(logratios.device), margin, triplet)}


def with_shares(means):
    """`means` plus triplet/active_on_flipped and triplet/active_on_clean where the window held
    flipped and clean pairs: the share of each kind of pair whose triplet hinge is active."""
    if "flipped_pairs" not in means or "triplet/active_flipped_pairs" not in means:
        return means
    shares = dict(means)
    if means["flipped_pairs"] > 0:
        shares["triplet/active_on_flipped"] = means["triplet/active_flipped_pairs"] / means["flipped_pairs"]
    if means["flipped_pairs"] < 1:
        shares["triplet/active_on_clean"] = means["triplet/active_clean_pairs"] / (1 - means["flipped_pairs"])
    return shares


def process_rounds(pairs, batch_size):
    """This process's batches of the held-out `pairs`, as [(pairs, keep)]: its contiguous share of
    the pairs (as distributed.shard splits a batch), in batches of its share of `batch_size`.

    Every process gets the same number of batches, since each forward of a sharded model is a
    collective call that every process must make; a process whose share has run out evaluates
    pairs[0] as a filler whose numbers it leaves out (keep False). One process: all of `pairs`
    in batches of `batch_size`, none of them a filler."""
    rank, world_size = distributed.rank_and_size()
    mine = pairs[len(pairs) * rank // world_size:len(pairs) * (rank + 1) // world_size]
    size = -(-batch_size // world_size)
    rounds = -(-(-(-len(pairs) // world_size)) // size)  # the largest share's batches
    return [(mine[i * size:(i + 1) * size], True) if mine[i * size:(i + 1) * size] else (pairs[:1], False)
            for i in range(rounds)]


# Judged samples per held-out prompt. One draw is noisy: over 16 draws for the 128 held-out prompts of
# the default run, the mean judge score had a standard deviation of 0.045 for the trained policy and
# 0.073 for the reference, of the size of differences between methods; 4 draws halve it.
JUDGE_SAMPLES = 4


def judged_samples(model, rounds, tokenizer, args, device, autocast):
    """The judge's scores of JUDGE_SAMPLES responses sampled from `model` for each of this process's
    held-out prompts (`rounds`, from process_rounds), as one list per draw (prompts in order), and
    the first draw's (text, tokens) per prompt.

    Common random numbers: draw d of batch b is sampled from the random stream seeded by (--seed, d,
    b, the process), whatever the model, so the policies of all methods and the reference of one
    seed meet the same draws (the reference's scores are then the same for every method of a seed),
    and the training's own random stream is left as it was."""
    draws, first = [], []
    rank = distributed.rank_and_size()[0]
    for draw in range(JUDGE_SAMPLES):
        draws.append([])
        for index, (batch_pairs, keep) in enumerate(rounds):
            batch = data.collate(batch_pairs, tokenizer.pad_token_id)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(args.seed * 1_000_003 + draw * 10_007 + index + 1_009 * rank)
                with autocast, distributed.gathered(model):
                    ids, _, response_mask = sampling.sample(
                        model, batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device),
                        tokenizer, **sampling.options(args))
            for row, kept in zip(ids, response_mask.bool()) if keep else ():  # a filler's samples: none
                text = tokenizer.decode(row[kept], skip_special_tokens=True)
                draws[-1].append(judge(text))
                if draw == 0:
                    first.append((text, [t for t in row[kept].tolist() if t != tokenizer.eos_token_id]))
    return draws, first


@torch.no_grad()
def evaluate(policy, ref, pairs, tokenizer, args, device, autocast, with_samples, diagnostics=None):
    """The same held-out evaluation for every method. Under torchrun each process evaluates its
    share of the pairs (process_rounds) and the sums are added up over the processes: every
    process returns the numbers of one process that evaluated them all.

    - accuracy, margin: the preference by the plain DPO implicit reward (weights 1, so every
      method is scored alike; ties count half).
    - critical_accuracy, critical_margin (pairs with known critical tokens: the built-in task): the
      same on the critical tokens alone (critical_margin above).
    - with diagnostics, a dict {name: importance function} of attributions beyond the paper
      (tools/experiments.py passes its variants; each takes tidpo.target_gradient's gradient and
      embeddings and the response mask), weights/{kind}/{side}/{share,top_k} (built-in task):
      critical_share and topk_hit_rate of these weightings of the pair's tokens, from the
      policy's attribution: Eq. 5-6 alone (lambda 1, "attribution") and each variant alone
      ("{name}"); hybrid (--lam) with each ("hybrid", "hybrid_{name}"); prior alone (lambda 0);
      uniform.
    - with_samples (the built-in task's judge: safe phrases count up, risky ones down): the mean
      judge score of JUDGE_SAMPLES responses per held-out prompt sampled from the policy and from
      the reference (judged_samples: the same random draws for every method), the policy's win
      rate against the reference, prompt by prompt on their mean scores, and the diversity of the
      policy's first draw: distinct_2, distinct_4, token_entropy and, with diagnostics, self_bleu
      (sacrebleu, which a plain train.py run does not need).
    """
    sums = collections.defaultdict(float)  # name: a sum over this process's pairs (float64)
    rounds = process_rounds(pairs, args.batch_size)
    for batch_pairs, keep in rounds:
        batch = data.collate(batch_pairs, tokenizer.pad_token_id)
        n = len(batch_pairs)
        stacked = data.stack_pair(batch, tokenizer.pad_token_id)
        input_ids, attention_mask, response_mask = (tensor.to(device) for tensor in stacked)
        critical = "chosen_critical_mask" in batch
        with autocast:
            if critical and diagnostics:  # the attribution's forward also gives the logits for the accuracy
                with torch.enable_grad():
                    policy_logits, grad, embeddings = tidpo.target_gradient(policy, input_ids, attention_mask,
                                                                            response_mask)
                policy_logits = policy_logits.detach()
                # Eq. 6 and the caller's variants from the same gradient
                importances = {"": tidpo.importance_scores(grad, response_mask)}
                importances.update({f"_{name}": variant(grad, embeddings, response_mask)
                                    for name, variant in diagnostics.items()})
            else:
                policy_logits = tidpo.forward_logits(policy, input_ids, attention_mask)
            policy_logps = memory.token_logps(policy_logits, input_ids, response_mask)
            del policy_logits  # [2B, L, V]: freed before the reference's logits are made
            logratio = policy_logps - memory.token_logps(tidpo.forward_logits(ref, input_ids, attention_mask),
                                                         input_ids, response_mask)
        # a filler's numbers count 0, but every process adds the same names in the same order
        weight = 1.0 if keep else 0.0
        margin = args.beta * (logratio[:n].sum(-1) - logratio[n:].sum(-1))
        sums["correct"] += weight * ((margin > 0).sum().item() + 0.5 * (margin == 0).sum().item())
        sums["margin"] += weight * margin.double().sum().item()
        if critical:
            critical_mask = data.stack_critical(batch, input_ids.shape[1]).to(device)
            on_critical = critical_margin(logratio[:n], logratio[n:], critical_mask[:n], critical_mask[n:], args.beta)
            sums["critical_correct"] += weight * ((on_critical > 0).sum().item()
                                                  + 0.5 * (on_critical == 0).sum().item())
            sums["critical_margin"] += weight * on_critical.double().sum().item()
        if critical and diagnostics:
            weightings = {}
            for suffix, importance in importances.items():  # "" is Eq. 6; "_name" the caller's variants
                weightings[suffix[1:] or "attribution"] = tidpo.hybrid_weights(importance, response_mask, lam=1.0)
                weightings[f"hybrid{suffix}"] = tidpo.hybrid_weights(importance, response_mask, lam=args.lam)
            weightings["prior"] = tidpo.hybrid_weights(importances[""], response_mask, lam=0.0)
            weightings["uniform"] = response_mask.float()
            for kind, weights in weightings.items():
                for side, part in (("chosen", slice(None, n)), ("rejected", slice(n, None))):
                    for name, values in (
                            ("share", critical_share(weights[part], critical_mask[part], response_mask[part])),
                            ("top_k", topk_hit_rate(weights[part], critical_mask[part], response_mask[part]))):
                        # a mean over the rows that have one (nanmean), as a sum and a count
                        sums[f"weights/{kind}/{side}/{name}"] += weight * values.double().nansum().item()
                        sums[f"weights/{kind}/{side}/{name}/count"] += weight * (~values.isnan()).sum().item()
    totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    sums = dict(zip(sums, distributed.all_reduce_sum(totals, distributed.rank_and_size()[1]).tolist()))
    result = {"accuracy": sums["correct"] / len(pairs), "margin": sums["margin"] / len(pairs)}
    if "critical_margin" in sums:
        result["critical_accuracy"] = sums["critical_correct"] / len(pairs)
        result["critical_margin"] = sums["critical_margin"] / len(pairs)
    result.update({name: sums[name] / sums[f"{name}/count"] if sums[f"{name}/count"] else math.nan
                   for name in sums if name.startswith("weights/") and not name.endswith("/count")})
    if with_samples:
        scores = {name: judged_samples(model, rounds, tokenizer, args, device, autocast)
                  for name, model in (("policy", policy), ("reference", ref))}
        # every process's samples, in the order of the pairs
        (policy_draws, policy_texts), (reference_draws, _) = scores["policy"], scores["reference"]
        *gathered, policy_texts = distributed.gather_lists([*policy_draws, *reference_draws, policy_texts])
        means = {name: [sum(s) / len(s) for s in zip(*draws)]
                 for name, draws in (("policy", gathered[:JUDGE_SAMPLES]), ("reference", gathered[JUDGE_SAMPLES:]))}
        for name in means:
            result[f"judge/{name}"] = sum(means[name]) / len(means[name])
        result["win_rate"] = win_rate(means["policy"], means["reference"])
        policy_tokens = [tokens for _, tokens in policy_texts]  # the first draw's: one sample per prompt
        result["distinct_2"] = distinct_n(policy_tokens, 2)
        result["distinct_4"] = distinct_n(policy_tokens, 4)
        result["token_entropy"] = token_entropy(policy_tokens)
        if diagnostics:
            result["self_bleu"] = self_bleu([text for text, _ in policy_texts])
    return result
