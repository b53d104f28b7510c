"""Watching a run: its tokens per second, and its records in TensorBoard or Weights & Biases.

    Throughput()                 the tokens a run trains on and samples, per second
    check_report_to(name)        --report-to's package is installed, or a one-line error naming it
    open_tracker(args, resume)   --report-to's tracker (rank 0), or None
    tracker_scalars(record)      a metrics.jsonl record's numbers under TRL's names, and its step
    trim_metrics(path, step)     a resumed run's metrics.jsonl without the records it logs again

Every record that train.py writes to metrics.jsonl goes to the tracker as well (setup.Run.log):
the training windows as train/<name>, the held-out evaluations as eval/<name>, with TRL's names
where TRL has the metric (train/loss, train/rewards/margins, eval/rewards/accuracies, ...), so that
a TI-DPO run and a TRL DPOTrainer run can share one dashboard. The run's flags are its config.
tensorboard and wandb are optional packages, imported only when --report-to names them.
"""

import importlib.util
import json
import os
import time

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to: the package it needs

# the held-out numbers under TRL's names: evaluate's accuracy and margin are TRL's eval
# rewards/accuracies and rewards/margins (the plain DPO reward, ties counting half)
EVAL_NAMES = {"accuracy": "rewards/accuracies", "margin": "rewards/margins"}


class Throughput:
    """Tokens per second since the last progress line, counted apart: the training pairs' tokens
    (prompt and response, of chosen and of rejected; padding left out) and the anchors' sampled
    tokens (Eq. 13's responses, sampled in every TI-DPO step with the triplet).

    count(batch) takes each micro-batch as it comes (all processes' rows, on the CPU: no wait for
    the device); the anchors' tokens are the window's mean sampled length per anchor (the step
    metric anchor_tokens, averaged over the processes) times its pairs, one anchor per pair. The
    clock starts at a window's first micro-batch, so that an evaluation or a checkpoint written
    after a progress line does not count in the next one (one in the middle of a window does)."""

    def __init__(self):
        self.start, self.pair_tokens, self.pairs = None, 0, 0

    def count(self, batch):
        self.start = self.start or time.perf_counter()
        for side in ("chosen", "rejected"):
            self.pair_tokens += int(batch[f"{side}_attention_mask"].sum())
        self.pairs += len(batch["chosen_input_ids"])
        return batch

    def window(self, steps, logged):
        """(seconds per step, {tokens_per_second/pairs, tokens_per_second/anchors}) of the last
        `steps` steps, whose logged means are `logged`; starts the next window."""
        elapsed = time.perf_counter() - self.start
        rates = {"tokens_per_second/pairs": self.pair_tokens / elapsed}
        if "anchor_tokens" in logged:
            rates["tokens_per_second/anchors"] = logged["anchor_tokens"] * self.pairs / elapsed
        self.__init__()
        return elapsed / steps, rates


def rates_text(rates):
    """'tokens/s 12.3k pairs + 1.2k anchors' (or without the anchors: DPO, --gamma 0)."""
    def short(value):
        return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"

    text = f"tokens/s {short(rates['tokens_per_second/pairs'])} pairs"
    if "tokens_per_second/anchors" in rates:
        text += f" + {short(rates['tokens_per_second/anchors'])} anchors"
    return text


def check_report_to(name):
    """A one-line error (SystemExit) when --report-to's package is not installed; before the run
    makes its folder, so that a run is not lost for want of its dashboard."""
    package = PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise SystemExit(f"error: --report-to {name} needs the {package} package, which is not installed: "
                         f"pip install {package}")


