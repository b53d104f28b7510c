"""Long runs: stopped by SIGTERM or Ctrl-C and continued, held-out evaluations during the loop,
TensorBoard and Weights & Biases (offline), tokens per second.

The signals are real: tests/stop_run.py runs train.py from the command line and sends the signal
to its own process inside a given step (after the backward, before the update), so that where it
lands does not depend on timing. Every run is the tiny built-in one, on one thread.
"""

import copy
import glob
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import data  # noqa: E402
import train  # noqa: E402
from training import plots, setup, tracking  # noqa: E402
from test_fsdp import records  # noqa: E402
from test_reliability import crash, fail_at_call  # noqa: E402

# 6 steps of 8 pairs, every step logged, sampled anchors (temperature 0.8): the random streams
# must be in the checkpoint for the resumed run to sample what the whole run samples
TINY = ["--sft-steps", "10", "--steps", "6", "--batch-size", "8", "--log-every", "1", "--max-new-tokens", "4",
        "--seed", "0"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def child(command, timeout=600, **env):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def stopped_run(signal_name, steps, flags, output_dir, ranks="all", processes=1, **env):
    """train.py with `flags`, sent `signal_name` in `steps` (e.g. "3", or "3,3" for twice)."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return child([*launcher, "tests/stop_run.py", signal_name, steps, ranks, *flags, "--output-dir", str(output_dir)],
                 **env)


def continued(stop_line, processes=1):
    """Run the command that the stop line gives, as it is given (with this interpreter)."""
    command = shlex.split(stop_line.split("continue with: ", 1)[1])
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return child([*launcher, *command[1:]])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run, from the command line as the stopped ones."""
    folder = tmp_path_factory.mktemp("whole") / "run"
    done = child([sys.executable, "train.py", *TINY, "--output-dir", str(folder)])
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


# ----------------------------------------------------------------------------- stopping safely


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_step_writes_a_checkpoint_and_the_resumed_run_is_the_whole_run(signal_name, whole,
                                                                                          tmp_path):
    folder = tmp_path / "run"
    stopped = stopped_run(signal_name, "3", TINY, folder)
    checkpoint = folder / "checkpoints" / "step-000003.pt"
    command = shlex.join(["python", "train.py", *TINY, "--output-dir", str(folder), "--resume", "latest"])
    # exit status 128 + the signal, one line on stderr and no traceback; step 3 finished, logged, saved
    assert stopped.returncode == 128 + getattr(signal, signal_name), stopped.stderr[-3000:]
    assert stopped.stderr == (f"stopped by {signal_name} after step 3 of 6: checkpoint {checkpoint}; "
                              f"continue with: {command}\n")
    assert "step 3/6" in stopped.stdout and "step 4/6" not in stopped.stdout
    assert sorted(os.listdir(folder / "checkpoints")) == ["reference.pt", "step-000003.pt"]  # no --save-every
    assert torch.load(checkpoint, weights_only=True)["step"] == 3
    assert records(folder)[("stop", 3)] == {"phase": "stop", "step": 3, "signal": signal_name,
                                            "checkpoint": str(checkpoint)}

    resumed = continued(stopped.stderr)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 3 of 6 done" in resumed.stdout
    got, expected = records(folder), records(whole)
    assert got.pop(("resume", 3))["checkpoint"] == str(checkpoint) and got.pop(("stop", 3))
    assert got == expected  # every step's numbers, the evaluations before and after: exactly the whole run's
    phases = [json.loads(line)["phase"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [p for p in phases if p != "warning"] == ["eval", *["train"] * 3, "stop", "resume", *["train"] * 3, "eval"]


@pytest.mark.parametrize("case", ["second-signal", "repeat-within-the-window"])
def test_a_second_signal_stops_at_once_but_a_repeat_of_the_first_does_not(case, tmp_path):
    # The repeat: Ctrl-C reaches torchrun and its processes, and torchrun passes its own on: two
    # signals in the same instant are one stop. Past the window (here 0 s) a second one stops at once.
    window = {"STOP_RUN_SAME_STOP_SECONDS": "0"} if case == "second-signal" else {}
    stopped = stopped_run("SIGINT", "3,3", TINY, tmp_path / "run", **window)
    if case == "second-signal":
        assert stopped.returncode == 130  # 128 + SIGINT, as a shell reports a process stopped by it
        assert stopped.stderr == "stopped at once by a second SIGINT: no checkpoint written since the last one\n"
        assert "step 3/6" not in stopped.stdout and not (tmp_path / "run" / "checkpoints").exists()
    else:
        assert stopped.returncode == 130 and stopped.stderr.startswith("stopped by SIGINT after step 3 of 6")
        assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["reference.pt", "step-000003.pt"]


def test_outside_the_loop_the_signals_act_as_before(tmp_path):
    # after a run, in the same process: Ctrl-C acts as it did before the run, here Python's own handler
    # (a KeyboardInterrupt). Earlier in-process runs of the suite may have left their handlers, each
    # passing the signal on to the one it found: the run starts from Python's own, so that the chain
    # is this run's handler alone.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        train.main([*TINY, "--steps", "1", "--output-dir", str(tmp_path / "run")])
        assert getattr(signal.getsignal(signal.SIGINT), "__self__", None).__class__.__name__ == "Stop"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(10))  # a few bytecodes for the handler to run in
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_to_one_sharded_process_stops_both_at_the_same_step_and_they_resume_exactly(tmp_path):
    flags = ["--sft-steps", "10", "--steps", "4", "--batch-size", "8", "--log-every", "1", "--max-new-tokens", "4",
             "--seed", "0", "--device", "cpu", "--fsdp"]
    done = child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                  *flags, "--output-dir", str(tmp_path / "whole")])
    assert done.returncode == 0, done.stderr[-3000:]
    # SIGTERM to rank 1 alone, in step 2: rank 0 learns of it at the end of the step
    stopped = stopped_run("SIGTERM", "2", flags, tmp_path / "run", ranks="1", processes=2)
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("stopped by")]
    step_2 = tmp_path / "run" / "checkpoints" / "step-000002"
    assert lines == [f"stopped by SIGTERM after step 2 of 4: checkpoint {step_2}; continue with: torchrun "
                     f"--nproc_per_node=2 train.py {shlex.join(flags)} --output-dir {tmp_path / 'run'} --resume latest"]
    # no traceback of the run's processes (torchrun prints one of its own, from its own files)
    assert 'train.py", line' not in stopped.stderr and 'training/' not in stopped.stderr
    assert sorted(p.name for p in step_2.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train.pt"]
    resumed = continued(lines[0], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, expected = records(tmp_path / "run"), records(tmp_path / "whole")
    assert got.pop(("resume", 2)) and got.pop(("stop", 2))["signal"] == "SIGTERM"
    assert got == expected


# ----------------------------------------------------------------------------- --eval-every


@pytest.mark.parametrize("tied", [True, False])
def test_a_stop_on_cuda_leaves_the_tied_reference_exact_on_resume(tied, tmp_path):
    # On CUDA (bfloat16, unsharded) the reference's Linear weights are bfloat16 copies when a stop
    # writes reference.pt, a tied output layer's too: on resume the embeddings it shares must
    # come back in float32, and the resumed run's bfloat16 copies be the stopped run's, bit for bit.
    # The CPU stands in for CUDA: the same cast (memory.linear_weights_in) and the same files.
    from transformers import LlamaConfig, LlamaForCausalLM
    from training import checkpoints, memory

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    start = LlamaForCausalLM(config).eval()
    ref = copy.deepcopy(start).requires_grad_(False)
    memory.linear_weights_in(ref, torch.bfloat16)  # train_loop, on CUDA
    checkpoints.save_reference(ref, str(tmp_path), rank=0)  # Stop.asked, without --save-every
    resumed = copy.deepcopy(start).requires_grad_(False)
    path = tmp_path / "checkpoints" / "reference.pt"
    saved = torch.load(path, weights_only=True)
    assert saved["lm_head.weight"].dtype == torch.bfloat16  # the file holds the rounded copy
    checkpoints.load_models(copy.deepcopy(start), resumed, {"policy": start.state_dict(), "reference": saved,
                                                            "path": str(path)})
    embeddings = resumed.get_input_embeddings().weight
    assert embeddings.dtype == torch.float32
    assert torch.equal(embeddings, start.get_input_embeddings().weight)
    assert (resumed.get_output_embeddings().weight is embeddings) == tied
    memory.linear_weights_in(resumed, torch.bfloat16)  # the resumed run, on CUDA
    for (name, got), expected in zip(resumed.named_parameters(), ref.parameters(), strict=True):
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def test_eval_every_logs_the_held_out_numbers_of_that_step_and_changes_no_training_number(tmp_path):
    flags = [*TINY, "--steps", "4"]
    with_evals = train.main([*flags, "--eval-every", "2", "--output-dir", str(tmp_path / "evals")])
    plain = train.main([*flags, "--output-dir", str(tmp_path / "plain")])
    two_steps = train.main([*flags, "--steps", "2", "--output-dir", str(tmp_path / "two")])
    assert with_evals["history"] == plain["history"] and with_evals["after"] == plain["after"]
    found = records(tmp_path / "evals")
    assert {key for key in found if key[0] == "eval"} == {("eval", "before"), ("eval", 2), ("eval", "after")}
    # the evaluation at step 2 is the one after a 2-step run, without the judge's samples
    at_2 = found[("eval", 2)]
    assert at_2["when"] == "step" and at_2["step"] == 2
    assert {k: v for k, v in at_2.items() if k not in ("phase", "when", "step")} == \
        {k: v for k, v in two_steps["after"].items() if not k.startswith(("judge/", "win_rate", "distinct", "token_"))}
    # curves.png draws them at steps 0, 2 and 4
    assert plots.evaluations(tmp_path / "evals") == [
        {"step": step, "eval/accuracy": e["accuracy"], "eval/margin": e["margin"]}
        for step, e in ((0, with_evals["before"]), (2, at_2), (4, with_evals["after"]))]
    assert (tmp_path / "evals" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_logs_each_step_and_evaluation_once(tmp_path, monkeypatch):
    flags = [*TINY, "--eval-every", "2", "--save-every", "3"]
    whole_run = train.main([*flags, "--output-dir", str(tmp_path / "whole")])
    folder = tmp_path / "run"
    fail_at_call(monkeypatch, train, "tidpo_step", 5, crash)  # step 5: steps 1-4 and the evaluation at 4 logged
    with pytest.raises(RuntimeError):
        train.main([*flags, "--output-dir", str(folder)])
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ("eval", 4) in records(folder) and ("train", 4) in records(folder)
    resumed = train.main([*flags, "--output-dir", str(folder), "--resume", "latest"])  # from step 3
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["phase"], r.get("step", r.get("when"))) for r in lines if r["phase"] != "warning"]
    assert keys == [("eval", "before"), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("resume", 3),
                    ("train", 4), ("eval", 4), ("train", 5), ("train", 6), ("eval", "after")]
    got, expected = records(folder), records(tmp_path / "whole")
    assert got.pop(("resume", 3))["checkpoint"].endswith("step-000003.pt")
    assert got == expected and resumed["after"] == whole_run["after"]
    assert [r["step"] for r in plots.evaluations(folder)] == [0, 2, 4, 6]


def test_trim_metrics_keeps_the_records_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"phase": "warning"}, {"phase": "eval", "when": "before"}, {"phase": "train", "step": 2},
             {"phase": "eval", "when": "step", "step": 2}, {"phase": "train", "step": 3}, {"phase": "train", "step": 4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tracking.trim_metrics(str(path), 3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:5]
    tracking.trim_metrics(str(tmp_path / "none.jsonl"), 3)  # a run resumed into a new folder has none yet
    assert not (tmp_path / "none.jsonl").exists()


# ----------------------------------------------------------------------------- TensorBoard, W&B


def float32(value):
    return struct.unpack("f", struct.pack("f", value))[0]


def test_tensorboard_gets_every_record_under_trls_names(tmp_path):
    pytest.importorskip("tensorboard")  # an optional package (.ci/run installs it)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp_path / "run"
    train.main([*TINY, "--eval-every", "2", "--report-to", "tensorboard", "--output-dir", str(folder)])
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    lines = map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
    found = {(r["phase"], r.get("step", r.get("when"))): r for r in lines}  # with the timing
    train_steps = sorted(step for phase, step in found if phase == "train")
    assert train_steps == [1, 2, 3, 4, 5, 6]
    for step in train_steps:  # TensorBoard keeps float32: each logged value, rounded so
        for name, trl_name in (("loss", "train/loss"), ("rewards/margins", "train/rewards/margins"),
                               ("rewards/accuracies", "train/rewards/accuracies"), ("grad_norm", "train/grad_norm"),
                               ("tokens_per_second/pairs", "train/tokens_per_second/pairs")):
            assert scalars[trl_name][step] == float32(found[("train", step)][name]), (step, name)
    evals = {0: found[("eval", "before")], 2: found[("eval", 2)], 4: found[("eval", 4)], 6: found[("eval", "after")]}
    assert scalars["eval/rewards/accuracies"] == {step: float32(e["accuracy"]) for step, e in evals.items()}
    assert scalars["eval/rewards/margins"] == {step: float32(e["margin"]) for step, e in evals.items()}
    assert scalars["eval/win_rate"] == {6: float32(evals[6]["win_rate"])}
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    --beta 0.1\n" in config and "    --report-to tensorboard\n" in config


def wandb_records(path):
    """The protobuf records of an offline W&B run's .wandb file: W&B's 7-byte header, then blocks
    of 32 KiB holding records in LevelDB's log format (4-byte checksum, 2-byte length, 1-byte
    kind: whole, first, middle or last part)."""
    from wandb.proto import wandb_internal_pb2

    raw, position, parts = Path(path).read_bytes(), 7, b""
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if kind == 0:
            position += left
            continue
        parts = (b"" if kind in (1, 2) else parts) + raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def test_wandb_offline_gets_every_record_under_trls_names_and_the_flags_as_config(tmp_path):
    pytest.importorskip("wandb")  # an optional package (.ci/run installs it)
    folder = tmp_path / "run"
    done = child([sys.executable, "train.py", *TINY, "--eval-every", "2", "--report-to", "wandb",
                  "--output-dir", str(folder)], WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = {}, {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(row)
        if record.WhichOneof("record_type") == "run":
            config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.run.config.update}
    found = records(folder)
    for step in range(1, 7):  # JSON both ways: the very same float
        assert history[step]["train/loss"] == found[("train", step)]["loss"], step
        assert history[step]["train/rewards/margins"] == found[("train", step)]["rewards/margins"], step
    assert [history[step]["eval/rewards/accuracies"] for step in (0, 2, 4, 6)] == \
        [found[key]["accuracy"] for key in (("eval", "before"), ("eval", 2), ("eval", 4), ("eval", "after"))]
    assert config["beta"] == 0.1 and config["report_to"] == "wandb" and config["eval_every"] == 2
    assert (folder / "wandb" / "tidpo-run-id").read_text() in path  # the id a resumed run continues


def test_tracker_names_follow_trl():
    step, scalars = tracking.tracker_scalars({"phase": "train", "step": 5, "loss": 0.5, "rewards/margins": 0.25,
                                              "seconds_per_step": 2.0}, 0)
    assert (step, scalars) == (5, {"train/loss": 0.5, "train/rewards/margins": 0.25, "train/seconds_per_step": 2.0})
    step, scalars = tracking.tracker_scalars({"phase": "eval", "when": "after", "accuracy": 0.75, "margin": 1.5,
                                              "win_rate": 0.5}, 32)
    assert (step, scalars) == (32, {"eval/rewards/accuracies": 0.75, "eval/rewards/margins": 1.5, "eval/win_rate": 0.5})
    assert tracking.tracker_scalars({"phase": "eval", "when": "before", "accuracy": 0.5, "margin": 0.0}, 7)[0] == 0
    assert tracking.tracker_scalars({"phase": "warning", "message": "short run"}, 3) == (3, {})


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_report_to_without_its_package_is_one_line_naming_the_pip_command(name, monkeypatch):
    find_spec = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda module: None if module == name else
                        find_spec(module))
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--report-to", name])
    assert stop.value.code == (f"error: --report-to {name} needs the {name} package, which is not installed: "
                               f"pip install {name}")


def test_eval_every_below_0_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--eval-every", "-1"])
    assert stop.value.code == 2 and "error: --eval-every must be at least 0, got -1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tokens per second


def test_throughput_counts_the_pairs_tokens_and_the_anchors_apart(monkeypatch):
    clock = iter([10.0, 14.0])  # the first micro-batch at 10 s, the progress line at 14 s
    monkeypatch.setattr(tracking.time, "perf_counter", lambda: next(clock))
    speed = tracking.Throughput()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7 tokens on each side: 14 per batch of 2 pairs
    batch = {"chosen_input_ids": mask, "chosen_attention_mask": mask, "rejected_attention_mask": mask}
    assert speed.count(batch) is batch and speed.count(batch) is batch  # two steps of one micro-batch
    seconds, rates = speed.window(2, {"anchor_tokens": 3.0})  # 4 pairs, 3 sampled tokens each
    assert seconds == 2.0 and rates == {"tokens_per_second/pairs": 28 / 4, "tokens_per_second/anchors": 12 / 4}
    assert tracking.rates_text({"tokens_per_second/pairs": 12345.0, "tokens_per_second/anchors": 1234.0}) == \
        "tokens/s 12.3k pairs + 1.2k anchors"
    assert tracking.rates_text({"tokens_per_second/pairs": 950.0}) == "tokens/s 950 pairs"  # DPO: no anchors


def test_a_runs_tokens_per_second_times_its_time_are_its_batches_tokens(tmp_path):
    flags = [*TINY, "--log-every", "2"]
    result = train.main([*flags, "--output-dir", str(tmp_path / "run")])
    args = train.parse_args(flags)
    tokenizer = setup.load_tokenizer(args)
    epochs = data.Epochs(setup.load_pairs(args, tokenizer)[0], args.batch_size, tokenizer.pad_token_id, args.seed)
    found = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["phase"] == "train"}
    for step in (2, 4, 6):
        batches = [epochs.next() for _ in range(2)]
        tokens = sum(int(b[f"{side}_attention_mask"].sum()) for b in batches for side in ("chosen", "rejected"))
        record = found[step]
        seconds = record["seconds_per_step"] * 2
        assert record["tokens_per_second/pairs"] * seconds == pytest.approx(tokens, rel=1e-9)
        pairs = sum(len(b["chosen_input_ids"]) for b in batches)
        assert record["tokens_per_second/anchors"] * seconds == pytest.approx(record["anchor_tokens"] * pairs, rel=1e-9)
        assert 1 <= record["anchor_tokens"] <= 4  # --max-new-tokens 4
    assert [h["step"] for h in result["history"]] == [2, 4, 6]
