"""Stopping a run safely: SIGTERM or Ctrl-C ends the step in progress, writes a checkpoint, and
one line says how to continue.

A cluster stops a job with SIGTERM (Slurm at the job's time limit, or earlier with --signal), a
user with Ctrl-C (SIGINT). During train.py's loop either one only marks the run: the step in
progress ends, a checkpoint is written (with or without --save-every; under torchrun by every
process, sharded with --fsdp), and the run exits with status 128 + the signal's number and one
line that names the checkpoint and the command that continues it with --resume latest. The resumed run gives the
numbers the run would have given had it never stopped. A second signal stops at once, without a
checkpoint (one within 2 s of the first is taken for the same one). Outside the loop (set-up, SFT,
the evaluations) the signals act as usual.
"""

import os
import shlex
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from training import checkpoints

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A signal within this many seconds of the first is the same stop: Ctrl-C reaches torchrun and its
# processes alike, and torchrun passes its own on; so do `timeout` and Slurm, to the whole job.
SAME_STOP_SECONDS = 2.0


class Stop:
    """Created by train_loop as it starts: takes SIGTERM and SIGINT over until the loop ends.

    asked() (every step, on every process) says whether to stop after this step: a process that
    got the signal tells the others, so that they all stop at the same step and write one
    checkpoint together. exit_if_asked(step, checkpoint) then ends the run with the one line.
    The handlers stay until a signal finds the loop over (handle() then puts the previous ones
    back and passes the signal on), so that a repeat while the run exits is still taken."""

    def __init__(self, ref, args, run, steps):
        self.ref, self.args, self.run, self.steps = ref, args, run, steps
        self.signal, self.since, self.stopping = None, 0.0, False
        self.loop = sys._getframe(1)  # train_loop's frame: the signals are the loop's while it runs
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # Python's signals go there only
            self.previous = {number: signal.signal(number, self.handle) for number in SIGNALS}

    def handle(self, number, frame):
        if not self.in_loop(frame):  # the loop has ended (or crashed): the signal acts as before
            self.restore()
            previous = self.previous[number]
            if callable(previous):
                return previous(number, frame)
            if previous == signal.SIG_DFL:
                os.kill(os.getpid(), number)
            return None
        if self.signal is not None and time.monotonic() - self.since < SAME_STOP_SECONDS:
            return  # the same stop again: a launcher passes on what its processes also got
        if self.signal is not None:  # a second stop: at once
            print(f"stopped at once by a second {signal.Signals(number).name}: no checkpoint written "
                  "since the last one", file=sys.stderr, flush=True)
            os._exit(128 + number)
        self.signal, self.since = number, time.monotonic()

    def in_loop(self, frame):
        while frame is not None:
            if frame is self.loop:
                return True
            frame = frame.f_back
        return False

    def restore(self):
        for number, previous in self.previous.items():
            if signal.getsignal(number) == self.handle:
                signal.signal(number, previous if previous is not None else signal.SIG_DFL)

    def asked(self):
        """Whether the run stops after this step (a collective call under torchrun: a one-number
        all-reduce per step). If it does, the frozen reference is written first, unless --save-every
        has done so: a checkpoint needs it."""
        if self.run.world_size > 1:  # the signal's number, or 0: every process learns of it
            number = torch.tensor([self.signal or 0], device=self.run.device)
            dist.all_reduce(number, op=dist.ReduceOp.MAX)
            if self.signal is None and number.item():  # another process's: its repeats may follow here
                self.signal, self.since = int(number.item()), time.monotonic()
        stopping = self.signal is not None
        if stopping:
            # On CUDA (bfloat16, unsharded) the reference's Linear weights are bfloat16 by now: saved
            # so, they load back into float32 exactly and are cast to the same bfloat16 on resume;
            # a tied output layer's copy is not loaded over the embeddings it shares (checkpoints.
            # tied_from_own_dtype).
            checkpoints.save_reference(self.ref, self.args.output_dir, self.run.rank, self.args.fsdp)
        self.stopping = stopping
        return stopping

    def exit_if_asked(self, step, checkpoint):
        """After asked() said so and the checkpoint is written: the one line (rank 0, on stderr),
        and exit status 128 + the signal's number (143: SIGTERM, 130: SIGINT; a job script tells a
        stop to continue from an error) once every process is done with the checkpoint."""
        if not self.stopping:
            return
        name = signal.Signals(self.signal).name
        self.run.log(None, {"phase": "stop", "step": step, "signal": name, "checkpoint": checkpoint})
        self.run.close()
        if self.run.rank == 0:
            command = continue_command(self.run.argv, self.args, self.run.world_size)
            print(f"stopped by {name} after step {step} of {self.steps}: checkpoint {checkpoint}; "
                  f"continue with: {command}", file=sys.stderr, flush=True)
        if self.run.world_size > 1:
            # Rank 0 may still be writing its part of the checkpoint; torchrun stops every process
            # as soon as one of them exits with an error.
            dist.barrier()
        raise SystemExit(128 + self.signal)  # as a shell reports a process the signal ended


def continue_command(argv, args, world_size):
    """The command that continues the run: its own flags, with --resume latest and its folder."""
    kept, skip = [], False
    for flag in argv:
        if skip:
            skip = False
        elif flag == "--resume":
            skip = True
        elif not flag.startswith("--resume="):
            kept.append(flag)
    if "--output-dir" not in kept and not any(flag.startswith("--output-dir=") for flag in kept):
        kept += ["--output-dir", args.output_dir]
    launcher = ["python"] if world_size == 1 else ["torchrun", f"--nproc_per_node={world_size}"]
    return shlex.join([*launcher, "train.py", *kept, "--resume", "latest"])
