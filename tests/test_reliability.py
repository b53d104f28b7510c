"""Runs that stop and continue, numbers that go bad, several processes, and bad input.

Every run here is tiny (a 0.13M-parameter Llama, a few steps of a few pairs) and held to one
thread, as in test_train.py. Interruptions are real: an exception raised inside the step of a
running main(), not a shorter run.
"""

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from training import distributed  # noqa: E402
import tidpo  # noqa: E402
import train  # noqa: E402
from training import builtin_task as builtin  # noqa: E402
from training import setup  # noqa: E402

# The built-in task with 10 SFT steps and 6 TI-DPO steps of 8 pairs, every step logged and saved.
TINY = ["--sft-steps", "10", "--steps", "6", "--batch-size", "8", "--log-every", "1", "--max-new-tokens", "4",
        "--seed", "0", "--save-every", "1"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # a test decides itself when to start processes


def run(argv, output_dir):
    return train.main([*argv, "--output-dir", str(output_dir)])


def train_records(output_dir):
    """The metrics.jsonl train records by step, the last one of a step winning (a resumed run
    logs again the steps after its checkpoint), without the timing (seconds and tokens per second)."""
    records = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    timing = ("seconds_per_step", "tokens_per_second/")
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(timing)} for r in records
            if r["phase"] == "train"}


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())}


def fail_at_call(monkeypatch, module, name, call, change):
    """Wrap module.name so that its `call`-th call returns change(result) (or raises inside change)."""
    original = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(1)
        return change(result) if len(calls) == call else result

    monkeypatch.setattr(module, name, wrapper)
    return calls


def crash(result):
    raise RuntimeError("simulated crash (power cut)")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    output_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return {"result": run(TINY, output_dir), "output_dir": output_dir}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny Llama and a word-level tokenizer for the built-in task's words."""
    train_part, heldout = builtin.builtin_task(seed=0)
    tokenizer = setup.build_tokenizer([r[k] for r in train_part + heldout for k in data.FIELDS])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """45 plain records of the built-in task: 43 for training (6 batches of 8, the last of 3), 2 held out."""
    records = [{k: r[k] for k in data.FIELDS} for r in builtin.builtin_task(seed=0)[0][:45]]
    path = tmp_path_factory.mktemp("jsonl") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ----------------------------------------------------------------------------- checkpoints


