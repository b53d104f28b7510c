"""Experiments on top of train.py: where token weights matter, a grid of methods x label noise x seeds,
one run of either, and token weights to look at.

    python -m tools.experiments                                  # = python -m tools.experiments mechanism
    python -m tools.experiments mechanism --seeds 0 1 --steps 64 # a smaller version of it
    python -m tools.experiments grid                             # the default grid, see --help for its size
    python -m tools.experiments grid --methods dpo tidpo --noise 0 0.4 --seeds 0 1 --steps 64
    python -m tools.experiments run --method oracle --noise 0.2 --seed 1 --steps 128   # one run of either
    python -m tools.experiments weights --pair 3                 # a held-out pair of the built-in task
    python -m tools.experiments weights --model runs/x/policy --data prefs.jsonl --index 0
    python -m tools.experiments release --model runs/x/policy    # the release's weights against the paper's
    python -m tools.experiments attribution --model models/smollm2 --data examples/instruction_pairs.jsonl

The methods (METHODS) are train.py flags, and for the variants beyond the paper a hook into train.py's
step (HOOKS: other token weights, other triplets), passed in as a train.Hooks. The built-in task's
label noise and its spurious setting are set here too (the hooks' "task"), not by train.py flags, and
so is the authors' release's optimizer (run --optimizer rmsprop). tidpo_release is that release's
training path (gracefulning/TIDPO at e04a092): Eq. 8 over prompt and response with a prior of width n/8 (a
hook) and its loss settings (flags); tidpo, the paper's method, stays the default.

mechanism (the default) runs DPO, TI-DPO with the paper's attribution and with each variant, oracle
weights, uniform weights and the prior alone on two settings of the built-in task, the default one with
label noise and the one with a spurious cue (--task spurious of the run command), and prints one table
per setting: held-out accuracy and margin on whole responses and on the critical tokens alone, and where
each attribution puts the weight. It writes OUTPUT/mechanism.md and runs.csv, and each run under
OUTPUT/<task>/.

grid runs train.main once per (method, label noise, seed) on the built-in task and prints held-out
accuracy in the shape of the paper's Table B8 (one row per method, one column per noise level, mean
and standard deviation over seeds), then the other held-out metrics of training/evaluate.py at the lowest
noise level. It writes OUTPUT/table.csv, table.md, summary.md, runs.csv (every metric of every
run), curves.png and accuracy_vs_noise.png, and each run's folder and log under OUTPUT/runs/.
Flags it does not know go to every train.py run (e.g. --sft-steps 60); a method's own flags win.

weights shows each response token of one pair shaded by its hybrid weight (Eq. 8): in the terminal
and as an HTML file, with the raw attribution (Eq. 6), the Gaussian prior (Eq. 7) and the hybrid
weight of every token written as JSON.

attribution runs a model on every pair of a JSONL and prints where Eq. 6's attribution and four hybrid
weightings (the paper's, the final token left out, gradient x input, the release's) put the weight: the
response's final token (on a chat model, its end of turn) against the other tokens.

release computes Eq. 12's loss and gradient on one batch of built-in training pairs with the paper's weights
and with tidpo_release's, at the built-in SFT reference or at a policy trained from it.
"""

import argparse
import copy
import csv
import html
import json
import multiprocessing
import os
import statistics
import sys
import time
from contextlib import redirect_stdout, nullcontext
from datetime import datetime

import torch

import data
import tidpo
import train
from training import builtin_task, sampling, setup

# Paper Table 2 and the baselines: each is a set of train.py flags on top of the same defaults.
METHODS = {
    "dpo": ["--loss", "dpo"],
    "tidpo": ["--loss", "tidpo"],
    "tidpo_no_triplet": ["--loss", "tidpo", "--gamma", "0"],
    "uniform_weights": ["--loss", "tidpo"],  # the weights of these come from HOOKS
    "random_weights": ["--loss", "tidpo"],
    "no_prior": ["--loss", "tidpo", "--lam", "1"],
    "prior_only": ["--loss", "tidpo", "--lam", "0"],
    # The configuration the paper reports (its final hyperparameter table): beta 0.1, gamma 0.1, lambda 0.7
    # and the TDPO2 sequential-KL weight 0.5, a term Eq. 14 does not contain (train.py's defaults + --kl-alpha)
    "tidpo_reported": ["--loss", "tidpo", "--kl-alpha", "0.5"],
    # Eq. 8 as written (weights sum to 1, so Eq. 11 is a weighted average, about 1/T of DPO's sum), and,
    # beyond the paper (see HOOKS): the triplet with only the anchor carrying its gradient, and the
    # triplet on summed log-ratios (one point per response) instead of token by token
    "tidpo_eq8_sum": ["--loss", "tidpo"],  # Eq. 8 as written: HOOKS' weights that sum to 1
    "tidpo_anchor_grad": ["--loss", "tidpo"],
    "tidpo_points_triplet": ["--loss", "tidpo"],
    # Beyond the paper (built-in task): the attribution's variants and oracle weights on the known critical
    # tokens, in Eq. 12 alone (gamma 0) so that each differs from DPO only in its weights; the oracle at
    # DPO's per-token scale (1 on each critical token, 0 elsewhere), and as a perfect attribution through
    # Eq. 8 at lambda 1 (mean 1: T/k on each); and the oracle in the full objective, with the triplet.
    "tidpo_no_final": ["--loss", "tidpo", "--gamma", "0"],  # with HOOKS' attribution variants
    "tidpo_grad_x_input": ["--loss", "tidpo", "--gamma", "0"],
    "prior_only_no_triplet": ["--loss", "tidpo", "--lam", "0", "--gamma", "0"],
    "oracle": ["--loss", "tidpo", "--gamma", "0"],
    "oracle_eq8": ["--loss", "tidpo", "--lam", "1", "--gamma", "0"],
    "oracle_triplet": ["--loss", "tidpo"],
    # The authors' release (gracefulning/TIDPO at e04a092) as it trains: its weights (HOOKS: over prompt and
    # response, prior width n/8) and its loss settings, beta 0.2, lambda 0.2, gamma 0.001, triplet margin
    # 0.001 and the TDPO2 KL at 0.5; its anchors (64 new tokens, top-k 50, top-p 0.95, temperature 0.8) are
    # train.py's defaults
    "tidpo_release": ["--loss", "tidpo", "--beta", "0.2", "--lam", "0.2", "--gamma", "0.001", "--margin", "0.001",
                      "--kl-alpha", "0.5"],
}
GRID_METHODS = ["dpo", "tidpo", "tidpo_reported", "tidpo_no_triplet", "uniform_weights", "random_weights", "no_prior",
                "prior_only", "tidpo_eq8_sum", "tidpo_anchor_grad", "tidpo_points_triplet"]
# DPO and the full TI-DPO (Eq. 14, triplet included; and the paper's reported configuration) with the
# paper's weights, uniform weights and oracle weights; then Eq. 12 alone (no triplet) with each weighting.
MECHANISM_METHODS = ["dpo", "tidpo", "tidpo_reported", "uniform_weights", "oracle_triplet", "tidpo_no_triplet",
                     "tidpo_no_final", "tidpo_grad_x_input", "prior_only_no_triplet", "oracle", "oracle_eq8"]


