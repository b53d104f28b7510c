"""Benchmarks: tools/bench.py's speed benchmark on a saved chat model and real pairs (--model), and a
policy that train.py saved, evaluated by EleutherAI's lm-evaluation-harness (lm_eval, an optional
package) on two small local tasks, one scored by log-likelihood and one by generation, with the
policy's own chat template: the folder docs/benchmarks.md's commands are given."""

import json
import os
import re
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
from test_train import model_dirs  # noqa: E402, F401  (a fixture: tiny saved Llamas, one with a chat template)
from tools import bench  # noqa: E402

NUMBER = r"(\d+(?:\.\d+)?)"


# ----------------------------------------------------------------------------- tools/bench.py --model


def test_bench_times_the_three_methods_on_a_saved_chat_model_and_real_pairs(model_dirs, capsys):
    ratios = bench.main(["--model", str(model_dirs["chat"]), "--batch-size", "2", "--bench-warmup", "1",
                         "--bench-steps", "2", "--max-new-tokens", "5", "--bench-profile"])
    lines = capsys.readouterr().out.strip().splitlines()
    # every step ran the three methods, each in a positive time
    steps = [line for line in lines if line.lstrip().startswith("step ")]
    assert [line.split(":")[0].strip() for line in steps] == ["step 1/3 (warm-up)", "step 2/3", "step 3/3"]
    for line in steps:
        seconds = re.findall(r"(dpo|tidpo_no_triplet|tidpo) " + NUMBER + " s", line)
        assert [name for name, _ in seconds] == ["dpo", "tidpo_no_triplet", "tidpo"], line
        assert all(float(value) > 0 for _, value in seconds), line
    # the summary names the model and the pairs, with their token counts
    (summary,) = [line for line in lines if line.startswith("bench on cpu:")]
    match = re.search(rf"model {re.escape(str(model_dirs['chat']))}, batch 2 pairs of the built-in chat pairs: "
                      rf"prompt {NUMBER} \+ response {NUMBER} tokens on average, rows padded to {NUMBER}; "
                      r"anchors 5 tokens", summary)
    assert match, summary
    prompt, response, width = map(float, match.groups())
    assert prompt > 0 and response > 0 and width >= prompt + response
    # a row per method: seconds per step, its ratio to DPO's, tokens per second
    for name in bench.BENCH_VARIANTS:
        (row,) = [line for line in lines if re.match(rf"{name} +{NUMBER} ", line)]
        seconds, ratio, tokens = map(float, row.split()[1:4])
        assert seconds > 0 and ratio > 0 and tokens > 0, row
    # the FLOP model's ratios, and the counted ones: the attribution and the anchors add FLOPs
    (model,) = [line for line in lines if line.startswith("FLOP model")]
    expected = [float(x) for x in re.findall(r"(\d+\.\d\d)(?: with| at|,| and)", model.split("x dpo:")[1])]
    assert len(expected) == 4 and all(x > 1 for x in expected), model
    (counted,) = [line for line in lines if line.startswith("counted")]
    no_triplet, full = map(float, re.search(rf"tidpo_no_triplet {NUMBER}, tidpo {NUMBER}", counted).groups())
    assert 1 < no_triplet < full
    # the profile: each phase of the full step with its time
    for phase in bench.PHASES:
        (row,) = [line for line in lines if line.strip().startswith(phase + " ")]
        assert float(re.search(rf"{re.escape(phase)} +{NUMBER} s", row).group(1)) > 0, row
    assert re.fullmatch(r"bench: tidpo_no_triplet/dpo=\d+\.\d\d tidpo/dpo=\d+\.\d\d "
                        r"peak_mem tidpo/dpo=\d+\.\d\d", lines[-1]), lines[-1]
    assert set(ratios) == {"no_triplet", "full", "mem"} and all(value > 0 for value in ratios.values())


def test_bench_batches_hold_the_data_pairs_and_full_length_anchors(model_dirs, tmp_path):
    records = chat_records(6)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = bench.parse_args(["--model", str(model_dirs["chat"]), "--data", str(path), "--batch-size", "4",
                             "--max-new-tokens", "7"])
    policy, ref, tokenizer, batch_list = bench.bench_setup(args, bench.torch.device("cpu"))
    assert args.min_new_tokens == args.max_new_tokens == 7  # anchors sampled to their full length
    assert [len(batch["chosen_input_ids"]) for batch in batch_list] == [4] * 4
    assert not any(p.requires_grad for p in ref.parameters())
    # the file's pairs in order (the first 5 of its 6 for training, as train.py holds one out),
    # each rendered by the model's chat template, its responses ending with eos
    first, second = batch_list[0], batch_list[1]
    for batch, row, record in [(first, 0, records[0]), (first, 3, records[3]), (second, 0, records[4]),
                               (second, 1, records[0])]:
        start = int(batch["prompt_attention_mask"][row].sum())
        prompt = batch["chosen_input_ids"][row, :start]
        response = batch["chosen_input_ids"][row, start:][batch["chosen_response_mask"][row, start:].bool()]
        assert tokenizer.decode(prompt, skip_special_tokens=True) == tokenizer.decode(
            tokenizer(tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"])
        assert response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response, skip_special_tokens=True) == tokenizer.decode(
            tokenizer(record["chosen"][0]["content"])["input_ids"])


# ----------------------------------------------------------------------------- lm-evaluation-harness


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
    pytest.importorskip("lm_eval")
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