def test_resume_after_a_crash_gives_the_uninterrupted_losses(uninterrupted, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    fail_at_call(monkeypatch, train, "tidpo_step", 5, crash)  # step 5's micro-batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(TINY, folder)
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # --save-every 1, the newest two kept: steps 3 and 4 are left, written whole (no temporary files)
    assert sorted(os.listdir(folder / "checkpoints")) == ["reference.pt", "step-000003.pt", "step-000004.pt"]
    assert sorted(train_records(folder)) == [1, 2, 3, 4]

    sft_calls = fail_at_call(monkeypatch, train, "sft", 0, None)  # call 0 never comes: it only counts
    resumed = run([*TINY, "--resume", "latest"], folder)
    assert sft_calls == []  # the reference comes from reference.pt, not from a second SFT

    expected = uninterrupted["result"]
    # CPU, float32, one thread: exactly the same numbers, step for step
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4, 5, 6]
    assert resumed["history"] == expected["history"]
    assert resumed["before"] == expected["before"] and resumed["after"] == expected["after"]
    assert train_records(folder) == train_records(uninterrupted["output_dir"])
    phases = [json.loads(line)["phase"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    phases = [phase for phase in phases if phase != "warning"]  # each start warns of the short run
    assert phases == ["eval"] + ["train"] * 4 + ["resume"] + ["train"] * 2 + ["eval"]  # appended, not rewritten
    policy = torch.load(folder / "checkpoints" / "step-000006.pt", weights_only=True)["policy"]
    for name, value in torch.load(uninterrupted["output_dir"] / "checkpoints" / "step-000006.pt",
                                  weights_only=True)["policy"].items():
        assert torch.equal(policy[name], value), name


def test_resume_continues_the_data_order_across_an_epoch_boundary(model_dir, jsonl, tmp_path, monkeypatch):
    # 6 batches per epoch; checkpoint at step 8 sits 2 batches into the second epoch; crash in step 9.
    # Logged every 3 steps: the checkpoint also carries step 7's numbers, half of the line of step 9.
    flags = ["--model", str(model_dir), "--data", str(jsonl), "--steps", "10", "--batch-size", "8",
             "--log-every", "3", "--max-new-tokens", "4", "--lr", "1e-3", "--save-every", "4"]
    expected = run(flags, tmp_path / "uninterrupted")
    seen = []
    monkeypatch.setattr(train.data, "collate", lambda pairs, pad_id, collate=data.collate:
                        seen.append(len(pairs)) or collate(pairs, pad_id))
    fail_at_call(monkeypatch, train, "tidpo_step", 9, crash)
    with pytest.raises(RuntimeError):
        run(flags, tmp_path / "run")
    # the held-out pair batch of the "before" evaluation, then the training batches: 5 of 8 pairs,
    # the epoch's last of 3 and, in a second epoch, 8 again
    assert seen[:8] == [2, 8, 8, 8, 8, 8, 3, 8]
    monkeypatch.undo()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    resumed = run([*flags, "--resume", str(tmp_path / "run" / "checkpoints" / "step-000008.pt")], tmp_path / "run")
    assert [h["step"] for h in resumed["history"]] == [3, 6, 9, 10]
    assert resumed["history"] == expected["history"]
    assert resumed["after"] == expected["after"]


def test_same_seed_gives_the_same_metrics_run_after_run(uninterrupted, tmp_path):
    again = run(TINY, tmp_path / "run")
    first = uninterrupted["result"]
    assert len(again["history"]) == 6 and all(math.isfinite(v) for h in again["history"] for v in h.values())
    assert again["history"] == first["history"]  # anchors are sampled: the seed fixes them too
    assert again["before"] == first["before"] and again["after"] == first["after"]
    assert train_records(tmp_path / "run") == train_records(uninterrupted["output_dir"])


# ----------------------------------------------------------------------------- numbers that go bad


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("case", ["triplet", "gradient"])
def test_non_finite_step_stops_before_the_update_and_keeps_the_checkpoint(case, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    flags = [*TINY, "--save-every", "2"]
    kept = {}

    def plant(result):
        kept.update(snapshot(folder / "checkpoints"))  # the checkpoints as step 3 begins
        if case == "triplet":
            return result * float("nan")
        loss, metrics = result
        return NanGradient.apply(loss), metrics

    if case == "triplet":
        # the run's triplet (train.Hooks' default, tidpo.triplet_loss), wrapped. On the built-in task
        # each step calls it twice (the loss, then the flipped/clean diagnostics): call 5 is step 3's loss
        holder = types.SimpleNamespace(triplet=tidpo.triplet_loss)
        fail_at_call(monkeypatch, holder, "triplet", 5, plant)
        hooks = train.Hooks
        monkeypatch.setattr(train, "Hooks", lambda **given: hooks(**{"triplet": holder.triplet, **given}))
    else:
        fail_at_call(monkeypatch, train, "tidpo_step", 3, plant)
    built = []
    build_model = setup.build_model
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: built.append(build_model(*a, **k)) or built[-1])
    with pytest.raises(SystemExit) as stop:
        run(flags, folder)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: step 3: ")  # exit status 1, this message
    if case == "triplet":
        assert "the loss is nan (not finite in: triplet)" in message
        assert re.search(r"loss terms: dpo_w [\d.]+, triplet nan;", message)
    else:
        assert re.search(r"the gradient norm is nan while the loss is finite \(0\.6\d+\)", message)
    checkpoint = folder / "checkpoints" / "step-000002.pt"
    assert f"the last checkpoint, {checkpoint}, is intact" in message
    assert "--resume latest" in message and "a lower --lr (now 0.0005)" in message
    assert sorted(kept) == ["reference.pt", "step-000002.pt"]
    assert snapshot(folder / "checkpoints") == kept  # not one byte or timestamp changed
    assert sorted(train_records(folder)) == [1, 2]  # step 3 was never logged...
    assert not (folder / "policy").exists()  # ...nor a policy saved
    # the policy in memory still has step 2's weights: the bad update was never applied
    saved = torch.load(folder / "checkpoints" / "step-000002.pt", weights_only=True)["policy"]
    for name, value in built[0].state_dict().items():
        assert torch.equal(value, saved[name]), name

    if case == "triplet":  # the advice works: continue from step 2 with a lower learning rate
        monkeypatch.undo()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        resumed = run([*flags, "--resume", "latest", "--steps", "4", "--lr", "2.5e-4"], folder)
        assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
        assert all(math.isfinite(v) for h in resumed["history"] for v in h.values())
        state = torch.load(folder / "checkpoints" / "step-000004.pt", weights_only=True)
        assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [2.5e-4 * 5 / 11]  # warmup step 5 of 10
        assert state["scheduler"]["base_lrs"] == [2.5e-4]


# ----------------------------------------------------------------------------- two processes


@pytest.mark.parametrize("how", ["end", "usage"])
def test_every_process_waits_for_the_others_before_leaving_the_process_group(how, tmp_path):
    # A process that took the group down while its peer was still at work (rank 0 writing the
    # policy) could abort in gloo's teardown, and torchrun then failed a finished run. Every
    # process leaves after all have reached their exit: here rank 0 gets there 3 s late.
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "tests/exit_group.py", how, str(tmp_path), "3"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == (0 if how == "end" else 1), child.stderr[-3000:]
    times = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert times[1]["exit"] < times[0]["exit"] - 2  # rank 1 was done first ...
    assert times[1]["left"] >= times[0]["exit"]  # ... and left the group only once rank 0 was done too


def test_a_process_that_crashes_alone_leaves_at_once(tmp_path):
    # An uncaught exception may be this process's alone: it does not wait for the others (who may
    # never come), and torchrun stops the rest of the job. Rank 0 would be done after 120 s.
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "tests/exit_group.py", "crash", str(tmp_path), "120"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode != 0 and "a failure of this process alone" in child.stderr
    times = json.loads((tmp_path / "rank-1.json").read_text())
    assert times["left"] - times["exit"] < 60
    assert not (tmp_path / "rank-0.json").exists()  # stopped by torchrun, long before its exit


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    # Greedy anchors (--temperature 0): the only random draw of a step is the anchor sampling, and
    # with temperature > 0 each process draws from its own stream, so two processes cannot sample
    # what one process samples. Greedy anchors keep the full objective (triplet included) and make
    # the runs comparable. --grad-accum 2 covers DDP's no_sync on the first micro-batch.
    flags = ["--sft-steps", "10", "--steps", "3", "--batch-size", "8", "--grad-accum", "2", "--log-every", "1",
             "--max-new-tokens", "4", "--temperature", "0", "--seed", "0", "--device", "cpu", "--save-every", "3"]
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train.py", *flags, "--output-dir", str(tmp_path / "two")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    assert "x 2 processes" in child.stdout
    assert child.stdout.count("step 3/3") == 1  # rank 0 alone prints
    assert "Warning" not in child.stderr and "warning" not in child.stderr, child.stderr[-3000:]
    one = run(flags, tmp_path / "one")

    two_records = train_records(tmp_path / "two")
    assert sorted(two_records) == [1, 2, 3]
    for step, entry in zip([1, 2, 3], one["history"]):
        assert set(two_records[step]) == {"phase", *entry}
        for name, value in entry.items():
            # float32 sums in another order (half batches, then an all-reduce) differ in the last
            # digits, by an amount that depends on the CPU's kernels, and Adam carries such
            # differences on: measured up to 4e-6 relative on grad_norm and 1.3e-7 absolute on
            # rewards near 0. What the test must catch is far larger: a wrong gradient scale (a sum
            # instead of a mean over processes) changes grad_norm by 2x, a lost micro-batch by 1e-2.
            assert two_records[step][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, name)
    two_eval = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()][-1]
    for name, value in one["after"].items():
        assert two_eval[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name

    # the checkpoint holds both processes' random states and resumes only with two processes
    state = torch.load(tmp_path / "two" / "checkpoints" / "step-000003.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["random"]) == 2
    assert not torch.equal(state["random"][0]["cpu"], state["random"][1]["cpu"])  # seed + rank
    with pytest.raises(SystemExit, match=r"written by a run of world size 2, this one has world size 1; "
                                         r"resume with torchrun --nproc_per_node=2"):
        run([*flags, "--resume", "latest"], tmp_path / "two")


# ----------------------------------------------------------------------------- bad input


BAD_FLAGS = {
    "steps-0": (["--steps", "0"], "--steps must be at least 1, got 0"),
    "steps-negative": (["--steps", "-5"], "--steps must be at least 1, got -5"),
    "batch-size-0": (["--batch-size", "0"], "--batch-size must be at least 1"),
    "batch-below-ranks": (["--batch-size", "2"], "--batch-size 2 is smaller than the 4 processes"),
    "grad-accum-0": (["--grad-accum", "0"], "--grad-accum must be at least 1"),
    "lr-0": (["--lr", "0"], "--lr must be positive"),
    "beta-0": (["--beta", "0"], "--beta must be positive, got 0.0"),
    "beta-nan": (["--beta", "nan"], "--beta must be positive, got nan"),
    "lam-above-1": (["--lam", "1.5"], "--lam must be between 0 and 1, got 1.5"),
    "lam-negative": (["--lam", "-0.1"], "--lam must be between 0 and 1"),
    "gamma-negative": (["--gamma", "-1"], "--gamma must be at least 0"),
    "margin-negative": (["--margin", "-0.01"], "--margin must be at least 0"),
    "kl-alpha-negative": (["--kl-alpha", "-0.5"], "--kl-alpha must be at least 0"),
    "max-length-1": (["--max-length", "1"], "--max-length must be at least 2"),
    "max-prompt-length-0": (["--max-prompt-length", "0"], "--max-prompt-length must be at least 1 and below "
                            "--max-length 256 (the responses need the rest), got 0"),
    "max-prompt-length-max-length": (["--max-length", "64", "--max-prompt-length", "64"],
                                     "--max-prompt-length must be at least 1 and below --max-length 64"),
    "max-new-tokens-0": (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    "temperature-negative": (["--temperature", "-1"], "--temperature must be at least 0"),
    "top-p-0": (["--top-p", "0"], "--top-p must be in (0, 1]"),
    "warmup-negative": (["--warmup-steps", "-1"], "--warmup-steps must be at least 0"),
    "sft-steps-negative": (["--sft-steps", "-1"], "--sft-steps must be at least 0"),
    "log-every-0": (["--log-every", "0"], "--log-every must be at least 1"),
    "save-every-negative": (["--save-every", "-1"], "--save-every must be at least 0"),
    "not-a-number": (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    "unknown-choice": (["--loss", "ppo"], "argument --loss: invalid choice: 'ppo'"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_are_refused_with_a_usage_message(case, monkeypatch, capsys):
    flags, message = BAD_FLAGS[case]
    if case == "batch-below-ranks":
        monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun --nproc_per_node=4 sets it
    with pytest.raises(SystemExit) as stop:
        train.parse_args(flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ") and f"error: {message}" in err, err


def test_good_flags_at_the_edges_are_accepted():
    args = train.parse_args(["--lam", "0", "--gamma", "0", "--temperature", "0", "--top-p", "1",
                             "--sft-steps", "0", "--max-new-tokens", "1", "--steps", "1"])
    assert (args.lam, args.gamma, args.top_p, args.max_new_tokens) == (0.0, 0.0, 1.0, 1)
    assert train.parse_args(["--lam", "1"]).lam == 1.0


@pytest.mark.parametrize("case", ["missing", "folder", "not-a-model"])
def test_bad_model_paths_exit_with_a_message(case, tmp_path):
    path = {"missing": tmp_path / "nope", "folder": tmp_path, "not-a-model": tmp_path / "notes.txt"}[case]
    if case == "not-a-model":
        path.write_text("not a model")
    expected = {"missing": "no such folder", "folder": "cannot load it with AutoTokenizer",
                "not-a-model": "no such folder"}[case]
    with pytest.raises(SystemExit) as stop:
        run(["--model", str(path)], tmp_path / "run")
    assert stop.value.code.startswith(f"error: --model {path}: {expected}"), stop.value.code
    assert not (tmp_path / "run").exists()


def test_hub_name_that_cannot_be_fetched_exits_with_a_message(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # offline: the tests never use the network, and a hub that cannot be reached fails the same way
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as stop:
        run(["--model", "no-such-org/no-such-model"], tmp_path / "run")
    assert stop.value.code.startswith("error: --model no-such-org/no-such-model: cannot load it"), stop.value.code


@pytest.fixture()
def saved_run(uninterrupted, tmp_path):
    """A copy of the uninterrupted run's folder, to break in various ways."""
    import shutil

    folder = tmp_path / "saved"
    shutil.copytree(uninterrupted["output_dir"], folder)
    return folder


def bad_resume(case, folder, tmp_path):
    """(argv, output folder, expected start of the message) for one bad --resume."""
    checkpoints = folder / "checkpoints"
    last = checkpoints / "step-000006.pt"
    if case == "missing":
        gone = tmp_path / "gone.pt"
        return ["--resume", str(gone)], tmp_path / "new", f"--resume {gone}: no such file"
    if case == "folder":
        return ["--resume", str(checkpoints)], tmp_path / "new", f"--resume {checkpoints}: is a folder"
    if case == "not-a-torch-file":
        (tmp_path / "notes.pt").write_text("hello")
        return ["--resume", str(tmp_path / "notes.pt")], tmp_path / "new", \
            f"--resume {tmp_path / 'notes.pt'}: cannot be read as a checkpoint"
    if case == "truncated":
        (tmp_path / "half.pt").write_bytes(last.read_bytes()[:50_000])
        return ["--resume", str(tmp_path / "half.pt")], tmp_path / "new", \
            f"--resume {tmp_path / 'half.pt'}: cannot be read as a checkpoint"
    if case == "other-torch-file":
        torch.save({"weights": torch.zeros(2)}, tmp_path / "weights.pt")
        return ["--resume", str(tmp_path / "weights.pt")], tmp_path / "new", \
            f"--resume {tmp_path / 'weights.pt'}: not a checkpoint written by train.py"
    if case == "other-flags":
        return ["--resume", "latest", "--beta", "0.2", "--loss", "dpo"], folder, \
            (f"--resume {last}: that run had --loss tidpo (now dpo), --beta 0.1 (now 0.2); resume with the run's "
             "own flags")
    if case == "other-model":  # a loadable model (the run's own saved policy), but not the run's --model
        return ["--resume", str(last), "--model", str(folder / "policy")], tmp_path / "new", \
            f"--resume {last}: that run had --model None (now {folder / 'policy'})"
    if case == "other-weights":
        state = torch.load(last, weights_only=True)
        state["policy"] = {name: value[:1] for name, value in state["policy"].items()}
        torch.save(state, last)
        return ["--resume", "latest"], folder, f"--resume {last}: its weights do not fit this model"
    if case == "no-reference":
        (checkpoints / "reference.pt").unlink()
        return ["--resume", "latest"], folder, f"--resume {last}: {checkpoints / 'reference.pt'}, the frozen " \
                                               "reference of that run, is missing"
    if case == "latest-without-checkpoints":
        for path in checkpoints.iterdir():
            path.unlink()
        return ["--resume", "latest"], folder, f"--resume latest: {folder} holds no checkpoints"
    if case == "latest-without-output-dir":
        return ["--resume", "latest"], None, "--resume latest needs --output-dir"
    if case == "into-another-run":
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "metrics.jsonl").write_text("{}\n")
        (tmp_path / "other" / "curves.png").write_bytes(b"")  # a run that got to its end (no policy kept)
        return ["--resume", str(last)], tmp_path / "other", (
            f"--output-dir {tmp_path / 'other'} already holds an earlier run (curves.png, metrics.jsonl); it has "
            "no checkpoints")
    raise AssertionError(case)


BAD_RESUMES = ["missing", "folder", "not-a-torch-file", "truncated", "other-torch-file", "other-flags",
               "other-model", "other-weights", "no-reference", "latest-without-checkpoints",
               "latest-without-output-dir", "into-another-run"]


@pytest.mark.parametrize("case", BAD_RESUMES)
def test_bad_resume_exits_with_a_message_naming_the_path_and_the_problem(case, saved_run, tmp_path):
    argv, output_dir, expected = bad_resume(case, saved_run, tmp_path)
    before = snapshot(saved_run / "checkpoints") if (saved_run / "checkpoints").exists() else None
    argv = [*TINY, *argv] + (["--output-dir", str(output_dir)] if output_dir else [])
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code.startswith(f"error: {expected}"), stop.value.code
    if before is not None:
        assert snapshot(saved_run / "checkpoints") == before  # nothing written or deleted
    assert not (tmp_path / "new").exists()


def test_resume_into_a_new_folder_starts_its_own_checkpoints(uninterrupted, tmp_path):
    last = uninterrupted["output_dir"] / "checkpoints" / "step-000006.pt"
    result = run([*TINY, "--steps", "7", "--resume", str(last)], tmp_path / "new")
    assert [h["step"] for h in result["history"]] == list(range(1, 8))
    assert sorted(os.listdir(tmp_path / "new" / "checkpoints")) == ["reference.pt", "step-000007.pt"]
    assert torch.equal(*(torch.load(folder / "checkpoints" / "reference.pt", weights_only=True)["lm_head.weight"]
                         for folder in (uninterrupted["output_dir"], tmp_path / "new")))


def test_used_output_dir_says_how_to_resume(uninterrupted):
    folder = uninterrupted["output_dir"]
    with pytest.raises(SystemExit) as stop:
        run(TINY, folder)
    assert stop.value.code == (f"error: --output-dir {folder} already holds an earlier run (checkpoints, curves.png, "
                               f"metrics.jsonl, policy); to continue that run from its checkpoint of step 6, add "
                               f"--resume latest; to start a new one, choose another --output-dir")


def test_bad_resume_on_the_command_line_has_no_traceback(tmp_path):
    child = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "gone.pt"), "--sft-steps", "1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 1
    assert child.stderr == f"error: --resume {tmp_path / 'gone.pt'}: no such file\n"


BAD_DATA = {  # DataError cases that test_data.py and test_train.py do not reach
    "not-utf8": (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n', "line 2: not valid UTF-8"),
    "prompt-without-messages": (json.dumps({"prompt": [], "chosen": [], "rejected": []}).encode() + b"\n",
                                "line 1: field 'prompt' has no messages"),
    "one-record": (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
                   "needs at least 2 records (one is held out), or --eval-data"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_more_bad_data_is_reported(case, tmp_path, model_dir):
    content, problem = BAD_DATA[case]
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as error:
        run(["--model", str(model_dir), "--data", str(path)], tmp_path / "run")
    assert str(error.value).startswith(f"{path}") and problem in str(error.value), str(error.value)
    assert not (tmp_path / "run").exists()


def test_tokenizer_without_eos_is_reported(model_dir, jsonl, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert PreTrainedTokenizerFast.from_pretrained(folder).eos_token_id is None
    with pytest.raises(data.DataError, match="the tokenizer has no eos token"):
        run(["--model", str(folder), "--data", str(jsonl)], tmp_path / "run")


def test_fewer_training_pairs_than_processes_is_refused(model_dir, tmp_path, monkeypatch):
    records = [{"prompt": "a b", "chosen": "seek medical attention", "rejected": "ignore it"}] * 2
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # as if under torchrun with 2 processes (no process group is needed before this check)
    monkeypatch.setattr(distributed, "setup", lambda device, fsdp: (0, 2, device))
    with pytest.raises(SystemExit) as stop:
        run(["--model", str(model_dir), "--data", str(path), "--batch-size", "2"], tmp_path / "run")
    assert stop.value.code == "error: too few training pairs (1) for 2 processes: each process needs at least one"
    assert not (tmp_path / "run").exists()