def points_triplet_loss(anchor_logratios, anchor_mask, chosen_logratios, chosen_mask, rejected_logratios,
                        rejected_mask, margin):
    """[B] Eq. 13 on one point per response (beyond the paper): its summed log-ratio, d for the anchor,
    b and c for the chosen and rejected, max(0, (d - b)^2 - (c - d)^2 + alpha). Each token's gradient is
    then a difference of sums, about T times the per-token triplet's (tidpo.triplet_loss)."""
    d, b, c = (torch.where(mask.bool(), logratios, 0.0).sum(-1) for logratios, mask in
               ((anchor_logratios, anchor_mask), (chosen_logratios, chosen_mask), (rejected_logratios, rejected_mask)))
    return torch.clamp((d - b) ** 2 - (c - d) ** 2 + margin, min=0)


def anchor_grad_triplet_loss(anchor_logratios, anchor_mask, chosen_logratios, chosen_mask, rejected_logratios,
                             rejected_mask, margin):
    """[B] tidpo.triplet_loss with the chosen and rejected log-ratios held fixed (beyond the paper): the
    triplet moves only the anchor, and the chosen and rejected responses are trained by Eq. 12 alone."""
    return tidpo.triplet_loss(anchor_logratios, anchor_mask, chosen_logratios.detach(), chosen_mask,
                              rejected_logratios.detach(), rejected_mask, margin)


def grad_x_input(grad, embeddings):
    """[B, L] gradient x input, |dL_target/de_i . e_i| (a variant, not the paper's Eq. 6), from
    tidpo.target_gradient's gradient and embeddings [B, L, E]. It is the first-order change of the
    target if token i's embedding were removed, where Eq. 6 measures only how steep the target is
    around e_i."""
    return (tidpo.at_least_float32(grad) * tidpo.at_least_float32(embeddings)).sum(dim=-1).abs()


def leave_out_final(importance, response_mask):
    """[B, L] `importance` with each row's last response token set to 0 (a variant). In Eq. 8 that
    token then gets only its prior share, and the attribution is normalised over the rest of the
    response: Eq. 5's target sits at that position, and its own-token gradient outweighs the rest."""
    return importance.scatter(-1, tidpo.last_response_position(response_mask).unsqueeze(-1), 0.0)


def variant_importance(grad, embeddings, response_mask, attribution):
    """[B, L] detached scores of one of ATTRIBUTIONS from target_gradient's outputs: "paper" is
    Eq. 6; "no-final" Eq. 6 with the final token left out; "grad-x-input" gradient x input with the
    final token left out too."""
    if attribution == "paper":
        return tidpo.importance_scores(grad, response_mask)
    scores = (grad_x_input(grad, embeddings) if attribution == "grad-x-input"
              else tidpo.at_least_float32(grad).abs().sum(dim=-1))
    scores = torch.where(response_mask.bool(), scores, torch.zeros_like(scores))
    return leave_out_final(scores, response_mask).detach()


ATTRIBUTIONS = ("paper", "no-final", "grad-x-input")


# Token weights beyond the paper, for train.main's "weights" hook: each has the arguments and
# result of train.hybrid_token_weights, (logits, [B, L] weights).

def variant_attribution(attribution):
    """A tidpo.gradient_attribution with one of ATTRIBUTIONS' scores: (logits, importance)."""
    if attribution not in ATTRIBUTIONS:
        raise ValueError(f"attribution must be one of {ATTRIBUTIONS}, got {attribution!r}")

    def attribute(model, input_ids, attention_mask, response_mask):
        logits, grad, embeddings = tidpo.target_gradient(model, input_ids, attention_mask, response_mask)
        return logits, variant_importance(grad, embeddings, response_mask, attribution)
    return attribute


def attribution_weights(attribution):
    """Eq. 8's hybrid weights on one of ATTRIBUTIONS' scores."""
    attribute = variant_attribution(attribution)

    def weights(policy, input_ids, attention_mask, response_mask, batch, args):
        logits, importance = attribute(policy, input_ids, attention_mask, response_mask)
        return logits, tidpo.hybrid_weights(importance, response_mask, lam=args.lam)
    return weights


def eq8_sum_weights(policy, input_ids, attention_mask, response_mask, batch, args):
    """train.hybrid_token_weights with Eq. 8 as written: the weights sum to 1 over a response
    (scale "sum"), so that Eq. 12 sees about 1/T of the default ("mean") margin."""
    logits, importance = tidpo.gradient_attribution(policy, input_ids, attention_mask, response_mask)
    return logits, tidpo.hybrid_weights(importance, response_mask, lam=args.lam, scale="sum")


def uniform_weights(policy, input_ids, attention_mask, response_mask, batch, args):
    """Weight 1 on every response token: Eq. 14 with DPO's margin, the triplet's own effect."""
    return tidpo.forward_logits(policy, input_ids, attention_mask), response_mask.float()


def random_weights(policy, input_ids, attention_mask, response_mask, batch, args):
    """Fresh uniform random scores at every step, through Eq. 8 at lambda 1 (scaled like it)."""
    logits = tidpo.forward_logits(policy, input_ids, attention_mask)
    scores = torch.rand(response_mask.shape, device=response_mask.device)
    return logits, tidpo.hybrid_weights(scores, response_mask, lam=1.0)


def oracle_weights(scale):
    """Weights on the built-in task's known critical tokens only: the placement no attribution can
    beat. "unit" keeps DPO's per-token scale (1 on each critical token, 0 elsewhere), so the oracle
    differs from DPO only in which tokens count; "hybrid" passes them through Eq. 8 as a perfect
    attribution would (at mean scale and lambda 1 each critical token weighs T/k, about 6-8 on
    the built-in task, like a beta T/k times larger)."""
    def weights(policy, input_ids, attention_mask, response_mask, batch, args):
        logits = tidpo.forward_logits(policy, input_ids, attention_mask)
        if "chosen_critical_mask" not in batch:
            raise data.DataError("oracle weights need the built-in task's critical tokens")
        critical = data.stack_critical(batch, input_ids.shape[1]).to(input_ids.device, torch.float32)
        if scale == "unit":
            return logits, critical
        return logits, tidpo.hybrid_weights(critical, response_mask, lam=args.lam)
    return weights


# The authors' release computes Eq. 8 in its training forward without the labels: over every non-padding
# token, prompt included. Its config's prior_sigma_div sets the prior's width, sigma = max(1, n / 8).
RELEASE_SIGMA_DIV = 8


def release_hybrid_weights(importance, attention_mask, response_mask, lam, sigma_div=RELEASE_SIGMA_DIV):
    """[B, L] Eq. 8 as the authors' release trains with it, from [B, L] scores at every position: importance
    and a Gaussian prior normalised over each row's n non-padding tokens (prompt AND response), the prior
    centred on them with sigma = max(1, n / sigma_div), their mix scaled to mean 1 over those n tokens. The
    response keeps its slice (whose mean is then not 1), every other position 0; a row whose importance sums
    to 0 takes the prior alone. tidpo.hybrid_weights is the paper's: all of it over the response, sigma T/4."""
    span = attention_mask.to(tidpo.at_least_float32(importance).dtype)
    importance = importance.to(span.dtype) * span
    n = span.sum(dim=-1, keepdim=True)
    position = (span.cumsum(dim=-1) - 1) * span  # 0 .. n-1 along the non-padding tokens
    # Eq. 7 over the whole span: mu = (n - 1) / 2, sigma = max(1, n / sigma_div)
    prior = torch.exp(-0.5 * ((position - (n - 1) / 2) / (n / sigma_div).clamp(min=1)) ** 2) * span
    tiny = torch.finfo(span.dtype).tiny
    total = importance.sum(dim=-1, keepdim=True)
    prior_norm = prior / prior.sum(dim=-1, keepdim=True).clamp(min=tiny)
    # Eq. 8 over the span, times n: mean 1 over prompt and response together
    weights = torch.where(total > 0, lam * importance / total.clamp(min=tiny) + (1 - lam) * prior_norm, prior_norm)
    return weights * n * response_mask.to(span.dtype)


