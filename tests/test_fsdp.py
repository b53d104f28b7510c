"""train.py --fsdp (FSDP2): two processes under torchrun (gloo, on the CPU) against one process on
the same global batch.

Greedy anchors (--temperature 0) make the runs comparable: each process samples from a random
stream of its own. The tolerances are the DDP test's (test_reliability.py): float32 sums in another
order (half batches, shards, then a reduction) differ in the last digits, and Adam carries such
differences on; a wrong gradient scale or a lost gradient is orders of magnitude larger.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from training import memory  # noqa: E402
import train  # noqa: E402
from test_real_models import build_checkpoint, chat_records  # noqa: E402

BUILTIN = ["--sft-steps", "10", "--steps", "3", "--batch-size", "8", "--grad-accum", "2", "--log-every", "1",
           "--max-new-tokens", "4", "--temperature", "0", "--seed", "0", "--device", "cpu"]
HUB = ["--steps", "3", "--batch-size", "2", "--lr", "1e-4", "--warmup-steps", "0", "--max-new-tokens", "4",
       "--max-length", "96", "--log-every", "1", "--seed", "0", "--temperature", "0", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def torchrun(script, *arguments, processes=2):
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={processes}", script, *arguments], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-4000:]
    return child


def records(output_dir):
    """metrics.jsonl by (phase, step or when), the last of each winning, without the timing."""
    found = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name in [name for name in record if name == "seconds_per_step" or name.startswith("tokens_per_second/")]:
            record.pop(name)
        found[(record["phase"], record.get("step", record.get("when")))] = record
    return found


def assert_same_run(one_dir, sharded_dir, weights_atol=5e-5):
    one, sharded = records(one_dir), records(sharded_dir)
    assert set(one) == set(sharded)
    for key, entry in one.items():
        assert set(entry) == set(sharded[key]), key
        for name, value in entry.items():
            if isinstance(value, float):
                assert sharded[key][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, name)
    # the saved policy: a whole Hugging Face folder, tied weights saved once, the same weights
    alone = AutoModelForCausalLM.from_pretrained(Path(one_dir) / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(Path(sharded_dir) / "policy")
    assert json.loads((Path(sharded_dir) / "policy" / "config.json").read_text())["architectures"] == \
        json.loads((Path(one_dir) / "policy" / "config.json").read_text())["architectures"]
    expected, got = alone.state_dict(), loaded.state_dict()
    assert sorted(expected) == sorted(got)
    for name, value in expected.items():
        # Adam's updates of lr 5e-4 carry the sums' last digits on: measured up to 4.2e-6
        assert torch.allclose(got[name], value, rtol=0, atol=weights_atol), name
    tied = alone.get_output_embeddings().weight is alone.get_input_embeddings().weight
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied


@pytest.mark.parametrize("case", ["tied", "untied", "tied-checkpointing"])
def test_a_sharded_step_gives_every_parameter_the_one_process_gradient(case):
    # The embeddings' gradient is the one a sharded model loses silently when they are computed
    # outside its forward; here every parameter's gradient, gathered, is the one-process gradient.
    kind, *rest = case.split("-")
    child = torchrun("tests/fsdp_step.py", kind, *(["--gradient-checkpointing"] if rest else []))
    report = json.loads(child.stdout.strip().splitlines()[-1])["params"]
    assert "model.embed_tokens.weight" in report and len(report) >= 10
    for name, entry in report.items():
        assert entry["has_grad"], name
        assert entry["expected_norm"] > 0, name
        assert entry["max_diff"] <= 1e-4 * entry["expected_norm"] + 1e-7, (name, entry)
    # memory.step_peak_bytes's sharded terms are what a process holds: half of each, to the rows
    # that an odd first dimension gives one shard more than the other
    result = json.loads(child.stdout.strip().splitlines()[-1])
    formula = memory.step_peak_bytes(LlamaConfig(**result["config"]), 1, 4, 4, False, False, gpu=False, shards=2)
    for term, held in result["held"].items():
        assert held == pytest.approx(formula[term], rel=0.02), term


@pytest.mark.parametrize("case", ["triplet", "no-triplet-checkpointing"])
def test_sharded_run_matches_one_process_on_the_builtin_task(case, tmp_path):
    flags = [*BUILTIN, *(["--gamma", "0", "--gradient-checkpointing"] if case != "triplet" else [])]
    child = torchrun("train.py", *flags, "--fsdp", "--output-dir", str(tmp_path / "sharded"))
    assert "x 2 processes" in child.stdout and child.stdout.count("step 3/3") == 1
    assert "Warning" not in child.stderr and "warning" not in child.stderr, child.stderr[-3000:]
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    assert_same_run(tmp_path / "one", tmp_path / "sharded")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    for kind in ("qwen2", "llama3"):  # bfloat16, chat templates; tied and untied embeddings
        build_checkpoint(root / kind, kind)
    (root / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in chat_records()))
    return root


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_sharded_run_matches_one_process_on_a_hub_shaped_checkpoint(kind, hub, tmp_path):
    flags = ["--model", str(hub / kind), "--data", str(hub / "chat.jsonl"), *HUB]
    child = torchrun("train.py", *flags, "--fsdp", "--output-dir", str(tmp_path / "sharded"))
    assert "saved in bfloat16" in child.stdout
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    assert_same_run(tmp_path / "one", tmp_path / "sharded")


def test_a_sharded_run_resumes_exactly(tmp_path):
    # sampled anchors (temperature 0.8): each process's random stream is in the checkpoint too
    flags = ["--sft-steps", "10", "--batch-size", "8", "--log-every", "1", "--max-new-tokens", "4", "--seed", "0",
             "--device", "cpu", "--save-every", "2", "--fsdp"]
    torchrun("train.py", *flags, "--steps", "4", "--output-dir", str(tmp_path / "whole"))
    torchrun("train.py", *flags, "--steps", "2", "--output-dir", str(tmp_path / "stopped"))
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["reference", "step-000002"]
    assert (checkpoints / "step-000002" / "train.pt").is_file()
    resumed = torchrun("train.py", *flags, "--steps", "4", "--output-dir", str(tmp_path / "stopped"),
                       "--resume", "latest")
    assert "resumed from" in resumed.stdout and "step 2 of 4 done" in resumed.stdout
    whole, stopped = records(tmp_path / "whole"), records(tmp_path / "stopped")
    assert stopped.pop(("resume", 2))["checkpoint"].endswith("step-000002")
    assert set(whole) == set(stopped)
    for key, entry in whole.items():
        assert stopped[key] == entry, key  # the steps after the checkpoint and the evaluation after it
    assert sorted(p.name for p in checkpoints.iterdir()) == ["reference", "step-000002", "step-000004"]  # newest two
    # a sharded checkpoint continues a sharded run only
    with pytest.raises(SystemExit, match=r"that run had --fsdp True \(now False\)"):
        train.main([*[f for f in flags if f != "--fsdp"], "--steps", "5", "--output-dir",
                    str(tmp_path / "stopped"), "--resume", "latest"])


def test_fsdp_needs_torchrun_and_the_dynamic_sampler(capsys):
    with pytest.raises(SystemExit, match=r"--fsdp runs under torchrun \(torchrun --nproc_per_node=N"):
        train.main(["--fsdp", "--steps", "1"])
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--fsdp", "--sampler", "graph"])
    assert stop.value.code == 2
    assert "--sampler graph cannot run a sharded model (--fsdp)" in capsys.readouterr().err
