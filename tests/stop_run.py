"""train.py as run from the command line, with signals sent to this process inside a given step.

    python tests/stop_run.py SIGNAL STEP[,STEP...] RANKS [train.py's flags]

SIGNAL (SIGTERM or SIGINT) is sent to this process, by itself, once in each listed step (twice
for a step listed twice), after the step's backward and before its update: in the middle of the
step, where a job's time limit or a Ctrl-C lands. RANKS: the processes that get it (all: "all").
With STOP_RUN_SAME_STOP_SECONDS set, train.py's window for one stop's repeats is that long.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from training import distributed, stopping  # noqa: E402

name, steps, ranks, *flags = sys.argv[1:]
steps = [int(step) for step in steps.split(",")]
rank = int(os.environ.get("RANK", 0))
if "STOP_RUN_SAME_STOP_SECONDS" in os.environ:
    stopping.SAME_STOP_SECONDS = float(os.environ["STOP_RUN_SAME_STOP_SECONDS"])
calls = []
clip_grad_norm = distributed.clip_grad_norm


def clip_and_signal(*args, **kwargs):
    """distributed.clip_grad_norm (once per step, between the backward and the update), which
    also sends the signal in the listed steps."""
    calls.append(1)
    if ranks == "all" or str(rank) in ranks.split(","):
        for _ in range(steps.count(len(calls))):
            os.kill(os.getpid(), getattr(signal, name))
    return clip_grad_norm(*args, **kwargs)


distributed.clip_grad_norm = clip_and_signal
sys.argv = [str(ROOT / "train.py"), *flags]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