def release_weights(policy, input_ids, attention_mask, response_mask, batch, args):
    """train.hybrid_token_weights as the authors' release trains: Eq. 6's scores at every non-padding
    position, prompt included, through release_hybrid_weights."""
    # Eq. 5's target at the last response token, as for the paper. The release takes it at
    # attention_mask.sum() - 1, the last non-padding token: with data.stack_pair's right padding the same one.
    logits, grad, _ = tidpo.target_gradient(policy, input_ids, attention_mask, response_mask)
    importance = tidpo.importance_scores(grad, attention_mask)  # Eq. 6 on prompt and response
    return logits, release_hybrid_weights(importance, attention_mask, response_mask, lam=args.lam)


# The methods that swap a part of the step for a variant (train.main's hooks, see train.tidpo_step)
HOOKS = {"uniform_weights": {"weights": uniform_weights},
         "tidpo_eq8_sum": {"weights": eq8_sum_weights},
         "random_weights": {"weights": random_weights},
         "tidpo_anchor_grad": {"triplet": anchor_grad_triplet_loss},
         "tidpo_points_triplet": {"triplet": points_triplet_loss},
         "tidpo_no_final": {"weights": attribution_weights("no-final")},
         "tidpo_grad_x_input": {"weights": attribution_weights("grad-x-input")},
         "oracle": {"weights": oracle_weights("unit")},
         "oracle_eq8": {"weights": oracle_weights("hybrid")},
         "oracle_triplet": {"weights": oracle_weights("unit")},
         "tidpo_release": {"weights": release_weights}}


# evaluate's research metrics: where these attributions beyond the paper put the weight
DIAGNOSTICS = {"no_final": lambda grad, embeddings, mask: variant_importance(grad, embeddings, mask, "no-final"),
               "grad_x_input": lambda grad, embeddings, mask: variant_importance(grad, embeddings, mask,
                                                                                 "grad-x-input")}


def rmsprop(params, args):
    """The authors' release's optimizer (train.make_optimizer's arguments): RMSprop at --lr."""
    return torch.optim.RMSprop(params, lr=args.lr)


OPTIMIZERS = {"adamw": train.make_optimizer, "rmsprop": rmsprop}


def method_hooks(method, noise=0.0, task="default", optimizer="adamw", **more):
    """train.main's hooks for one run of `method` on the built-in task at this label noise and
    setting, with evaluate's research metrics (and `more` hooks, e.g. sft)."""
    return train.Hooks(**HOOKS.get(method, {}), task={"label_noise": noise, "setting": task},
                       diagnostics=DIAGNOSTICS, optimizer=OPTIMIZERS[optimizer], **more)


# (task, label noise): without noise every method reaches accuracy 1 on both settings. With 20% of the
# labels flipped, the spurious cue (which follows the given labels) agrees with them more often than the
# critical phrase does.
MECHANISM_SETTINGS = [("default", 0.2), ("spurious", 0.2)]
MECHANISM_SEEDS = [0, 1, 2, 3, 4]
# Table B8's noise levels but 0%, where every method reaches held-out accuracy 1 on the built-in task (an
# earlier grid of 96 runs measured it); `--noise 0 0.1 0.2 0.4` runs it too
NOISE = [0.1, 0.2, 0.4]
SEEDS = [0, 1, 2, 3, 4]  # paired with DPO by seed: a 95% interval needs a few (t = 2.78 at 5)
STEPS = 128  # 4 epochs of the 512 built-in training pairs at batch 16


# ----------------------------------------------------------------------------- grid: running