def tracker_scalars(record, last_step):
    """(step, {name: value}) of a metrics.jsonl record for a tracker; ({}) for records that hold
    no numbers to draw (warnings, resume and stop notes).

    Training windows: train/<name> at their step. Held-out evaluations: eval/<name> (accuracy and
    margin under TRL's names) at their step; "before" at step 0, "after" at the last step logged
    (`last_step`)."""
    phase = record.get("phase")
    if phase == "train":
        step, prefix, names = record["step"], "train/", {}
    elif phase == "eval":
        step = {"before": 0, "after": last_step}.get(record.get("when"), record.get("step", last_step))
        prefix, names = "eval/", EVAL_NAMES
    else:
        return record.get("step", last_step), {}
    numbers = {prefix + names.get(name, name): float(value) for name, value in record.items()
               if name not in ("phase", "step", "when") and isinstance(value, (int, float))
               and not isinstance(value, bool)}
    return step, numbers


class TensorBoard:
    """Scalars in <output-dir>/tensorboard/ (tensorboard --logdir runs/ shows every run)."""

    def __init__(self, args, first_step):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run purges what the stopped run logged after its checkpoint: those steps are
        # logged again, and TensorBoard hides the old events from first_step on.
        self.writer = SummaryWriter(os.path.join(args.output_dir, "tensorboard"),
                                    purge_step=first_step if first_step > 1 else None)
        if first_step == 1:
            flags = "\n".join(f"    --{name.replace('_', '-')} {value}" for name, value in sorted(vars(args).items()))
            self.writer.add_text("config", flags)  # an indented block: TensorBoard shows it as code

    def log(self, step, scalars, record):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)
        if not scalars:  # a warning, a resume or a stop: kept as text at its step
            self.writer.add_text(f"run/{record.get('phase', 'note')}", json.dumps(record), global_step=step)
        self.writer.flush()  # a job stopped by its time limit keeps everything logged so far

    def close(self):
        self.writer.close()


class WandB:
    """A Weights & Biases run (WANDB_PROJECT, default tidpo; WANDB_MODE=offline for no network),
    its files in <output-dir>/wandb/. A resumed run continues the same W&B run: its id is kept
    in <output-dir>/wandb/tidpo-run-id."""

    def __init__(self, args, first_step):
        import wandb

        folder = os.path.join(args.output_dir, "wandb")
        id_path = os.path.join(folder, "tidpo-run-id")
        run_id = open(id_path).read().strip() if first_step > 1 and os.path.isfile(id_path) else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tidpo"), dir=args.output_dir,
                              name=os.path.basename(os.path.normpath(args.output_dir)), config=vars(args),
                              id=run_id, resume="allow" if run_id else None)
        os.makedirs(folder, exist_ok=True)
        with open(id_path, "w") as file:
            file.write(self.run.id)

    def log(self, step, scalars, record):
        if scalars:  # the notes (warnings, resume, stop) reach W&B as the printed log
            self.run.log(scalars, step=step)

    def close(self):
        self.run.finish()


class Tracker:
    """--report-to's tracker, fed every record of metrics.jsonl (setup.Run.log)."""

    def __init__(self, backend, first_step):
        self.backend, self.last_step = backend, first_step - 1

    def log(self, record):
        step, scalars = tracker_scalars(record, self.last_step)
        self.last_step = max(self.last_step, step)
        self.backend.log(step, scalars, record)

    def close(self):
        self.backend.close()


def open_tracker(args, resume):
    """The tracker --report-to names (the output folder exists), or None for none."""
    if args.report_to == "none":
        return None
    first_step = resume["step"] + 1 if resume else 1
    backend = {"tensorboard": TensorBoard, "wandb": WandB}[args.report_to](args, first_step)
    return Tracker(backend, first_step)


def trim_metrics(path, step):
    """Drop from a resumed run's metrics.jsonl the records of steps after `step`, its checkpoint:
    a run stopped by a crash had logged some of them, and the resumed run logs them again, so each
    step keeps one record (the history in the file is the uninterrupted run's)."""
    if not os.path.isfile(path):
        return
    lines = open(path).read().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as file:
            file.writelines(kept)
        os.replace(path + ".tmp", path)

