"""What a new user meets in a first hour, from the command line: each mistake gives one clear line
and a non-zero exit, writes nothing it should not, and the warnings name the flag to change."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import data  # noqa: E402
from test_real_models import build_checkpoint, chat_records  # noqa: E402
from training import builtin_task as builtin  # noqa: E402

TINY = ["--sft-steps", "5", "--steps", "2", "--max-new-tokens", "4", "--log-every", "1"]


def train_py(*arguments):
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    return subprocess.run([sys.executable, "train.py", *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**env, "OMP_NUM_THREADS": "1"})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def plain_records(n):
    return [{field: record[field] for field in data.FIELDS} for record in builtin.builtin_task(seed=0)[0][:n]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path):
    result = train_py("--device", "cuda", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: --device cuda: PyTorch sees no CUDA device here (torch {torch.__version__}); leave --device "
        "out, or use --device cpu"]
    assert not (tmp_path / "run").exists()


def test_a_model_with_too_few_positions_is_refused_before_anything_is_written(tmp_path):
    # GPT-2 has absolute positions: 40 of them cannot hold a prompt plus 64 sampled tokens
    folder = tmp_path / "gpt2"
    build_checkpoint(folder, "gpt2")
    config = json.loads((folder / "config.json").read_text())
    GPT2LMHeadModel(GPT2Config(vocab_size=config["vocab_size"], n_embd=32, n_layer=1, n_head=2, n_positions=40,
                               bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"])
                    ).save_pretrained(folder)
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_records())
    result = train_py("--model", str(folder), "--data", str(chat), "--max-length", "40", "--steps", "1",
                      "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: the model has 40 positions and the longest pair takes ")
    assert line.endswith("lower --max-length (now 40) or --max-new-tokens")
    assert not (tmp_path / "run").exists()


def test_a_run_that_failed_leaves_its_folder_reusable(tmp_path):
    folder = tmp_path / "run"
    failed = train_py(*TINY, "--steps", "3", "--lr", "1e30", "--warmup-steps", "0", "--output-dir", str(folder))
    assert failed.returncode == 1 and "is nan" in failed.stderr and "Traceback" not in failed.stderr
    assert sorted(os.listdir(folder)) == ["metrics.jsonl"]
    again = train_py(*TINY, "--output-dir", str(folder))
    assert again.returncode == 0, again.stderr
    assert "held-out after" in again.stdout and (folder / "policy" / "config.json").is_file()
    assert f"started over in {folder}: it held only the metrics.jsonl of a run that stopped" in again.stdout
    phases = [json.loads(line)["phase"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert phases.count("train") == 2  # the failed run's records are gone
    # a finished run is not started over
    refused = train_py(*TINY, "--output-dir", str(folder))
    assert refused.returncode == 1 and "already holds an earlier run" in refused.stderr
    # ... and it is not a model either: the message names its policy folder
    wrong = train_py("--model", str(folder), "--steps", "1", "--output-dir", str(tmp_path / "next"))
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip() == (f"error: --model {folder}: a train.py run folder; the model it trained is "
                                    f"{folder / 'policy'}")


def test_cut_pairs_few_steps_and_a_small_held_out_set_are_warned_about(tmp_path):
    # 30 records: 29 training pairs (2 steps at batch 16, fewer than 10 warmup steps), 1 held out;
    # --max-length 12 cuts every pair, and most lose their end token
    records = write_jsonl(tmp_path / "prefs.jsonl", plain_records(30))
    result = train_py("--data", str(records), "--max-length", "12", "--sft-steps", "2", "--max-new-tokens", "2",
                      "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "warning: 29 of 29 training pairs are longer than --max-length 12 and were cut: " in out
    # every prompt keeps at least its last 6 tokens (--max-prompt-length's default: half)
    assert "prompts lost their oldest tokens (keeping at least their last --max-prompt-length 6)" in out
    assert "prompts were cut to fewer than 4 tokens" not in out
    assert "warning: the run has 2 steps, fewer than --warmup-steps 10" in out
    assert "warning: 1 held-out pairs: the held-out accuracy moves in steps of 1/1" in out
    warnings = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["phase"] == "warning"]
    assert len(warnings) >= 4
