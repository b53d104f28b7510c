"""How a process under torchrun leaves the process group at exit (run by test_reliability.py).

    torchrun --nproc_per_node=2 tests/exit_group.py end|usage|crash FOLDER SECONDS

Each process joins the group as train.py does (training/distributed.py), then ends: "end" by
returning, "usage" by SystemExit with a message (as a usage error ends every process), "crash" by
an exception on rank 1 alone. Rank 0 first sleeps SECONDS (a rank still writing the policy while
the others are done). Each process writes FOLDER/rank-R.json: when it reached its exit and when it
had left the group.
"""

import atexit
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training import distributed  # noqa: E402

how, folder, seconds = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
times = {}


def write_times():  # registered before the group's own exit hook, so it runs after it
    times["left"] = time.time()
    (folder / f"rank-{os.environ['RANK']}.json").write_text(json.dumps(times))


atexit.register(write_times)
rank, world_size, _ = distributed.setup(torch.device("cpu"))
all_ranks = torch.ones(1)
distributed.all_reduce_sum(all_ranks, world_size)  # one collective, as a run makes many
if rank == 0:
    time.sleep(seconds)
times["exit"] = time.time()
if how == "usage":
    sys.exit("error: a usage error every process meets")
if how == "crash" and rank == 1:
    raise RuntimeError("a failure of this process alone")