def run_group(job):
    """Every method at one (label noise, seed), one after the other, on one thread.

    The SFT is done by the group's first run only; the others load a copy of its weights.
    That gives the same numbers as separate runs: the SFT depends on the seed, the label noise
    (it reorders each batch's rows, which changes the float sums) and the shared flags, never on
    a method's flags, and it leaves nothing behind but the weights (no gradient, no draw from the
    global random generator). Across noise levels it cannot be shared, for the float sums' sake.

    One thread, because the model is tiny (two one-thread runs side by side beat one two-thread run
    by far) and a run's numbers depend on the thread count: `OMP_NUM_THREADS=1 python -m tools.experiments
    run --method M --noise N --seed S [--task T] FLAGS` repeats one run of a grid or mechanism
    study (FLAGS: the extra train.py flags it was given, as in the record's "argv").
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sft_weights = {}
    first_sft = train.sft

    def sft_once(model, *args):
        if sft_weights:
            model.load_state_dict(sft_weights)
        else:
            first_sft(model, *args)
            sft_weights.update(copy.deepcopy(model.state_dict()))

    records = []
    try:
        for method in job["methods"]:
            name = f"{method}-noise{job['noise']}-seed{job['seed']}"
            run_dir = os.path.join(job["output_dir"], "runs", name)
            argv = [*job["train_args"], *METHODS[method], "--seed", str(job["seed"]), "--output-dir", run_dir]
            hooks = method_hooks(method, job["noise"], job.get("task", "default"), sft=sft_once)
            start = time.perf_counter()
            with open(run_dir + ".log", "w") as log, redirect_stdout(log):
                result = train.main(argv, hooks=hooks)
            seconds = time.perf_counter() - start
            print(f"{name}: held-out accuracy {result['after']['accuracy']:.3f} ({seconds:.1f} s)", flush=True)
            records.append({"method": method, "noise": job["noise"], "seed": job["seed"], "seconds": seconds,
                            "argv": argv, **result})
    finally:
        torch.set_num_threads(threads)
    return records


def run_groups(groups, jobs):
    """[run_group(group) for group in groups], `jobs` groups at a time."""
    if jobs == 1:
        return [run_group(group) for group in groups]
    # spawn: a forked child would inherit torch's thread pools in whatever state they are
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        return pool.map(run_group, groups, chunksize=1)


def run_grid(methods, noise_levels, seeds, train_args, output_dir, jobs):
    """Records of every run (train.main's result plus method, noise, seed, seconds, argv), in the
    order methods x noise x seeds."""
    os.makedirs(os.path.join(output_dir, "runs"), exist_ok=True)
    groups = [{"methods": methods, "noise": noise, "seed": seed, "train_args": train_args, "output_dir": output_dir}
              for noise in noise_levels for seed in seeds]
    results = run_groups(groups, jobs)
    return sorted((r for records in results for r in records),
                  key=lambda r: (methods.index(r["method"]), noise_levels.index(r["noise"]), seeds.index(r["seed"])))


# ----------------------------------------------------------------------------- grid: tables and plots


def mean_and_spread(values):
    """(mean, sample standard deviation); the spread is None for a single value."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values, digits=3):
    mean, spread = mean_and_spread(values)
    return f"{mean:.{digits}f}" if spread is None else f"{mean:.{digits}f} ± {spread:.{digits}f}"


def values_of(records, metric, **where):
    return [r["after"][metric] for r in records if all(r[k] == v for k, v in where.items())]


# Student's t at 97.5% for 1-30 degrees of freedom: the two-sided 95% interval of a mean
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def paired_difference(records, metric, method, baseline="dpo", **where):
    """(mean, low, high, n): `method`'s metric minus `baseline`'s, seed by seed (the same task, reference
    and evaluation draws), with the 95% paired-t interval over the n seeds both ran; None below 2 seeds."""
    mine, theirs = ({r["seed"]: r["after"][metric] for r in records
                     if r["method"] == m and all(r[k] == v for k, v in where.items())} for m in (method, baseline))
    differences = [mine[seed] - theirs[seed] for seed in sorted(mine.keys() & theirs.keys())]
    if len(differences) < 2:
        return None
    n, mean = len(differences), statistics.mean(differences)
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * statistics.stdev(differences) / n ** 0.5
    return mean, mean - half, mean + half, n


def paired_cell(records, metric, method, **where):
    difference = paired_difference(records, metric, method, **where)
    if difference is None:
        return ""
    mean, low, high, _ = difference
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def paired_table(records, methods, columns):
    """Markdown: each method's paired difference from DPO, "mean [95% interval]", one column per
    (title, metric, where) of `columns`; DPO itself is the baseline and has no row."""
    rows = [[m] + [paired_cell(records, metric, m, **where) for _, metric, where in columns]
            for m in methods if m != "dpo"]
    return markdown(["method", *(title for title, _, _ in columns)], rows)


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def noise_label(noise):
    return f"{100 * noise:g}%"


def history_values(records, metric, when, **where):
    """`metric` of each matching run's history: its first logged window ("start"), its last ("end"),
    or its mean over all windows ("mean"); runs that never logged it are left out."""
    values = []
    for r in records:
        if all(r[k] == v for k, v in where.items()):
            logged = [h[metric] for h in r["history"] if metric in h]
            if logged:
                values.append({"start": logged[0], "end": logged[-1], "mean": statistics.mean(logged)}[when])
    return values


DYNAMICS = [("logps/chosen", "start"), ("logps/chosen", "end"), ("logps/rejected", "start"),
            ("logps/rejected", "end"), ("triplet/logratio_anchor", "end"), ("triplet/logratio_chosen", "end"),
            ("triplet/logratio_rejected", "end"),
            ("triplet/distance_chosen", "end"), ("triplet/distance_rejected", "end"), ("triplet/active", "start"),
            ("triplet/active", "end"), ("triplet/active_on_flipped", "mean"), ("triplet/active_on_clean", "mean")]


def dynamics_table(records, methods, **where):
    """Markdown: what training does to the likelihoods and where Eq. 13's hinge acts. The policy's summed
    log-probabilities of the chosen and rejected responses (training batches, first and last logged window),
    the summed log-ratios of anchor, chosen and rejected responses at the end, the triplet's distances
    D(y, y_w) and D(y, y_l) at the end, the share of pairs with an active hinge, and that share among the
    label-flipped pairs and among the clean ones (mean over training)."""
    header = ["method", "logp chosen, start", "end", "logp rejected, start", "end", "log-ratio anchor, end",
              "chosen, end", "rejected, end", "D(y, y_w), end",
              "D(y, y_l), end", "hinge active, start", "end", "active on flipped", "active on clean"]
    rows = []
    for m in methods:
        row = [m]
        for metric, when in DYNAMICS:
            values = history_values(records, metric, when, method=m, **where)
            row.append(cell(values, 2 if metric.startswith(("logps", "triplet/distance", "triplet/logratio")) else 3)
                       if values else "")
        rows.append(row)
    return markdown(header, rows)


def write_tables(records, methods, noise_levels, output_dir):
    """Table B8 as table.csv and table.md, the other metrics as summary.md, every run as runs.csv.
    Returns the text printed for the user."""
    n_seeds = len({r["seed"] for r in records})
    seeds = f"mean ± standard deviation over {n_seeds} seeds" if n_seeds > 1 else "1 seed"
    title = f"Held-out preference accuracy by label noise ({seeds})"
    header = ["method"] + [f"noise {noise_label(n)}" for n in noise_levels]
    rows = [[m] + [cell(values_of(records, "accuracy", method=m, noise=n)) for n in noise_levels] for m in methods]
    table = markdown(header, rows)
    # What the policy generates, next to how it ranks the given pairs (the same runs)
    judge_title = f"The judge's score of the policy's samples and the policy's win rate against the reference ({seeds})"
    judge = markdown(["method"] + [f"{kind}, {noise_label(n)}" for n in noise_levels for kind in ("judge", "wins")],
                     [[m] + [cell(values_of(records, metric, method=m, noise=n))
                             for n in noise_levels for metric in ("judge/policy", "win_rate")] for m in methods])
    dynamics_title = (f"Training dynamics at noise {noise_label(noise_levels[len(noise_levels) // 2])} ({seeds}): "
                      "summed log-probabilities, the triplet's distances and where its hinge is active")
    dynamics = dynamics_table(records, methods, noise=noise_levels[len(noise_levels) // 2])
    paired_title = (f"Paired differences from DPO, seed by seed: mean [95% paired-t interval] over {n_seeds} seeds; "
                    "an interval that covers 0 is not distinguishable from DPO")
    paired = paired_table(records, methods, [(f"{label}, {noise_label(n)}", metric, {"noise": n})
                                             for label, metric in (("accuracy", "accuracy"), ("judge", "judge/policy"))
                                             for n in noise_levels])
    table = (f"{table}\n{judge_title}\n\n{judge}\n{paired_title}\n\n{paired}\n{dynamics_title}\n\n"
             f"{dynamics}")
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(f"{title}\n\n{table}")
    with open(os.path.join(output_dir, "table.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method"] + [f"{kind}@{noise_label(n)}" for n in noise_levels for kind in ("mean", "sd")])
        for m in methods:
            row = [m]
            for n in noise_levels:
                mean, sd = mean_and_spread(values_of(records, "accuracy", method=m, noise=n))
                row += [mean, "" if sd is None else sd]
            writer.writerow(row)

    # At the lowest noise level: the preference, the judge, the diversity (Table B9) and where the
    # hybrid weights of the trained policy go, next to uniform weights' share (the chance level).
    low = min(noise_levels)
    columns = {"accuracy": "accuracy", "margin": "margin", "judge/policy": "judge", "win_rate": "win rate",
               "distinct_2": "distinct-2", "distinct_4": "distinct-4", "token_entropy": "entropy (bits)",
               "self_bleu": "self-BLEU", "weights/hybrid/chosen/share": "hybrid share (chosen)",
               "weights/hybrid/chosen/top_k": "hybrid top-k (chosen)",
               "weights/uniform/chosen/share": "uniform share (chosen)"}
    summary_title = f"Other held-out metrics at noise {noise_label(low)} ({seeds})"
    summary = markdown(["method", *columns.values()],
                       [[m] + [cell(values_of(records, c, method=m, noise=low)) for c in columns] for m in methods])
    kinds = ["attribution", "hybrid", "prior", "uniform"]
    placement_method = "tidpo" if "tidpo" in methods else methods[0]
    placement_title = (f"Where the weights go: {placement_method} policies at noise {noise_label(low)}; share of "
                       f"the weight on the critical phrase and top-k hit rate (k = its length)")
    placement = markdown(["weights", "share (chosen)", "share (rejected)", "top-k (chosen)", "top-k (rejected)"],
                         [[k] + [cell(values_of(records, f"weights/{k}/{side}/{metric}", method=placement_method,
                                                noise=low))
                                 for metric in ("share", "top_k") for side in ("chosen", "rejected")]
                          for k in kinds])
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(f"{summary_title}\n\n{summary}\n{placement_title}\n\n{placement}")

    metrics = list(records[0]["after"])
    with open(os.path.join(output_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "noise", "seed", "seconds", *metrics])
        for r in records:
            writer.writerow([r["method"], r["noise"], r["seed"], r["seconds"], *(r["after"][m] for m in metrics)])
    return f"{title}\n\n{table}\n{summary_title}\n\n{summary}\n{placement_title}\n\n{placement}"


def write_plots(records, methods, noise_levels, output_dir):
    """curves.png: training loss (mean over seeds) by step, one panel per noise level;
    accuracy_vs_noise.png: held-out accuracy against label noise, mean and spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(noise_levels), figsize=(4.5 * len(noise_levels), 4), squeeze=False, sharey=True)
    for ax, noise in zip(axes[0], noise_levels):
        for method in methods:
            histories = [r["history"] for r in records if r["method"] == method and r["noise"] == noise]
            steps = [h["step"] for h in histories[0]]
            ax.plot(steps, [statistics.mean(h[i]["loss"] for h in histories) for i in range(len(steps))], label=method)
        ax.set_title(f"label noise {noise_label(noise)}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (mean over seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "curves.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        stats = [mean_and_spread(values_of(records, "accuracy", method=method, noise=n)) for n in noise_levels]
        ax.errorbar([100 * n for n in noise_levels], [mean for mean, _ in stats],
                    yerr=[spread or 0.0 for _, spread in stats], label=method, marker="o", capsize=3)
    ax.set_xlabel("label noise (%)")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "accuracy_vs_noise.png"), dpi=120)
    plt.close(fig)


def cpu_name():
    with open("/proc/cpuinfo") as cpuinfo:
        return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown CPU")


def grid(args, train_args):
    train.parse_args(train_args)  # a mistyped train.py flag stops here, not in the first worker
    output_dir = args.output_dir or os.path.join("runs", f"grid-{datetime.now():%Y%m%d-%H%M%S}")
    train_args = [*train_args, "--steps", str(args.steps)]
    n_runs = len(args.methods) * len(args.noise) * len(args.seeds)
    print(f"grid: {len(args.methods)} methods x {len(args.noise)} noise levels x {len(args.seeds)} seeds = {n_runs} "
          f"runs of {args.steps} steps, {args.jobs} at a time, into {output_dir}", flush=True)
    start = time.perf_counter()
    records = run_grid(args.methods, args.noise, args.seeds, train_args, output_dir, args.jobs)
    print("\n" + write_tables(records, args.methods, args.noise, output_dir))
    write_plots(records, args.methods, args.noise, output_dir)
    seconds = time.perf_counter() - start
    print(f"wrote table.csv, table.md, summary.md, runs.csv, curves.png, accuracy_vs_noise.png to {output_dir}")
    print(f"grid took {seconds // 60:.0f} min {seconds % 60:.0f} s wall-clock for {n_runs} runs ({args.jobs} at a "
          f"time) on {cpu_name()}, {os.cpu_count()} cores")
    return records


# ----------------------------------------------------------------------------- mechanism

PLACEMENT_KINDS = ["attribution", "no_final", "grad_x_input", "hybrid", "hybrid_no_final", "hybrid_grad_x_input",
                   "prior", "uniform"]


def mechanism_tables(records, methods, settings, lam=0.7):
    """The text of mechanism.md: per setting, the held-out preference of each method, then where
    each weighting puts the weight, on the SFT reference and on the TI-DPO (paper) policies."""
    n_seeds = len({r["seed"] for r in records})
    spread = f"mean ± standard deviation over {n_seeds} seeds" if n_seeds > 1 else "1 seed"
    parts = []
    for task, noise in settings:
        runs = [r for r in records if r["task"] == task]
        parts.append(f"### Task {task}, label noise {noise_label(noise)} ({spread})\n\n"
                     "Held-out preference by the plain DPO reward, on whole responses and on the critical "
                     "tokens alone; the judge's score of the policy's samples and its win rate against the "
                     "reference's\n")
        parts.append(markdown(["method", "accuracy", "critical accuracy", "margin", "critical margin", "judge",
                               "wins"],
                              [[m] + [cell(values_of(runs, metric, method=m))
                                      for metric in ("accuracy", "critical_accuracy", "margin", "critical_margin",
                                                     "judge/policy", "win_rate")]
                               for m in methods]))
        if "dpo" in methods:
            parts.append("\nPaired differences from DPO, seed by seed: mean [95% paired-t interval]\n")
            parts.append(paired_table(runs, methods, [(title, metric, {}) for title, metric in (
                ("accuracy", "accuracy"), ("critical accuracy", "critical_accuracy"), ("judge", "judge/policy"))]))
        parts.append("\nTraining dynamics: summed log-probabilities of the training batches' responses, the "
                     "triplet's distances and where its hinge is active\n")
        parts.append(dynamics_table(runs, methods))
        placement = []
        for kind in PLACEMENT_KINDS:
            row = [kind]
            for when, method in (("before", methods[0]), ("after", "tidpo")):
                for metric in ("share", "top_k"):
                    values = [r[when][f"weights/{kind}/chosen/{metric}"] for r in runs if r["method"] == method]
                    row.append(cell(values) if values else "")
            placement.append(row)
        parts.append("\nWhere the weights go on the chosen responses: share of the weight on the critical phrase and "
                     "top-k hit rate (k = its length); attribution, no_final and grad_x_input at lambda 1, the hybrid "
                     f"kinds at lambda {lam:g}\n")
        parts.append(markdown(["weights", "share, SFT reference", "top-k, SFT reference", "share, tidpo policy",
                               "top-k, tidpo policy"], placement))
        parts.append("\n")
    return "\n".join(parts)


def mechanism(args, train_args):
    lam = train.parse_args(train_args).lam  # and a mistyped train.py flag stops here, not in the first worker
    output_dir = args.output_dir or os.path.join("runs", f"mechanism-{datetime.now():%Y%m%d-%H%M%S}")
    train_args = [*train_args, "--steps", str(args.steps)]
    groups = []
    for task, noise in MECHANISM_SETTINGS:
        os.makedirs(os.path.join(output_dir, task, "runs"), exist_ok=True)
        groups += [{"methods": args.methods, "noise": noise, "seed": seed, "task": task,
                    "train_args": train_args, "output_dir": os.path.join(output_dir, task)}
                   for seed in args.seeds]
    n_runs = len(groups) * len(args.methods)
    print(f"mechanism: {len(args.methods)} methods x {len(MECHANISM_SETTINGS)} settings x {len(args.seeds)} seeds = "
          f"{n_runs} runs of {args.steps} steps, {args.jobs} at a time, into {output_dir}", flush=True)
    start = time.perf_counter()
    results = run_groups(groups, args.jobs)
    records = [{**r, "task": group["task"]} for group, group_records in zip(groups, results) for r in group_records]
    text = mechanism_tables(records, args.methods, MECHANISM_SETTINGS, lam)
    with open(os.path.join(output_dir, "mechanism.md"), "w") as f:
        f.write(text)
    metrics = list(records[0]["after"])
    with open(os.path.join(output_dir, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "method", "noise", "seed", "seconds", *metrics])
        for r in records:
            writer.writerow([r["task"], r["method"], r["noise"], r["seed"], r["seconds"],
                             *(r["after"][m] for m in metrics)])
    seconds = time.perf_counter() - start
    print("\n" + text)
    print(f"wrote mechanism.md and runs.csv to {output_dir}")
    print(f"mechanism took {seconds // 60:.0f} min {seconds % 60:.0f} s wall-clock for {n_runs} runs ({args.jobs} at "
          f"a time) on {cpu_name()}, {os.cpu_count()} cores")
    return records


# ----------------------------------------------------------------------------- token weights


# 256-colour backgrounds from white to red (the colour cube's (5, g, g) diagonal): heavier is redder
SHADES = [231, 224, 217, 210, 203, 196]
# Hybrid weights average 1 over a response (scale "mean"), so shading is on that fixed scale rather
# than relative to the largest weight, which one dominant token (often the end of sequence) would
# set: white at 0, full red at twice the average or more.
FULL_SHADE = 2.0


def load_pair(args):
    """(policy, tokenizer, encoded pair, name) as the weights command's flags ask for."""
    flags = ["--seed", str(args.seed), "--sft-steps", str(args.sft_steps), "--max-length", str(args.max_length)]
    train_args = train.parse_args([*flags, "--model", args.model] if args.model else flags)
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # the loading bar would stand above the shaded tokens
    tokenizer = setup.load_tokenizer(train_args)
    policy = setup.build_model(train_args, device, tokenizer)
    if not args.model:  # the built-in SFT reference, made as train.py makes it
        train.sft(policy, setup.load_pairs(train_args, tokenizer)[0], tokenizer, train_args, device, nullcontext(),
                  lambda line: None)
    if args.data:
        records = data.load_jsonl(args.data)
        if not 0 <= args.index < len(records):
            raise SystemExit(f"error: --index {args.index}: {args.data} has records 0 to {len(records) - 1}")
        record = records[args.index]
        pair = data.encode_pair(tokenizer, *data.render(tokenizer, record), args.max_length, record["source"])
        name = f"{os.path.splitext(os.path.basename(args.data))[0]}-{args.index}"
    else:
        heldout = setup.load_pairs(train_args, tokenizer)[1]
        if not 0 <= args.pair < len(heldout):
            raise SystemExit(f"error: --pair {args.pair}: the built-in held-out set has pairs 0 to {len(heldout) - 1}")
        pair, name = heldout[args.pair], f"builtin-heldout-{args.pair}"
    return policy, tokenizer, pair, name


def token_weights(policy, tokenizer, pair, lam):
    """{"prompt": text, "lam": lam, "chosen": [...], "rejected": [...]}: one entry per response
    token with its text, raw attribution I (Eq. 6), Gaussian prior P_prior (Eq. 7, peak 1), hybrid
    weight W (Eq. 8, mean 1 over the response) and, where the pair knows it (built-in task),
    whether it belongs to the critical phrase."""
    batch = data.collate([pair], tokenizer.pad_token_id)
    result = {"prompt": tokenizer.decode(pair["prompt_ids"], skip_special_tokens=True), "lam": lam}
    for side in data.RESPONSES:
        input_ids, attention_mask, response_mask = (batch[f"{side}_{name}"] for name in
                                                    ("input_ids", "attention_mask", "response_mask"))
        _, importance = tidpo.gradient_attribution(policy, input_ids, attention_mask, response_mask)
        hybrid = tidpo.hybrid_weights(importance, response_mask, lam=lam)
        keep = response_mask[0].bool()
        ids = pair[f"{side}_ids"]
        # Each token's text is what it adds to the decoded response, spaces included, so that the
        # pieces put together read like the response for word-level and sub-word tokenizers alike.
        texts = [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]
        pieces = [text[len(before):] for text, before in zip(texts, [""] + texts[:-1])]
        result[side] = [{"token": piece, "attribution": a, "prior": p, "hybrid": w}
                        for piece, a, p, w in zip(pieces, importance[0][keep].tolist(),
                                                  tidpo.gaussian_prior(len(ids)).tolist(), hybrid[0][keep].tolist())]
        if f"{side}_critical" in pair:
            for index, entry in enumerate(result[side]):
                entry["critical"] = index in pair[f"{side}_critical"]
    return result


def intensity(weight):
    return min(max(weight / FULL_SHADE, 0.0), 1.0)


def terminal_text(weights):
    """The responses as ANSI text: background by hybrid weight, critical tokens underlined."""
    lines = [f"prompt: {weights['prompt']}"]
    for side in data.RESPONSES:
        text = "".join(f"\x1b[30;48;5;{SHADES[round(intensity(t['hybrid']) * (len(SHADES) - 1))]}"
                       f"{';4' if t.get('critical') else ''}m{t['token']}\x1b[0m" for t in weights[side])
        lines.append(f"{side}: {text}")
    lines.append(f"background: hybrid weight, white at 0 to red at {FULL_SHADE:g}x the response's average; "
                 f"underlined: the critical phrase")
    return "\n".join(lines)


HTML_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{font-family: sans-serif; max-width: 60em; margin: 2em auto}}
.tokens {{font-family: monospace; white-space: pre-wrap; line-height: 1.8}}
</style></head><body>
<h1>Token weights: {title}</h1>
<p>prompt: {prompt}</p>
{sections}
<p>Background: the hybrid weight (Eq. 8, lambda {lam}), transparent at 0 and darkest at {full:g} times the
response's average weight or more; underlined: the critical phrase. Hover a token for its attribution (Eq. 6),
Gaussian prior (Eq. 7) and hybrid weight.</p>
</body></html>
"""


def html_page(weights, title):
    """A page with the responses shaded like terminal_text; hovering a token shows its numbers."""
    sections = []
    for side in data.RESPONSES:
        spans = [f'<span style="background: rgba(220, 0, 0, {intensity(t["hybrid"]):.3f})'
                 f'{"; text-decoration: underline" if t.get("critical") else ""}" title="attribution '
                 f'{t["attribution"]:.4g}, prior {t["prior"]:.4g}, hybrid {t["hybrid"]:.4g}">'
                 f'{html.escape(t["token"])}</span>' for t in weights[side]]
        sections.append(f'<h2>{side}</h2>\n<p class="tokens">{"".join(spans)}</p>')
    return HTML_PAGE.format(title=html.escape(title), prompt=html.escape(weights["prompt"]),
                            sections="\n".join(sections), lam=weights["lam"], full=FULL_SHADE)


def plain_text(weights):
    """The responses as plain text, for output that is not a terminal: each token followed by its
    hybrid weight, critical tokens between asterisks."""
    lines = [f"prompt: {weights['prompt']}"]
    for side in data.RESPONSES:
        text = ""
        for t in weights[side]:
            word = t["token"].lstrip()
            mark = "*" if t.get("critical") else ""
            text += f"{t['token'][:len(t['token']) - len(word)]}{mark}{word}{mark}[{t['hybrid']:.2f}]"
        lines.append(f"{side}: {text}")
    lines.append("[w]: the token's hybrid weight (the response's average is 1); *...*: the critical phrase")
    return "\n".join(lines)


def weights_figure(weights, title, path):
    """A PNG: for each response, every token's share of the attribution (Eq. 6, normalized), of the
    Gaussian prior (Eq. 7, normalized) and of the hybrid weight (Eq. 8); critical tokens in red."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(12, 6.5))
    for ax, side in zip(axes, data.RESPONSES):
        tokens = weights[side]
        shares = {name: torch.tensor([t[key] for t in tokens], dtype=torch.float64)
                  for name, key in (("attribution I (Eq. 6)", "attribution"), ("Gaussian prior (Eq. 7)", "prior"),
                                    (f"hybrid weight (Eq. 8, lambda {weights['lam']})", "hybrid"))}
        positions = torch.arange(len(tokens)).tolist()
        for offset, (name, values) in zip((-0.27, 0.0, 0.27), shares.items()):
            ax.bar([p + offset for p in positions], (values / values.sum()).tolist(), width=0.27, label=name)
        for p, t in zip(positions, tokens):
            if t.get("critical"):
                ax.axvspan(p - 0.45, p + 0.45, color="red", alpha=0.08, lw=0)
        ax.set_xticks(positions)
        ax.set_xticklabels([t["token"].strip() or repr(t["token"]) for t in tokens], rotation=60, fontsize=8)
        for label, t in zip(ax.get_xticklabels(), tokens):
            if t.get("critical"):
                label.set_color("red")
                label.set_fontweight("bold")
        ax.set_ylabel("share of the response")
        marked = any(t.get("critical") for t in tokens)
        ax.set_title(f"{side} response{' (critical phrase in red)' if marked else ''}", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def show_weights(args):
    policy, tokenizer, pair, name = load_pair(args)
    weights = token_weights(policy, tokenizer, pair, args.lam)
    title = f"{name}, {os.path.basename(os.path.normpath(args.model)) if args.model else 'built-in SFT reference'}"
    os.makedirs(args.output_dir, exist_ok=True)
    json_path, html_path = (os.path.join(args.output_dir, f"{name}.{ext}") for ext in ("json", "html"))
    with open(json_path, "w") as f:
        json.dump({"pair": name, "model": args.model or "built-in SFT reference", **weights}, f, indent=1)
    with open(html_path, "w") as f:
        f.write(html_page(weights, title))
    if args.png:
        weights_figure(weights, f"token weights of {title}", args.png)
    print(terminal_text(weights) if sys.stdout.isatty() else plain_text(weights))
    print(f"wrote {json_path} and {html_path}{f' and {args.png}' if args.png else ''}")
    return weights


# ----------------------------------------------------------------------------- the release's weights


def release_effect(args):
    """Eq. 12 alone (gamma 0, no KL, --beta) on the first --pairs training pairs of the built-in task, with
    the paper's weights and the release's: each weighting's mean weight on the responses, the prompt's share
    of the release's attribution, the loss, and its gradient's norm and cosine against the paper's. pi_ref
    is the built-in SFT reference (--seed, --sft-steps, made as train.py makes it); pi_theta is --model (a
    policy that train.py saved from that reference) or, by default, the reference itself, where every
    weighting's loss is log 2 and only the gradient (the first step's) differs."""
    flags = ["--seed", str(args.seed), "--sft-steps", str(args.sft_steps), "--beta", str(args.beta)]
    train_args = train.parse_args(flags)
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    tokenizer = setup.load_tokenizer(train_args)
    pairs = setup.load_pairs(train_args, tokenizer)[0]
    ref = setup.build_model(train_args, device, tokenizer)
    train.sft(ref, pairs, tokenizer, train_args, device, nullcontext(), lambda line: None)
    ref.requires_grad_(False)
    if args.model:
        policy = setup.build_model(train.parse_args([*flags, "--model", args.model]), device, tokenizer)
    else:
        policy = copy.deepcopy(ref).requires_grad_(True)
    input_ids, attention_mask, response_mask = data.stack_pair(data.collate(pairs[:args.pairs], tokenizer.pad_token_id),
                                                                tokenizer.pad_token_id)
    ref_logps = train.reference_logps(ref, input_ids, attention_mask, response_mask)[1]
    n = args.pairs
    weightings = [("paper, lambda 0.7", train.hybrid_token_weights, 0.7),
                  ("release, lambda 0.7", release_weights, 0.7), ("release, lambda 0.2", release_weights, 0.2)]
    rows, paper_grad = [], None
    for name, weigh, lam in weightings:
        policy.zero_grad(set_to_none=True)
        logits, weights = weigh(policy, input_ids, attention_mask, response_mask, {}, argparse.Namespace(lam=lam))
        logps = tidpo.token_logps(logits, input_ids, response_mask)
        loss, _ = tidpo.tidpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], weights[:n], weights[n:],
                                   beta=args.beta, gamma=0.0)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).double()
        paper_grad = grad if paper_grad is None else paper_grad
        mean_weight = (weights.sum(-1) / response_mask.sum(-1)).mean().item()
        cosine = torch.nn.functional.cosine_similarity(grad, paper_grad, dim=0)
        rows.append([name, f"{mean_weight:.3f}", f"{loss.item():.4f}",
                     f"{(grad.norm() / paper_grad.norm()).item():.3f}", f"{cosine.item():.3f}"])
    _, grad, _ = tidpo.target_gradient(policy, input_ids, attention_mask, response_mask)
    importance = tidpo.importance_scores(grad, attention_mask)
    prompt_share = (importance * (1 - response_mask)).sum(-1) / importance.sum(-1)
    text = (markdown(["weights", "mean weight on the responses", "Eq. 12 loss", "gradient norm / paper's",
                      "cosine with the paper's gradient"], rows)
            + f"\nthe prompt's share of the release's attribution: {prompt_share.mean().item():.3f} "
              f"± {prompt_share.std().item():.3f} over the {2 * n} rows")
    print(text)
    return text


