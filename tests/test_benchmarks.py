"""A policy that train.py saved, evaluated by EleutherAI's lm-evaluation-harness (lm_eval, an
optional package) on two small local tasks, one scored by log-likelihood and one by generation,
with the policy's own chat template: the folder docs/benchmarks.md's commands are given."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import train  # noqa: E402
from test_real_models import build_checkpoint, chat_records  # noqa: E402

pytest.importorskip("lm_eval")

QUESTIONS = [{"question": f"Is {a} plus {b} equal to {a + b}?", "choices": ["yes", "no"], "answer": 0,
              "target": "yes"} for a, b in [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
CHOICE = TASK + """output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GENERATE = TASK + """output_type: generate_until
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["<|im_end|>"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """The policy folder of a 1-step run on a Qwen2.5-shaped chat checkpoint (bfloat16, ChatML)."""
    root = tmp_path_factory.mktemp("benchmark")
    build_checkpoint(root / "qwen2", "qwen2")
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_records()))
    train.main(["--model", str(root / "qwen2"), "--data", str(root / "chat.jsonl"), "--steps", "1",
                "--batch-size", "2", "--max-new-tokens", "4", "--max-length", "96", "--output-dir", str(root / "run")])
    return root / "run" / "policy"


def test_a_saved_policy_runs_in_the_harness_with_its_chat_template(policy, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    questions = tasks / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / "choice.yaml").write_text(CHOICE.format(name="tidpo_smoke_choice", data=questions))
    (tasks / "generate.yaml").write_text(GENERATE.format(name="tidpo_smoke_generate", data=questions))
    lm_eval = shutil.which("lm_eval") or shutil.which("lm-eval")
    command = [lm_eval] if lm_eval else [sys.executable, "-m", "lm_eval"]
    result = subprocess.run([*command, "run", "--model", "hf", "--model_args", f"pretrained={policy}",
                             "dtype=float32", "--tasks", "tidpo_smoke_choice", "tidpo_smoke_generate",
                             "--include_path", str(tasks), "--apply_chat_template", "--batch_size", "2",
                             "--device", "cpu", "--output_path", str(tmp_path / "out"), "--log_samples"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert 0 <= results["tidpo_smoke_choice"]["acc,none"] <= 1
    assert 0 <= results["tidpo_smoke_generate"]["exact_match,none"] <= 1
    for name in ("choice", "generate"):
        (samples_file,) = (tmp_path / "out").rglob(f"samples_tidpo_smoke_{name}_*.jsonl")
        samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
        assert len(samples) == len(QUESTIONS)
        # each request went through the policy's ChatML template
        prompt = json.dumps(samples[0]["arguments"])
        assert "<|im_start|>user" in prompt and "<|im_start|>assistant" in prompt, prompt[:300]
