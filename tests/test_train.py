"""End-to-end tests of train.py: whole runs of main() on tiny models, in-process and on the CPU.

Every run is small (a 0.13M-parameter Llama, a few dozen steps), so the file takes well under a
minute (torch is held to one thread, see conftest.py).
"""

import contextlib
import copy
import io
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools import bench  # noqa: E402
import data  # noqa: E402
from training import evaluate, memory, sampling  # noqa: E402
import tidpo  # noqa: E402
import train  # noqa: E402
from training import builtin_task as builtin  # noqa: E402
from training import setup  # noqa: E402

# Small but long enough for a reliable effect: with seeds 0-4 the held-out accuracy after
# TI-DPO was 0.97-1.0 and the last logged loss 0.08-0.24 below the first (DPO, seeds 0-2: 0.99-1.0).
BUILTIN = ["--sft-steps", "60", "--steps", "30", "--batch-size", "16", "--log-every", "10",
           "--max-new-tokens", "8", "--seed", "0"]
# For runs on a small JSONL through --model: a handful of steps, every one logged.
SMALL = ["--steps", "3", "--batch-size", "4", "--log-every", "1", "--max-new-tokens", "4", "--seed", "0"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
N_RECORDS, N_EVAL = 45, 5
LOG2 = math.log(2.0)


def run(argv, output_dir, hooks=None):
    return train.main([*argv, "--output-dir", str(output_dir)], hooks=hooks)


def assert_finite_history(history, steps, log_every=1):
    assert [h["step"] for h in history] == list(range(log_every, steps + 1, log_every))
    for entry in history:
        for name, value in entry.items():
            assert math.isfinite(value), (entry["step"], name, value)


def builtin_texts(seed=0):
    train_records, heldout = builtin.builtin_task(seed=seed)
    return [r[k] for r in train_records + heldout for k in data.FIELDS]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pair_counts(stdout):
    """(training pairs, held-out pairs) from the first line that main() prints."""
    match = re.search(r"(\d+) training pairs, (\d+) held-out", stdout)
    assert match, stdout
    return int(match[1]), int(match[2])


# ----------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory, one_thread):
    """The default job (TI-DPO with the triplet) on the built-in task, with the trained policy
    object kept for comparison and every warning recorded."""
    output_dir = tmp_path_factory.mktemp("builtin") / "run"
    built = []

    def build_model(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model)
        return model

    original = setup.build_model
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        patch.setattr(setup, "build_model", build_model)
        result = run(BUILTIN, output_dir)
    assert len(built) == 1
    return {"result": result, "output_dir": output_dir, "policy": built[0], "warnings": caught,
            "log": printed.getvalue()}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, one_thread):
    return run([*BUILTIN, "--loss", "dpo"], tmp_path_factory.mktemp("dpo") / "run")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two saved tiny Llamas with the same weights and a word-level tokenizer whose vocabulary
    covers the built-in task and the chat template's words: one without and one with a chat
    template."""
    tokenizer = setup.build_tokenizer(builtin_texts() + ["user assistant :"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    plain, chat = tmp_path_factory.mktemp("model-plain"), tmp_path_factory.mktemp("model-chat")
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    model.save_pretrained(chat)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat)
    return {"plain": plain, "chat": chat}


@pytest.fixture(scope="module")
def records():
    """Plain-string records from the built-in task: N_RECORDS for training, N_EVAL held out."""
    train_records, heldout = builtin.builtin_task(seed=0)
    keep = [{k: r[k] for k in data.FIELDS} for r in train_records[:N_RECORDS] + heldout[:N_EVAL]]
    return keep[:N_RECORDS], keep[N_RECORDS:]


@pytest.fixture(scope="module")
def plain_jsonl(tmp_path_factory, records):
    folder = tmp_path_factory.mktemp("jsonl")
    return write_jsonl(folder / "train.jsonl", records[0]), write_jsonl(folder / "eval.jsonl", records[1])


# ----------------------------------------------------------------------------- 1. built-in task


def test_builtin_tidpo_lowers_the_loss_and_learns_the_preference(builtin_run):
    result = builtin_run["result"]
    history = result["history"]
    assert_finite_history(history, steps=30, log_every=10)
    assert history[-1]["loss"] < history[0]["loss"] - 0.02
    # policy == reference before training: every margin is 0 and ties count half
    assert {k: result["before"][k] for k in ("accuracy", "margin")} == {"accuracy": 0.5, "margin": 0.0}
    assert result["after"]["accuracy"] >= result["before"]["accuracy"] + 0.3
    assert result["after"]["margin"] > 0
    # the weight-placement metrics and self-BLEU are tools/experiments.py's (test_experiments.py), not every run's
    critical = {"critical_accuracy", "critical_margin"}
    assert set(result["before"]) == {"accuracy", "margin"} | critical
    assert set(result["after"]) == {"accuracy", "margin", "judge/policy", "judge/reference", "win_rate", "distinct_2",
                                    "distinct_4", "token_entropy"} | critical
    assert all(math.isfinite(v) for v in result["after"].values())
    assert result["output_dir"] == str(builtin_run["output_dir"])


def test_builtin_metrics_file_matches_the_returned_numbers(builtin_run):
    result = builtin_run["result"]
    lines = (builtin_run["output_dir"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train_records = [r for r in records if r["phase"] == "train"]
    eval_records = [r for r in records if r["phase"] == "eval"]
    assert len(train_records) + len(eval_records) == len(records)

    assert len(train_records) == len(result["history"])
    for record, entry in zip(train_records, result["history"]):
        assert record["seconds_per_step"] > 0 and record["tokens_per_second/pairs"] > 0
        timing = ("phase", "seconds_per_step", "tokens_per_second/pairs", "tokens_per_second/anchors")
        assert {k: v for k, v in record.items() if k not in timing} == entry

    assert [r["when"] for r in eval_records] == ["before", "after"]
    for record in eval_records:
        assert {k: v for k, v in record.items() if k not in ("phase", "when")} == result[record["when"]]


def test_builtin_saved_policy_loads_back_with_the_same_logits_and_tokens(builtin_run):
    folder = builtin_run["output_dir"] / "policy"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    text = "My sister has had a fever for two days. You should seek medical attention promptly."
    expected_ids = setup.build_tokenizer(builtin_texts(seed=0))(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected_ids
    assert expected_ids and setup.build_tokenizer(["x"]).unk_token_id not in expected_ids
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)

    ids = torch.tensor([[tokenizer.bos_token_id] + expected_ids])
    with torch.inference_mode():
        loaded = model(input_ids=ids).logits
        trained = builtin_run["policy"](input_ids=ids).logits
    torch.testing.assert_close(loaded, trained, rtol=0, atol=0)


def test_builtin_run_gives_no_deprecation_warnings(builtin_run):
    def ours(w):
        name = w.filename.replace("\\", "/")
        return str(ROOT) in name or any(f"/{pkg}/" in name for pkg in ("torch", "transformers", "tokenizers"))

    bad = [f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}"
           for w in builtin_run["warnings"]
           if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)) and ours(w)]
    assert not bad, "\n".join(bad)


def test_sft_leaves_no_gradient_behind_for_the_first_preference_step(one_thread):
    # The preference loop clears gradients after its steps only: a gradient left by the SFT would be
    # added to its first one.
    from contextlib import nullcontext

    args = train.parse_args(["--sft-steps", "2", "--batch-size", "4"])
    tokenizer = setup.load_tokenizer(args)
    model = setup.build_model(args, torch.device("cpu"), tokenizer)
    train.sft(model, setup.load_pairs(args, tokenizer)[0][:8], tokenizer, args, torch.device("cpu"), nullcontext(),
              lambda line: None)
    assert all(parameter.grad is None for parameter in model.parameters())


# ----------------------------------------------------------------------------- 2. and 8. DPO, ablations


def test_every_method_meets_the_same_evaluation_draws(builtin_run, dpo_run):
    # Common random numbers: the held-out samples of a seed are drawn from streams fixed by (seed, draw,
    # batch), so TI-DPO's and DPO's runs of one seed judge the same reference samples, to the last digit.
    assert builtin_run["result"]["after"]["judge/reference"] == dpo_run["after"]["judge/reference"]
    assert builtin_run["result"]["after"]["judge/policy"] != dpo_run["after"]["judge/policy"]


def test_the_judged_samples_are_common_draws_and_leave_the_training_stream_alone(builtin_run):
    # The trained policy judged against an exact copy of itself: the same draws give the same samples,
    # so both scores are equal and every prompt ties (win rate 0.5); with independent draws they differ.
    policy = builtin_run["policy"]
    args = train.parse_args(BUILTIN)
    tokenizer = setup.load_tokenizer(args, {})
    heldout = setup.load_pairs(args, tokenizer, {})[1][:24]
    state = torch.get_rng_state()
    result = evaluate.evaluate(policy, copy.deepcopy(policy), heldout, tokenizer, args, torch.device("cpu"),
                               contextlib.nullcontext(), with_samples=True)
    assert torch.equal(torch.get_rng_state(), state)  # the evaluation forks the random stream
    assert result["judge/policy"] == result["judge/reference"] and result["win_rate"] == 0.5
    draws, _ = evaluate.judged_samples(policy, evaluate.process_rounds(heldout, args.batch_size), tokenizer, args,
                                       torch.device("cpu"), contextlib.nullcontext())
    assert len(draws) == evaluate.JUDGE_SAMPLES and all(len(d) == len(heldout) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # the draws differ from each other...
    means = [sum(scores) / len(scores) for scores in zip(*draws)]
    assert result["judge/policy"] == pytest.approx(sum(means) / len(means), abs=1e-12)  # ...and are averaged


def test_dpo_learns_the_preference(dpo_run):
    assert_finite_history(dpo_run["history"], steps=30, log_every=10)
    assert dpo_run["history"][-1]["loss"] < dpo_run["history"][0]["loss"] - 0.02
    assert all(h["loss/triplet"] == 0 for h in dpo_run["history"])
    assert dpo_run["before"]["accuracy"] == 0.5
    assert dpo_run["after"]["accuracy"] >= dpo_run["before"]["accuracy"] + 0.3
    assert dpo_run["after"]["margin"] > 0


def test_uniform_weights_without_triplet_reproduce_dpo_exactly(dpo_run, tmp_path):
    from tools import experiments

    uniform = run([*BUILTIN, "--gamma", "0"], tmp_path / "run", hooks=train.Hooks(weights=experiments.uniform_weights))
    assert uniform["history"] == dpo_run["history"]
    assert uniform["before"] == dpo_run["before"]
    assert uniform["after"] == dpo_run["after"]


def step_inputs(flags):
    """Everything tidpo_step needs for one batch of 4 built-in pairs, on a random tiny Llama."""
    args = train.parse_args([*flags, "--gamma", "0"])
    tokenizer = setup.load_tokenizer(args)
    pairs = setup.load_pairs(args, tokenizer)[0][:4]
    torch.manual_seed(0)
    policy = setup.build_model(args, torch.device("cpu"), tokenizer)
    batch = data.collate(pairs, tokenizer.pad_token_id)
    return policy, copy.deepcopy(policy), batch, tokenizer, args, torch.device("cpu"), contextlib.nullcontext()


@pytest.mark.parametrize("scale", ["unit", "hybrid"])
def test_oracle_weights_sit_on_the_critical_tokens_only(scale, monkeypatch):
    seen = {}
    real_loss = tidpo.tidpo_loss

    def loss_spy(*tensors, **kwargs):
        seen["chosen"], seen["rejected"] = tensors[4], tensors[5]
        return real_loss(*tensors, **kwargs)

    monkeypatch.setattr(tidpo, "tidpo_loss", loss_spy)
    from tools import experiments

    policy, ref, batch, tokenizer, args, device, autocast = step_inputs(["--lam", "1"])
    train.tidpo_step(policy, ref, batch, tokenizer, args, device, autocast,
                     hooks=train.Hooks(weights=experiments.oracle_weights(scale)))
    for side in data.RESPONSES:
        critical = batch[f"{side}_critical_mask"].bool()
        response = batch[f"{side}_response_mask"].bool()
        weights = seen[side][:, :critical.shape[1]]  # the stacked rows are padded to the longer side
        for row in range(len(weights)):
            # unit: 1 on each critical token; hybrid (Eq. 8, lambda 1, mean scale): T / k on each of the
            # k critical tokens of a T-token response. 0 elsewhere.
            k, length = critical[row].sum().item(), response[row].sum().item()
            expected = 1.0 if scale == "unit" else length / k
            assert torch.allclose(weights[row][critical[row]], torch.full((k,), expected))
            assert (weights[row][~critical[row]] == 0).all()


@pytest.mark.parametrize("attribution", ["paper", "no-final", "grad-x-input"])
def test_weights_hook_reaches_the_loss(attribution, monkeypatch):
    # tools/experiments.py's variants reach the step through its hooks; without a hook, Eq. 5-6 and 8
    from tools import experiments

    seen = []
    hook = experiments.attribution_weights(attribution)
    hooks = train.Hooks() if attribution == "paper" else train.Hooks(
        weights=lambda *a: seen.append(attribution) or hook(*a))
    real = memory.gradient_attribution  # tidpo.gradient_attribution's numbers (tests/test_memory.py)
    monkeypatch.setattr(memory, "gradient_attribution", lambda *a: seen.append("paper") or real(*a))
    loss_inputs = []
    real_loss = tidpo.tidpo_loss
    monkeypatch.setattr(tidpo, "tidpo_loss", lambda *t, **k: loss_inputs.append(t) or real_loss(*t, **k))
    inputs = step_inputs([])
    train.tidpo_step(*inputs, hooks=hooks)
    assert seen == [attribution]
    # the weights that reach the loss are the hook's: the same function called on the same inputs
    policy, _, batch, tokenizer = inputs[:4]
    ids, mask, response = data.stack_pair(batch, tokenizer.pad_token_id)
    expected = (hook if attribution != "paper" else train.hybrid_token_weights)(
        policy, ids, mask, response, batch, inputs[4])[1]
    n = len(batch["chosen_input_ids"])
    assert torch.allclose(loss_inputs[0][4], expected[:n]) and torch.allclose(loss_inputs[0][5], expected[n:])


@pytest.mark.parametrize("flags", [["random"], ["--kl-alpha", "0.5"], ["rmsprop"], ["--grad-accum", "2"]],
                         ids=["random-weights", "kl-alpha", "rmsprop", "grad-accum"])
def test_ablation_flags_train_with_finite_losses(flags, model_dirs, plain_jsonl, tmp_path):
    from tools import experiments

    hooks = {"random": train.Hooks(weights=experiments.random_weights),
             "rmsprop": train.Hooks(optimizer=experiments.rmsprop)}.get(flags[0])
    result = run(["--model", str(model_dirs["plain"]), "--data", str(plain_jsonl[0]), *SMALL,
                  "--lr", "1e-3", *([] if hooks else flags)], tmp_path / "run", hooks=hooks)
    history = result["history"]
    assert_finite_history(history, steps=3)
    # Step 1 starts from policy == reference: every log-ratio is 0, whatever the token weights
    # or the KL term, so the weighted DPO loss is log 2 and the triplet loss its margin alpha.
    assert history[0]["loss/dpo_w"] == pytest.approx(LOG2, abs=1e-5)
    assert history[0]["loss/triplet"] == pytest.approx(0.01, abs=1e-5)
    assert history[0]["loss"] == pytest.approx(LOG2 + 0.1 * 0.01, abs=1e-5)
    # ... and after two updates the policy has moved away from the reference
    assert history[-1]["loss/dpo_w"] != pytest.approx(LOG2, abs=1e-6)


def test_an_epochs_short_last_micro_batch_weighs_its_share_of_the_steps_pairs(model_dirs, records, tmp_path):
    # 8 training pairs: --batch-size 5 --grad-accum 2 makes each step an epoch's micro-batches of
    # 5 and 3 pairs, the same 8 pairs (one random order per epoch, cut in turn) as one batch of 8.
    # Each micro-batch weighs its share of the step's 8 pairs, so the two give one gradient. DPO:
    # no sampled anchors, whose draws would differ between the two ways of cutting the batch.
    train_path = write_jsonl(tmp_path / "train.jsonl", records[0][:8])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", records[1])
    flags = ["--model", str(model_dirs["plain"]), "--data", str(train_path), "--eval-data", str(eval_path),
             "--loss", "dpo", "--steps", "3", "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "0", "--seed", "0"]
    accumulated = run([*flags, "--batch-size", "5", "--grad-accum", "2"], tmp_path / "accumulated")["history"]
    whole = run([*flags, "--batch-size", "8"], tmp_path / "whole")["history"]
    for got, expected in zip(accumulated, whole, strict=True):
        for name in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen"):
            # float32 sums of 5 + 3 rows against 8 (other padding too), carried through AdamW:
            # up to 3e-7 relative here; weighting the micro-batches equally changes step 1's grad_norm 5%
            assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (got["step"], name)
    assert whole[-1]["loss"] < whole[0]["loss"] - 1e-3  # the steps moved the policy


# ----------------------------------------------------------------------------- 3. and 4. --model


def test_local_model_with_plain_jsonl_holds_out_the_last_5_percent(model_dirs, plain_jsonl, tmp_path, capsys):
    result = run(["--model", str(model_dirs["plain"]), "--data", str(plain_jsonl[0]), *SMALL], tmp_path / "run")
    n_heldout = max(1, N_RECORDS // 20)
    assert pair_counts(capsys.readouterr().out) == (N_RECORDS - n_heldout, n_heldout)
    assert_finite_history(result["history"], steps=3)
    assert result["history"][0]["loss"] == pytest.approx(LOG2 + 0.1 * 0.01, abs=1e-5)
    assert set(result["after"]) == {"accuracy", "margin"}  # the judge is for the built-in task only
    assert all(math.isfinite(v) for v in result["after"].values())
    # accuracy is counted in halves over the held-out pairs
    assert (result["after"]["accuracy"] * n_heldout * 2) % 1 == 0
    assert (tmp_path / "run" / "policy" / "config.json").is_file()


def test_local_model_honours_eval_data(model_dirs, plain_jsonl, tmp_path, capsys):
    result = run(["--model", str(model_dirs["plain"]), "--data", str(plain_jsonl[0]),
                  "--eval-data", str(plain_jsonl[1]), *SMALL], tmp_path / "run")
    assert pair_counts(capsys.readouterr().out) == (N_RECORDS, N_EVAL)
    assert_finite_history(result["history"], steps=3)
    assert (result["after"]["accuracy"] * N_EVAL * 2) % 1 == 0


def test_local_model_with_chat_template_trains_on_conversational_jsonl(model_dirs, records, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["chat"])
    assert tokenizer.chat_template == CHAT_TEMPLATE
    conversations = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                      "chosen": [{"role": "assistant", "content": r["chosen"]}],
                      "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                     for r in records[0][:20]]
    # the template renders to words of the vocabulary: nothing becomes <unk>
    prompt_text, chosen_text, _ = data.render(tokenizer, conversations[0])
    assert prompt_text.startswith("user : ") and prompt_text.endswith(" assistant :")
    assert chosen_text.strip() == records[0][0]["chosen"]
    assert tokenizer.unk_token_id not in tokenizer(prompt_text + chosen_text)["input_ids"]

    path = write_jsonl(tmp_path / "chat.jsonl", conversations)
    result = run(["--model", str(model_dirs["chat"]), "--data", str(path), *SMALL], tmp_path / "run")
    assert pair_counts(capsys.readouterr().out) == (19, 1)
    assert_finite_history(result["history"], steps=3)
    assert result["history"][0]["loss"] == pytest.approx(LOG2 + 0.1 * 0.01, abs=1e-5)
    assert result["after"]["accuracy"] in (0.0, 0.5, 1.0)


def test_own_data_without_model_trains_the_tokenizer_on_it(tmp_path, capsys):
    # Words the built-in task never uses: with the built-in tokenizer they would all be <unk>.
    records = [{"prompt": f"Quokka question {i}: marsupials near Rottnest?", "chosen": f"Observe quietly, answer {i}.",
                "rejected": f"Feed them bread crusts {i}."} for i in range(6)]
    path = write_jsonl(tmp_path / "mine.jsonl", records)
    args = train.parse_args(["--data", str(path)])
    tokenizer = setup.load_tokenizer(args)
    train_pairs, heldout_pairs = setup.load_pairs(args, tokenizer)
    ids = [i for pair in train_pairs + heldout_pairs for key in ("prompt_ids", "chosen_ids", "rejected_ids")
           for i in pair[key]]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(train_pairs[0]["prompt_ids"], skip_special_tokens=True) == \
        "quokka question 0 : marsupials near rottnest ?"
    result = run(["--data", str(path), *SMALL, "--sft-steps", "2"], tmp_path / "run")
    first_line = capsys.readouterr().out.splitlines()[0]
    assert f"tokenizer trained on {path}" in first_line
    assert_finite_history(result["history"], 3)


def test_a_model_that_fails_to_load_leaves_no_run_folder(model_dirs, tmp_path):
    # a folder with a tokenizer but no model: the tokenizer loads, the model does not
    folder = tmp_path / "tokenizer-only"
    AutoTokenizer.from_pretrained(model_dirs["plain"]).save_pretrained(folder)
    with pytest.raises(SystemExit, match="cannot load it with AutoModelForCausalLM"):
        run(["--model", str(folder)], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text
    assert "default: 5e-4 for the built-in tiny model, 1e-6 with --model" in help_text
    assert "(default: 0.1)" in help_text  # --beta: argparse's own default note stays where it helps


# ----------------------------------------------------------------------------- 5. bad inputs


GOOD = {"prompt": "How do I make a web shop more reliable?", "chosen": "You should write a regression test.",
        "rejected": "You should disable all the tests."}
BAD_INPUTS = {
    "bad-json": ([json.dumps(GOOD), '{"prompt": "a", "chosen": '], 2, "invalid JSON"),
    "missing-field": ([json.dumps(GOOD), json.dumps({k: GOOD[k] for k in ("prompt", "chosen")})], 2,
                      "field 'rejected' is missing"),
    "identical": ([json.dumps(GOOD)] * 2 + [json.dumps({**GOOD, "rejected": GOOD["chosen"]})], 3,
                  "fields 'chosen' and 'rejected' are identical"),
    "empty-response": ([json.dumps({**GOOD, "chosen": "  "}), json.dumps(GOOD)], 1,
                       "field 'chosen' is an empty response"),
    "no-chat-template": ([json.dumps({"prompt": [{"role": "user", "content": GOOD["prompt"]}],
                                      "chosen": [{"role": "assistant", "content": GOOD["chosen"]}],
                                      "rejected": [{"role": "assistant", "content": GOOD["rejected"]}]})] * 2,
                         1, "no chat template"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_data_is_reported_with_file_line_and_field(case, tmp_path):
    lines, line_number, problem = BAD_INPUTS[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError) as error:
        run(["--data", str(path), *SMALL], tmp_path / "run")
    message = str(error.value)
    assert message.startswith(f"{path}, line {line_number}: "), message
    assert problem in message


def test_bad_data_on_the_command_line_exits_with_a_message_and_no_traceback(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    child = subprocess.run([sys.executable, "train.py", "--data", str(path), "--output-dir", str(tmp_path / "run")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode != 0
    assert "error:" in child.stderr
    assert f"{path}, line 2" in child.stderr and "'rejected'" in child.stderr
    assert "Traceback" not in child.stderr


# ----------------------------------------------------------------------------- 6. output folder


def test_second_run_into_a_used_output_dir_stops_and_leaves_it_alone(builtin_run):
    folder = builtin_run["output_dir"]

    def snapshot():
        return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(folder.rglob("*")) if p.is_file()}

    before = snapshot()
    assert "metrics.jsonl" in before and "policy/config.json" in before
    with pytest.raises(SystemExit, match=re.escape(str(folder))):
        run(BUILTIN, folder)
    assert snapshot() == before


# ----------------------------------------------------------------------------- 7. tools/bench.py


def test_bench_prints_the_ratio_line(capsys):
    ratios = bench.main(["--bench-steps", "2", "--bench-hidden", "16", "--bench-layers", "1",
                         "--bench-heads", "2", "--bench-vocab", "50", "--bench-prompt-length", "4",
                         "--bench-response-length", "6", "--batch-size", "2"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"bench: tidpo_no_triplet/dpo=\d+\.\d\d tidpo/dpo=\d+\.\d\d "
                        r"peak_mem tidpo/dpo=\d+\.\d\d", last), last
    assert set(ratios) == {"no_triplet", "full", "mem"}
    for value in ratios.values():
        assert isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_preset_sets_the_size_and_explicit_flags_win():
    args = bench.parse_args(["--preset", "0.5b", "--bench-layers", "2"])
    assert (args.bench_hidden, args.bench_layers, args.bench_heads, args.bench_vocab) == (896, 2, 14, 151936)
    assert bench.parse_args([]).bench_hidden == 64


# ----------------------------------------------------------------------------- anchor sampling


def sampling_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    # left-padded prompts of lengths 4 and 2
    prompt_ids = torch.tensor([[1, 5, 6, 7], [0, 0, 1, 9]])
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    tokenizer = argparse_namespace(pad_token_id=0, eos_token_id=2)
    return model, prompt_ids, prompt_mask, tokenizer


def argparse_namespace(**values):
    import argparse

    return argparse.Namespace(**values)


def sampling_args(**overrides):
    return {**dict(max_new_tokens=6, min_new_tokens=0, temperature=0.8, top_k=50, top_p=0.95), **overrides}


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6)])
def test_sampler_greedy_limits_match_generate(settings):
    # temperature 0, top-k 1 and a tiny top-p all leave one token: generate()'s greedy choice
    model, prompt_ids, prompt_mask, tokenizer = sampling_model()
    expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                              max_new_tokens=6, pad_token_id=0, eos_token_id=2)
    input_ids, attention_mask, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                                            **sampling_args(**settings))
    new = expected[:, 4:]
    assert torch.equal(input_ids[:, :4], prompt_ids)
    assert torch.equal(attention_mask[:, :4], prompt_mask)
    assert torch.equal(response_mask[:, :4], torch.zeros_like(prompt_mask))
    # generate() pads after eos; so does the sampler, and the response mask stops after the eos
    assert torch.equal(input_ids[:, 4:4 + new.shape[1]], new)


def test_sampler_masks_end_at_the_first_eos_and_honour_min_new_tokens():
    model, prompt_ids, prompt_mask, tokenizer = sampling_model()
    # make eos (id 2) by far the likeliest token: every response is [eos] alone...
    eos_bias = torch.zeros(40)
    eos_bias[2] = 100.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + eos_bias)
    ids, attention_mask, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                                      **sampling_args())
    assert response_mask[:, 4:].sum(-1).tolist() == [1, 1]
    assert ids[:, 4].tolist() == [2, 2]
    assert (ids[:, 5:] == 0).all() and (attention_mask[:, 5:] == 0).all()
    # ...unless min_new_tokens forbids it: then eos comes exactly after 3 tokens
    ids, attention_mask, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                                      **sampling_args(min_new_tokens=3))
    assert response_mask[:, 4:].sum(-1).tolist() == [4, 4]
    assert ids[:, 7].tolist() == [2, 2] and not (ids[:, 4:7] == 2).any()
    assert torch.equal(attention_mask[:, 4:], response_mask[:, 4:])


def test_sampler_follows_top_k():
    # with top-k 3, every sampled token is among the 3 likeliest at its step (checked by a forward)
    model, prompt_ids, prompt_mask, tokenizer = sampling_model(seed=1)
    torch.manual_seed(0)
    ids, attention_mask, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                                      **sampling_args(top_k=3, temperature=2.0, top_p=1.0))
    logits = tidpo.forward_logits(model, ids, attention_mask)
    for b in range(2):
        for t in range(4, ids.shape[1]):
            if response_mask[b, t]:
                assert ids[b, t] in logits[b, t - 1].topk(3).indices


def test_default_run_needs_only_torch_transformers_and_tokenizers(tmp_path, monkeypatch):
    # The optional packages made unimportable (a None in sys.modules makes `import` raise ImportError):
    # the whole built-in run, its evaluation with samples and its save still work.
    for name in ("sacrebleu", "matplotlib", "datasets", "trl", "lm_eval", "tensorboard", "peft"):
        monkeypatch.setitem(sys.modules, name, None)
    result = run(["--sft-steps", "5", "--steps", "2", "--batch-size", "8", "--max-new-tokens", "4"], tmp_path / "run")
    assert {"judge/policy", "win_rate", "distinct_2", "token_entropy"} <= set(result["after"])
    assert "self_bleu" not in result["after"]  # sacrebleu's metric is tools/experiments.py's
    assert (tmp_path / "run" / "policy" / "config.json").exists()
    assert not (tmp_path / "run" / "curves.png").exists()  # matplotlib's picture is left out


def test_a_run_draws_its_curves_and_runs_can_be_drawn_side_by_side(builtin_run, tmp_path, capsys):
    from training import plots

    run_dir = builtin_run["output_dir"]
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [r["step"] for r in plots.history(run_dir)]
    assert steps == [h["step"] for h in builtin_run["result"]["history"]]
    dpo = run(["--sft-steps", "5", "--steps", "2", "--batch-size", "8", "--loss", "dpo", "--log-every", "1"],
              tmp_path / "dpo")
    assert dpo["history"]
    capsys.readouterr()
    plots.main([str(run_dir), str(tmp_path / "dpo"), "-o", str(tmp_path / "both.png")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'both.png'}"
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match=r"cannot read .*metrics.jsonl .*is it a train.py run folder"):
        plots.main([str(tmp_path / "nothing")])


def test_the_progress_line_gives_the_time_left(builtin_run):
    lines = [line for line in builtin_run["log"].splitlines() if line.startswith("step ")]
    assert len(lines) == len(builtin_run["result"]["history"])
    for line in lines:
        assert re.search(r"\| [\d.]+ s/step, \d+:\d\d left$", line), line
    assert lines[-1].endswith(", 0:00 left")


def test_every_run_logs_the_likelihoods_and_where_the_triplet_acts(builtin_run, tmp_path):
    # The default run: TRL's logps/* and the triplet's diagnostics in every logged window
    for entry in builtin_run["result"]["history"]:
        for name in ("logps/chosen", "logps/rejected", "triplet/distance_chosen", "triplet/distance_rejected",
                     "triplet/active", "triplet/logratio_anchor"):
            assert name in entry, name
        assert 0 <= entry["triplet/active"] <= 1 and entry["logps/chosen"] < 0
        assert entry["flipped_pairs"] == 0 and entry["triplet/active_on_clean"] == entry["triplet/active"]
    # With label noise: the active share among flipped and among clean pairs, which average to the whole's
    history = run(["--sft-steps", "20", "--steps", "4", "--batch-size", "16", "--max-new-tokens", "8",
                   "--log-every", "2"], tmp_path / "noisy", hooks=train.Hooks(task={"label_noise": 0.25}))["history"]
    for entry in history:
        share = entry["flipped_pairs"]
        assert 0 < share < 1
        combined = share * entry["triplet/active_on_flipped"] + (1 - share) * entry["triplet/active_on_clean"]
        assert combined == pytest.approx(entry["triplet/active"], abs=1e-6)