# ----------------------------------------------------------------------------- where the weight goes on real pairs


# The attributions compared by the attribution command: (name, scores from target_gradient's outputs, Eq. 8)
PLACEMENTS = ("paper (Eq. 5-6, 8)", "final token left out", "gradient x input, final left out",
              "release (over prompt and response)")
PARTS = ("share", "final", "others", "largest other")


def response_placement(weights, response_mask):
    """Per response row of [B, L] weights: (share of the response's weight on its final token, that
    token's weight, the other tokens' mean weight and their largest, with the response's mean weight = 1)."""
    last = tidpo.last_response_position(response_mask)
    weights = weights * response_mask
    total, length = weights.sum(-1), response_mask.sum(-1)
    final = weights.gather(-1, last[:, None]).squeeze(-1)
    mean = total / length
    largest = weights.scatter(-1, last[:, None], 0.0).amax(-1)
    return final / total, final / mean, (total - final) / (length - 1) / mean, largest / mean


def attribution_placement(args):
    """Over every pair of --data, on --model: the share of Eq. 6's attribution on each response's final
    token, and where four attributions' hybrid weights (Eq. 8 at --lam) put the weight, the final token
    against the rest of the response. Prints a table and returns {name: [per-response values]}."""
    train_args = train.parse_args(["--model", args.model, "--max-length", str(args.max_length)])
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    tokenizer = setup.load_tokenizer(train_args)
    policy = setup.build_model(train_args, torch.device("cpu"), tokenizer)
    records = data.load_jsonl(args.data)
    pairs = [data.encode_pair(tokenizer, *data.render(tokenizer, r), args.max_length, r["source"]) for r in records]
    values = {name: [] for name in ["attribution on the final token", "final token is an end id",
                                    *[f"{p}: {q}" for p in PLACEMENTS for q in PARTS]]}
    ends = set(sampling.end_ids(policy, tokenizer))
    for start in range(0, len(pairs), 8):
        batch = data.collate(pairs[start:start + 8], tokenizer.pad_token_id)
        input_ids, attention_mask, response_mask = data.stack_pair(batch, tokenizer.pad_token_id)
        _, grad, embeddings = tidpo.target_gradient(policy, input_ids, attention_mask, response_mask)
        paper = tidpo.importance_scores(grad, response_mask)
        share = paper.gather(-1, tidpo.last_response_position(response_mask)[:, None]).squeeze(-1) / paper.sum(-1)
        values["attribution on the final token"] += share.tolist()
        last_ids = input_ids.gather(-1, tidpo.last_response_position(response_mask)[:, None]).squeeze(-1)
        values["final token is an end id"] += [float(i in ends) for i in last_ids.tolist()]
        weights = [tidpo.hybrid_weights(paper, response_mask, lam=args.lam),
                   *[tidpo.hybrid_weights(variant_importance(grad, embeddings, response_mask, kind), response_mask,
                                          lam=args.lam) for kind in ("no-final", "grad-x-input")],
                   release_hybrid_weights(tidpo.importance_scores(grad, attention_mask), attention_mask,
                                          response_mask, lam=args.lam)]
        for name, w in zip(PLACEMENTS, weights):
            for part, numbers in zip(PARTS, response_placement(w, response_mask)):
                values[f"{name}: {part}"] += numbers.tolist()

    def spread(numbers):
        mean, sd = statistics.mean(numbers), statistics.stdev(numbers)
        return f"{mean:.3f} ± {sd:.3f} [{min(numbers):.3f}, {max(numbers):.3f}]"

    n = len(values["attribution on the final token"])
    rows = [[name, *(spread(values[f"{name}: {part}"]) for part in PARTS)] for name in PLACEMENTS]
    text = (f"{args.model} on {args.data}: {len(records)} pairs, {n} responses; "
            f"{sum(values['final token is an end id']):.0f} of them end with an end id\n"
            f"Eq. 6's attribution on the final token: {spread(values['attribution on the final token'])} "
            "(mean ± sd [min, max] over the responses)\n\n"
            f"Hybrid weights (Eq. 8, lambda {args.lam:g}), each response's mean weight = 1:\n"
            + markdown(["attribution", "share of the weight on the final token", "final token's weight",
                        "other tokens' mean weight", "other tokens' largest weight"], rows))
    print(text)
    return values


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    m = commands.add_parser("mechanism", help="the default: where token weights matter, on two settings of the "
                            "built-in task", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            epilog="Any other flag is passed to every train.py run.")
    m.add_argument("--methods", nargs="+", choices=list(METHODS), default=MECHANISM_METHODS, metavar="METHOD",
                   help=f"some of: {', '.join(METHODS)}")
    m.add_argument("--seeds", nargs="+", type=int, default=MECHANISM_SEEDS, help="seeds")
    m.add_argument("--steps", type=int, default=STEPS, help="TI-DPO/DPO steps per run")
    m.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time, one thread each")
    m.add_argument("--output-dir", default=None, help="default: runs/mechanism-<date-time>")

    g = commands.add_parser("grid", help="methods x label noise x seeds on the built-in task; Table B8 and plots",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            epilog="Any other flag is passed to every train.py run.")
    g.add_argument("--methods", nargs="+", choices=list(METHODS), default=GRID_METHODS, metavar="METHOD",
                   help=f"some of: {', '.join(METHODS)}")
    g.add_argument("--noise", nargs="+", type=float, default=NOISE, help="label noise levels (fractions)")
    g.add_argument("--seeds", nargs="+", type=int, default=SEEDS, help="seeds (each: its own task, model and SFT)")
    g.add_argument("--steps", type=int, default=STEPS, help="TI-DPO/DPO steps per run")
    g.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time, one thread each")
    g.add_argument("--output-dir", default=None, help="default: runs/grid-<date-time>")

    r = commands.add_parser("run", help="one run of a method on the built-in task, as the grid and the mechanism "
                            "study run it", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            epilog="Any other flag is passed to train.py (e.g. --sft-steps 60).")
    r.add_argument("--method", choices=list(METHODS), default="tidpo", metavar="METHOD",
                   help=f"one of: {', '.join(METHODS)}")
    r.add_argument("--noise", type=float, default=0.0, help="label noise: the share of training pairs flipped")
    r.add_argument("--task", choices=builtin_task.SETTINGS, default="default", help="the built-in task's setting "
                   "(spurious: a cue sentence that follows the training labels, not the held-out ones)")
    r.add_argument("--seed", type=int, default=0, help="seed")
    r.add_argument("--steps", type=int, default=STEPS, help="TI-DPO/DPO steps (the grid's)")
    r.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw", help="rmsprop: the "
                   "authors' release's (with --lr 5e-6 --warmup-steps 150 as there)")
    r.add_argument("--output-dir", default=None, help="default: runs/<method>-noise<N>-seed<S>")

    w = commands.add_parser("weights", help="one pair's tokens shaded by their weights; JSON and HTML",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    w.add_argument("--pair", type=int, default=0, help="index into the built-in held-out pairs")
    w.add_argument("--data", default=None, help="a preference JSONL instead of the built-in task")
    w.add_argument("--index", type=int, default=0, help="which record of --data")
    w.add_argument("--model", default=None, help="a trained policy folder (train.py writes OUTPUT/policy); "
                   "default: the built-in SFT reference, trained here first (--seed, --sft-steps)")
    w.add_argument("--lam", type=float, default=0.7, help="lambda of Eq. 8 for the hybrid weight")
    w.add_argument("--seed", type=int, default=0, help="built-in task and SFT reference seed")
    w.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the built-in reference")
    w.add_argument("--max-length", type=int, default=256, help="prompt + response tokens, as in train.py")
    w.add_argument("--output-dir", default=os.path.join("runs", "weights"), help="where the JSON and HTML go")
    w.add_argument("--png", default=None, help="also draw the figure of the README (docs/weights.png) to this file")
    e = commands.add_parser("release", help="Eq. 12's loss and gradient on one batch with the release's weights "
                            "against the paper's", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default=None, help="pi_theta: a policy that train.py saved from the built-in "
                   "reference of --seed; default: the reference itself")
    e.add_argument("--pairs", type=int, default=16, help="the first N built-in training pairs: one batch")
    e.add_argument("--beta", type=float, default=0.1, help="beta of Eq. 12, the same for every weighting")
    e.add_argument("--seed", type=int, default=0, help="built-in task and SFT reference seed")
    e.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the built-in reference")
    a = commands.add_parser("attribution", help="where Eq. 5-6 and its variants put the weight over a JSONL of "
                            "pairs: the final token against the rest",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a.add_argument("--model", required=True, help="a model folder or hub name (e.g. python -m tools.smollm2's)")
    a.add_argument("--data", required=True, help="a preference JSONL (e.g. examples/instruction_pairs.jsonl)")
    a.add_argument("--lam", type=float, default=0.7, help="lambda of Eq. 8")
    a.add_argument("--max-length", type=int, default=256, help="prompt + response tokens, as in train.py")
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["mechanism", *argv]  # no command: the default one, with these flags
    args, rest = p.parse_known_args(argv)
    if args.command in ("weights", "release", "attribution") and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return args, rest


def run_one(args, train_args):
    """One run of a grid or the mechanism study, as run_group runs it (one thread)."""
    output_dir = args.output_dir or os.path.join("runs", f"{args.method}-noise{args.noise}-seed{args.seed}")
    argv = [*train_args, *METHODS[args.method], "--seed", str(args.seed), "--steps", str(args.steps),
            "--output-dir", output_dir]
    torch.set_num_threads(1)
    return train.main(argv, hooks=method_hooks(args.method, args.noise, args.task, args.optimizer))


def main(argv=None):
    args, train_args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command == "run":
        return run_one(args, train_args)
    if args.command == "grid":
        return grid(args, train_args)
    if args.command == "mechanism":
        return mechanism(args, train_args)
    if args.command == "release":
        return release_effect(args)
    if args.command == "attribution":
        return attribution_placement(args)
    return show_weights(args)


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:
        sys.exit(f"error: {error}")
