"""TI-DPO on one preference pair, by hand: every number of Eq. 7-14 for two short responses and an anchor.

    python examples/worked_example.py

The importance scores stand in for Eq. 5-6's (a real model's are in docs/weights.png), and the
per-token log-ratios (of the two responses and of a sampled anchor) for a policy that has moved a
little away from its reference; everything
after them is computed by tidpo.py's own functions. The README prints this script's output.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tidpo  # noqa: E402

LAM, BETA, GAMMA, MARGIN = 0.7, 0.1, 0.1, 0.01  # the paper's lambda, beta, gamma; the release's alpha

# Two responses to "My father has had a fever for a week. What should we do?"
PAIR = {
    "chosen": {"tokens": ["see", "a", "doctor", "promptly", "<eos>"],
               "importance": [0.9, 0.6, 2.1, 1.6, 4.6],         # I_i of Eq. 6 (the end token is largest)
               "logratio": [0.05, 0.02, 0.40, 0.30, 0.01]},     # log pi_theta(y_t) - log pi_ref(y_t)
    "rejected": {"tokens": ["take", "painkillers", "casually", "<eos>"],
                 "importance": [1.2, 2.7, 1.5, 4.2],
                 "logratio": [-0.02, -0.50, -0.20, 0.01]},
}
# Eq. 13's anchor: a response sampled from the policy for the same prompt, with its per-token log-ratios
ANCHOR = {"tokens": ["rest", "at", "home", "<eos>"], "logratio": [-0.05, -0.10, -0.10, 0.01]}


def side(name, width):
    """Print one response's table; return its log-ratios, weights and mask as [1, width] tensors
    (the response, then zeros: the loss functions take a batch of equally long rows)."""
    entry = PAIR[name]
    length = len(entry["tokens"])
    importance = torch.tensor([entry["importance"]], dtype=torch.float64)
    logratio = torch.tensor([entry["logratio"]], dtype=torch.float64)
    mask = torch.ones(1, length, dtype=torch.long)
    prior = tidpo.gaussian_prior(length, dtype=torch.float64)                         # Eq. 7
    weights = tidpo.hybrid_weights(importance, mask, lam=LAM, scale="mean")           # Eq. 8, mean 1
    print(f"{name} (T = {length}):")
    print(f"  {'token':<12}{'I':>6}{'I/sum I':>9}{'prior':>8}{'P/sum P':>9}{'w':>8}{'lr':>8}{'w * lr':>9}")
    for t in range(length):
        print(f"  {entry['tokens'][t]:<12}{importance[0, t]:>6.2f}{importance[0, t] / importance.sum():>9.4f}"
              f"{prior[t]:>8.4f}{prior[t] / prior.sum():>9.4f}{weights[0, t]:>8.4f}{logratio[0, t]:>8.2f}"
              f"{weights[0, t] * logratio[0, t]:>9.4f}")
    weighted = tidpo.weighted_logratio(logratio, torch.zeros_like(logratio), weights)  # Eq. 11, one side
    print(f"  weighted log-ratio sum_t w_t lr_t = {weighted.item():.4f}   (DPO's unweighted sum: "
          f"{logratio.sum().item():.4f})")
    return [torch.nn.functional.pad(x, (0, width - length)) for x in (logratio, weights, mask)]


def triplet_table(chosen_logratio, rejected_logratio):
    """Print Eq. 13 token by token: the anchor against each response, over the positions both have."""
    a, w, l = ANCHOR["logratio"], PAIR["chosen"]["logratio"], PAIR["rejected"]["logratio"]
    print(f"anchor (T = {len(a)}) against chosen (T = {len(w)}) and rejected (T = {len(l)}), position by position:")
    print(f"  {'t':>2}  {'anchor':<8}{'a_t':>7}{'w_t':>7}{'l_t':>7}{'(a-w)^2':>9}{'(a-l)^2':>9}")
    for t in range(max(len(a), len(w), len(l))):
        cells = [f"{x[t]:>7.2f}" if t < len(x) else f"{'':>7}" for x in (a, w, l)]
        to_w = f"{(a[t] - w[t]) ** 2:>9.4f}" if t < min(len(a), len(w)) else f"{'-':>9}"
        to_l = f"{(a[t] - l[t]) ** 2:>9.4f}" if t < min(len(a), len(l)) else f"{'-':>9}"
        token = ANCHOR["tokens"][t] if t < len(a) else ""
        print(f"  {t:>2}  {token:<8}{''.join(cells)}{to_w}{to_l}")
    anchor = torch.tensor([a], dtype=torch.float64)
    mask = torch.ones_like(anchor)
    chosen_mask, rejected_mask = torch.ones(1, len(w)), torch.ones(1, len(l))
    to_chosen = tidpo.triplet_distance(anchor, mask, chosen_logratio[:, :len(w)], chosen_mask).item()
    to_rejected = tidpo.triplet_distance(anchor, mask, rejected_logratio[:, :len(l)], rejected_mask).item()
    print(f"  D(y, y_w) = {to_chosen:.4f}, D(y, y_l) = {to_rejected:.4f}")
    return anchor, mask


def main():
    width = max(len(entry["tokens"]) for entry in PAIR.values())
    chosen_logratio, chosen_weights, chosen_mask = side("chosen", width)
    rejected_logratio, rejected_weights, rejected_mask = side("rejected", width)
    anchor, anchor_mask = triplet_table(chosen_logratio, rejected_logratio)
    # The loss takes policy and reference log-probs; log-ratios against a zero reference are the same.
    zeros = torch.zeros_like(chosen_logratio)
    loss, metrics = tidpo.tidpo_loss(chosen_logratio, rejected_logratio, zeros, zeros, chosen_weights,
                                     rejected_weights, beta=BETA, anchor_logratios=anchor, anchor_mask=anchor_mask,
                                     chosen_mask=chosen_mask, rejected_mask=rejected_mask, gamma=GAMMA,
                                     margin=MARGIN)
    dpo_loss, _ = tidpo.tidpo_loss(chosen_logratio, rejected_logratio, zeros, zeros, chosen_mask,
                                   rejected_mask, beta=BETA, gamma=0.0)                # Eq. 3
    delta = metrics["rewards/margins"].item() / BETA
    print(f"Eq. 11  Delta_r_token = {delta:.4f}")
    print(f"Eq. 12  L_DPO-w = -log sigmoid({BETA} * {delta:.4f}) = {metrics['loss/dpo_w'].item():.4f}")
    print(f"Eq. 13  L_triplet = max(0, D(y, y_w) - D(y, y_l) + alpha), alpha = {MARGIN}: "
          f"{metrics['loss/triplet'].item():.4f}")
    print(f"Eq. 14  L_TI-DPO = L_DPO-w + {GAMMA} * L_triplet = {loss.item():.4f}")
    print(f"Eq. 3   DPO on the same pair (all weights 1): {dpo_loss.item():.4f}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()  # no flags; --help says what it is
    main()
