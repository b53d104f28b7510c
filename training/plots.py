"""Pictures of train.py runs: each run's curves, and two or more runs side by side.

    python -m training.plots runs/dpo-20261202-1200 runs/tidpo-20261202-1210 -o dpo_vs_tidpo.png

Each run folder's metrics.jsonl holds the logged means of every window of steps; train.py draws a
run's own curves.png at its end when matplotlib is installed (nothing else here needs it). The
panels: the loss and its two terms, the training batches' weighted accuracy and margin (Eq. 11),
the summed log-probabilities of the chosen and rejected responses, the triplet's distances and
the share of pairs whose hinge is active (full TI-DPO only), and the held-out accuracy and margin
(the plain DPO reward) before the loop (step 0), every --eval-every steps and after it.
"""

import argparse
import json
import os
import sys

PANELS = [  # (title, [(metric, label)])
    ("loss", [("loss", "loss"), ("loss/dpo_w", "Eq. 12"), ("loss/triplet", "Eq. 13, before gamma")]),
    ("weighted accuracy (training batches)", [("rewards/accuracies", "accuracy")]),
    ("weighted margin (training batches)", [("rewards/margins", "margin")]),
    ("summed log-probabilities", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("triplet distances", [("triplet/distance_chosen", "D(y, y_w)"), ("triplet/distance_rejected", "D(y, y_l)")]),
    ("triplet active", [("triplet/active", "share of pairs")]),
    ("held-out (plain DPO reward)", [("eval/accuracy", "accuracy"), ("eval/margin", "margin")]),
]


def records(run_dir):
    """The run's metrics.jsonl records, in order."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        lines = open(path).read().splitlines()
    except OSError as error:
        raise SystemExit(f"error: {run_dir}: cannot read {path} ({error.strerror}); is it a train.py run folder?")
    return [json.loads(line) for line in lines]


def history(run_dir):
    """The run's logged training windows, by step (a resumed run's later records win)."""
    found = {record["step"]: record for record in records(run_dir) if record.get("phase") == "train"}
    if not found:
        raise SystemExit(f"error: {run_dir}: {os.path.join(run_dir, 'metrics.jsonl')} holds no training steps yet")
    return [found[step] for step in sorted(found)]


def evaluations(run_dir):
    """The run's held-out evaluations by step, as {"step", "eval/accuracy", "eval/margin"}: the one
    before the loop at step 0, those of --eval-every at theirs, the one after the loop at the last
    step logged before it (a resumed run's later records win)."""
    found, last_step = {}, 0
    for record in records(run_dir):
        last_step = record.get("step", last_step)
        if record.get("phase") == "eval":
            step = 0 if record.get("when") == "before" else record.get("step", last_step)
            found[step] = {"step": step, "eval/accuracy": record["accuracy"], "eval/margin": record["margin"]}
    return [found[step] for step in sorted(found)]


def draw(runs, path):
    """One figure of PANELS for {name: records with a step}; panels no run has are left out.
    Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    panels = [(title, lines) for title, lines in PANELS
              if any(metric in r for h in runs.values() for r in h for metric, _ in lines)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for name, records in runs.items():
            for metric, label in lines:
                points = [(r["step"], r[metric]) for r in records if metric in r]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, marker=".", label=f"{name}: {label}" if len(runs) > 1 else label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_curves(run_dir):
    """Draw <run_dir>/curves.png; None, drawing nothing, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return draw({os.path.basename(os.path.normpath(run_dir)): history(run_dir) + evaluations(run_dir)},
                os.path.join(run_dir, "curves.png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py run folders (their metrics.jsonl)")
    p.add_argument("-o", "--output", default="runs.png", help="the PNG to write")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: drawing needs matplotlib (pip install matplotlib)") from None
    names = [os.path.basename(os.path.normpath(run)) for run in args.runs]
    runs = {name if names.count(name) == 1 else run: history(run) + evaluations(run)
            for name, run in zip(names, args.runs)}
    print(f"wrote {draw(runs, args.output)}")


if __name__ == "__main__":
    sys.exit(main())
