"""Tests of tools/ifeval.py: IFEval's checkers as the tool wires them, its scores and diversity on hand-made
responses, the prompts and their held-out split, the choice of pairs and the grid's CSV; then the commands
end to end on a tiny chat model, and once on SmolLM2-135M-Instruct where its package is installed.

Run: python -m pytest -q tests/test_ifeval.py
"""

import argparse
import csv
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import train  # noqa: E402
from tools import ifeval, smollm2  # noqa: E402
from training import setup  # noqa: E402

try:
    ifeval.registry()
except SystemExit as missing:  # lm_eval or its ifeval extra (langdetect, immutabledict) is not installed
    pytest.skip(str(missing), allow_module_level=True)

# English in lowercase letters, long enough for langdetect to call it English
LOWER = "the lighthouse keeper climbs the stairs every evening and lights the lamp for the ships at sea"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def prompt(*types, kwargs=None):
    return {"key": 0, "prompt": "", "instruction_id_list": list(types), "kwargs": kwargs or [{} for _ in types]}


# ----------------------------------------------------------------------------- the checkers and the scores


def test_the_offline_types_are_the_registry_less_the_two_that_need_nltk_data():
    instructions = ifeval.registry()[0]
    assert len(instructions) == 25 and len(ifeval.OFFLINE) == 23
    assert set(ifeval.OFFLINE) | set(ifeval.LEFT_OUT) == set(instructions)
    assert set(ifeval.LEFT_OUT) == {"length_constraints:number_sentences", "change_case:capital_word_frequency"}
    text = "Hello there. This is A TEST, with a comma.\n\nAnd a second paragraph."
    for instruction_id in ifeval.OFFLINE:  # each checks a response here, without any data from the network
        kwargs = {"prompt_to_repeat": "Hello"} if instruction_id == ifeval.REPEAT_PROMPT else {}
        check = instructions[instruction_id](instruction_id)
        check.build_description(**kwargs)
        assert check.check_following(text) in (True, False)
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:  # as on a machine without nltk's data: the two left out cannot check a response
        for instruction_id in ifeval.LEFT_OUT:
            check = instructions[instruction_id](instruction_id)
            check.build_description()
            with pytest.raises(LookupError):
                check.check_following(text)


def test_a_lowercase_response_follows_english_lowercase_and_a_capitalised_one_does_not():
    lowercase = prompt("change_case:english_lowercase")
    assert ifeval.follows(lowercase, LOWER) == [True]
    assert ifeval.follows(lowercase, LOWER.capitalize()) == [False]
    assert ifeval.accuracies([lowercase], [LOWER])["prompt_level_strict_acc"] == 1
    assert ifeval.accuracies([lowercase], [LOWER.capitalize()])["prompt_level_strict_acc"] == 0
    assert ifeval.follows(prompt("punctuation:no_comma"), "  \n") == [False]  # a blank response follows nothing


def test_loose_scoring_forgives_a_first_line_that_breaks_the_rule():
    assert ifeval.loose_variants("a\nb\n*c*") == ["a\nb\n*c*", "b\n*c*", "a\nb", "b", "a\nb\nc", "b\nc", "a\nb", "b"]
    lowercase = prompt("change_case:english_lowercase")
    response = "Sure! Here it is:\n" + LOWER
    assert ifeval.follows(lowercase, response) == [False]
    assert ifeval.follows(lowercase, response, loose=True) == [True]
    scores = ifeval.accuracies([lowercase], [response])
    assert (scores["prompt_level_strict_acc"], scores["prompt_level_loose_acc"]) == (0, 1)
    # asterisks around a quoted response: strict, it does not start with a quotation mark; loose removes them
    quotation = prompt("startend:quotation")
    assert ifeval.follows(quotation, '*"' + LOWER + '"*') == [False]
    assert ifeval.follows(quotation, '*"' + LOWER + '"*', loose=True) == [True]


def test_prompt_and_instruction_level_accuracy_on_hand_made_responses():
    prompts = [prompt("change_case:english_lowercase", "punctuation:no_comma"), prompt("punctuation:no_comma"),
               prompt("startend:quotation")]
    responses = [LOWER.replace(" and ", ", and "), LOWER, f'"{LOWER}"']  # lowercase with a comma; no comma; quoted
    scores = ifeval.accuracies(prompts, responses)
    assert scores["prompt_level_strict_acc"] == 2 / 3  # the first prompt has one instruction not followed
    assert scores["inst_level_strict_acc"] == 3 / 4
    assert scores["inst_level_strict_acc/punctuation:no_comma"] == 1 / 2
    assert scores["inst_level_strict_acc/change_case:english_lowercase"] == 1
    assert scores["inst_level_strict_acc/startend:quotation"] == 1
    assert "inst_level_strict_acc/detectable_format:title" not in scores  # a type that no prompt has
    assert scores["prompt_level_loose_acc"] == 2 / 3 and scores["inst_level_loose_acc"] == 3 / 4


def test_distinct_n_and_self_bleu_of_hand_made_samples():
    sampled = [[("a b", [1, 2]), ("a b c", [1, 2, 3])], [("c d", [3, 4]), ("a b", [1, 2])]]
    scores = ifeval.diversity(sampled)
    # bigrams (1,2) (1,2) (2,3) (3,4) (1,2): 3 distinct of 5; no sample has a 4-gram
    assert scores["distinct_2"] == 3 / 5 and scores["distinct_4"] == 0
    same = "the keeper lights the lamp every evening"
    assert ifeval.diversity([[(same, [1]), (same, [1])]])["self_bleu"] == pytest.approx(100)
    assert ifeval.diversity([[("one two three four", [1]), ("five six seven eight", [2])]])["self_bleu"] == 0


def test_pair_choice_takes_the_most_and_fewest_followed_and_drops_ties():
    assert ifeval.pick_pair([1, 2, 0, 2]) == (1, 2)  # the first of the best, the first of the worst
    assert ifeval.pick_pair([1, 1, 1]) is None  # a tie
    assert ifeval.pick_pair([None, 0, 1]) == (2, 1)  # an empty sample is left out
    assert ifeval.pick_pair([2, None, 2]) is None
    assert ifeval.pick_pair([None, 2, None]) is None  # fewer than two samples to compare


# ----------------------------------------------------------------------------- the prompts


def test_held_out_base_requests_are_never_training_ones():
    train_bases, heldout_bases = ifeval.base_requests("train"), ifeval.base_requests("heldout")
    assert len(train_bases) == 72 and len(heldout_bases) == 24 and not set(train_bases) & set(heldout_bases)
    training = ifeval.build_prompts(200, "train", 0)
    heldout = ifeval.build_prompts(48, "heldout", ifeval.HELDOUT_SEED)
    assert {p["base"] for p in training} == set(train_bases) and {p["base"] for p in heldout} == set(heldout_bases)
    assert not any(topic in p["prompt"] for p in training for topic in ifeval.HELDOUT_TOPICS)


def test_prompts_are_seeded_and_each_instruction_rebuilds_from_its_kwargs():
    state = random.getstate()
    prompts = ifeval.build_prompts(300, "train", 0)
    assert random.getstate() == state  # the caller's random stream is left as it was
    assert ifeval.build_prompts(5, "train", 0) == prompts[:5]  # the first n of more prompts are the same
    assert ifeval.build_prompts(5, "train", 1) != prompts[:5]
    instructions = ifeval.registry()[0]
    for p in prompts:
        types = p["instruction_id_list"]
        assert p["prompt"].startswith(p["base"]) and 1 <= len(types) <= 2 and set(types) <= set(ifeval.OFFLINE)
        assert not (len(types) == 2 and ifeval.conflicts(*types))
        for instruction_id, kwargs in zip(types, p["kwargs"]):  # the words that the checker of the kwargs builds
            assert instructions[instruction_id](instruction_id).build_description(**kwargs) in p["prompt"]
            if instruction_id == "length_constraints:nth_paragraph_first_word":  # never paragraph n + 1 of n
                assert kwargs["nth_paragraph"] <= kwargs["num_paragraphs"]
        if ifeval.REPEAT_PROMPT in types:  # last, and the request to repeat is all that comes before it
            assert types[-1] == ifeval.REPEAT_PROMPT
            assert p["prompt"].startswith(p["kwargs"][-1]["prompt_to_repeat"] + " First repeat the request")


def test_prompts_in_ifevals_own_form_are_read_less_the_types_left_out(tmp_path, capsys):
    path = tmp_path / "input_data.jsonl"
    records = [{"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
               {"key": 2, "prompt": "Say hi twice.", "instruction_id_list": ["length_constraints:number_sentences"],
                "kwargs": [{"num_sentences": 2, "relation": "at least"}]},
               {"key": 3, "prompt": "Say bye.", "instruction_id_list": ["startend:quotation", "keywords:existence"],
                "kwargs": [{"keywords": None}, {"keywords": ["bye"]}]}]  # unused arguments are null in IFEval's file
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = ifeval.load_prompts(path)
    assert [p["key"] for p in prompts] == [1, 3]
    assert "length_constraints:number_sentences 1" in capsys.readouterr().out
    assert ifeval.follows(prompts[1], '"bye"') == [True, True]


# ----------------------------------------------------------------------------- a tiny chat model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A saved tiny Llama whose word-level tokenizer covers the prompts' words, with a chat template."""
    texts = [p["prompt"] for p in ifeval.build_prompts(300, "train", 0) + ifeval.build_prompts(64, "heldout", 0)]
    tokenizer = setup.build_tokenizer(texts + ["user assistant :", LOWER])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-chat")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hand_prefs(path, n=8):
    """n chat records on training prompts: chosen without a comma, rejected with one."""
    with open(path, "w") as f:
        for p in ifeval.build_prompts(n, "train", 0):
            f.write(json.dumps({"prompt": [{"role": "user", "content": p["prompt"]}],
                                "chosen": [{"role": "assistant", "content": LOWER}],
                                "rejected": [{"role": "assistant", "content": LOWER.replace(" and ", ", and ")}],
                                "instruction_id_list": p["instruction_id_list"], "kwargs": p["kwargs"]}) + "\n")
    return path


def test_prefs_writes_one_pair_per_prompt_that_train_py_loads(tiny_model, tmp_path, monkeypatch, capsys):
    no_comma, both = prompt("punctuation:no_comma"), prompt("change_case:english_lowercase", "punctuation:no_comma")
    prompts = [{**p, "key": key, "prompt": f"request {key}", "base": f"request {key}"}
               for key, p in enumerate([no_comma, no_comma, no_comma, both])]
    samples = [["a b c", "a, b", "d e"],  # follows 1, 0, 1: chosen the first, rejected the second
               ["x, y", "z, w"],  # 0, 0: a tie
               ["  ", "q r"],  # one empty sample: fewer than two to compare
               ["Hello, World", LOWER, LOWER.replace(" and ", ", and ")]]  # 0, 2, 1
    monkeypatch.setattr(ifeval, "build_prompts", lambda n, split, seed: prompts)
    monkeypatch.setattr(ifeval, "load_model", lambda folder: None)
    monkeypatch.setattr(ifeval, "responses", lambda *args: [[(text, []) for text in s] for s in samples])
    path = tmp_path / "prefs.jsonl"
    args = argparse.Namespace(model=str(tiny_model), output=str(path), prompts=4, samples=3, max_new_tokens=8,
                              batch_size=4, seed=0)
    counts = ifeval.make_prefs(args)
    assert {k: counts[k] for k in ("pairs", "ties", "too_few", "empty")} == {"pairs": 2, "ties": 1, "too_few": 1,
                                                                            "empty": 1}
    assert counts["by_type"] == {"punctuation:no_comma": [2, 4], "change_case:english_lowercase": [1, 1]}
    assert "2 pairs kept, 1 ties dropped, 1 with fewer than 2 non-empty samples" in capsys.readouterr().out
    records = data.load_jsonl(path)
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records] == [
        ("a b c", "a, b"), (LOWER, "Hello, World")]
    assert records[1]["chosen_followed"] == [True, True] and records[1]["rejected_followed"] == [False, False]
    assert records[1]["instruction_id_list"] == both["instruction_id_list"] and records[1]["key"] == 3
    # train.py reads the file as it is, the extra keys ignored (one record held out)
    train_pairs, heldout_pairs = setup.load_pairs(train.parse_args(["--model", str(tiny_model), "--data", str(path)]),
                                                  setup.load_tokenizer(train.parse_args(["--model", str(tiny_model)])))
    assert len(train_pairs) == 1 and len(heldout_pairs) == 1


def test_responses_are_seeded_and_leave_the_callers_random_stream(tiny_model):
    loaded = ifeval.load_model(tiny_model)
    prompts = ifeval.build_prompts(3, "heldout", ifeval.HELDOUT_SEED)
    state = torch.get_rng_state()
    first = ifeval.responses(loaded, prompts, 2, 0.8, 6, 4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert [len(s) for s in first] == [2, 2, 2] and all(len(tokens) <= 6 for s in first for _, tokens in s)
    assert ifeval.responses(loaded, prompts, 2, 0.8, 6, 4, seed=0) == first  # the same draws for every model
    assert ifeval.responses(loaded, prompts, 2, 0.8, 6, 4, seed=1) != first
    greedy = ifeval.responses(loaded, prompts, 2, 0.0, 6, 4, seed=0)
    assert all(s[0] == s[1] for s in greedy)


def test_eval_writes_every_score_and_response(tiny_model, tmp_path, capsys):
    path = tmp_path / "eval.json"
    metrics = ifeval.main(["eval", "--model", str(tiny_model), "--heldout", "3", "--samples", "2",
                           "--max-new-tokens", "6", "--output", str(path)])
    saved = json.loads(path.read_text())
    assert saved["metrics"] == metrics and set(ifeval.HEADLINE) <= set(metrics) and saved["prompts"] == 3
    heldout = ifeval.build_prompts(3, "heldout", ifeval.HELDOUT_SEED)
    assert [r["prompt"] for r in saved["responses"]] == [p["prompt"] for p in heldout]
    assert metrics["prompt_level_strict_acc"] == ifeval.accuracies(
        heldout, [r["response"] for r in saved["responses"]])["prompt_level_strict_acc"]
    assert "| prompt_level_strict_acc |" in capsys.readouterr().out


def test_the_grid_appends_each_cell_and_skips_the_finished_ones(tiny_model, tmp_path, monkeypatch):
    prefs, output, runs = hand_prefs(tmp_path / "prefs.jsonl"), tmp_path / "grid.csv", tmp_path / "runs"
    argv = ["grid", "--model", str(tiny_model), "--prefs", str(prefs), "--methods", "reference", "dpo", "--seeds", "0",
            "1", "--steps", "2", "--heldout", "2", "--samples", "2", "--max-new-tokens", "4", "--output", str(output),
            "--runs-dir", str(runs), "--log-every", "1"]
    text = ifeval.main(argv)
    rows = ifeval.read_rows(output)
    assert [(r["method"], r["seed"], r["steps"]) for r in rows] == [("reference", "0", "0"), ("dpo", "0", "2"),
                                                                   ("dpo", "1", "2")]
    assert rows[1]["lr"] == "1e-06" and float(rows[1]["train_seconds"]) > 0 and "torch" in rows[1]["machine"]
    assert list(rows[0]) == ifeval.COLUMNS and rows[0]["pref_accuracy"] == "" and rows[1]["pref_accuracy"] != ""
    assert (runs / "dpo-seed1" / "policy" / "config.json").is_file()
    assert "| dpo | 2 |" in text and "| reference | 1 |" in text

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    before = output.read_text()
    monkeypatch.setattr(train, "main", no_training)
    monkeypatch.setattr(ifeval, "evaluate_model", no_training)
    assert ifeval.main(argv) == text  # nothing to run: the report of the same cells
    assert output.read_text() == before
    with pytest.raises(SystemExit, match="other settings"):  # a grid of other settings does not mix in
        ifeval.main([*argv[:-2], "--steps", "3", "--runs-dir", str(runs)])
    assert ifeval.main(["grid", "--report", "--output", str(output)]) == text


def test_the_report_gives_paired_differences_from_dpo_by_hand(tmp_path):
    path = tmp_path / "grid.csv"
    values = {"dpo": [0.5, 0.6, 0.7], "tidpo": [0.6, 0.6, 0.9]}
    for method, column in values.items():
        for seed, value in enumerate(column):
            ifeval.append_row(path, {"method": method, "seed": seed, "steps": 4, **{m: 0.5 for m in ifeval.HEADLINE},
                                     "prompt_level_strict_acc": value})
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ifeval.COLUMNS  # one header, then the rows
    text = ifeval.report(ifeval.read_rows(path))
    assert "| tidpo | 3 | 0.700 ± 0.173 |" in text and "| dpo | 3 | 0.600 ± 0.100 |" in text
    # differences 0.1, 0, 0.2: mean 0.1, standard deviation 0.1, t(2) = 4.303: 0.1 ± 4.303 * 0.1 / sqrt(3)
    assert "| tidpo | +0.100 [-0.148, +0.348] | +0.000 [+0.000, +0.000] |" in text
    assert "reference" not in text  # no reference cell, no table of differences from it
    ifeval.append_row(path, {"method": "reference", "seed": 0, "steps": 0, **{m: 0.5 for m in ifeval.HEADLINE},
                             "prompt_level_strict_acc": 0.4, "inst_level_strict_acc/punctuation:no_comma": 0.25})
    text = ifeval.report(ifeval.read_rows(path))
    # tidpo minus 0.4: 0.2, 0.2, 0.5: mean 0.3, standard deviation 0.1732: 0.3 ± 4.303 * 0.1732 / sqrt(3)
    assert "| tidpo | +0.300 [-0.130, +0.730] | +0.000 [+0.000, +0.000] |" in text
    assert "| dpo | +0.200 [-0.048, +0.448] |" in text
    assert "| punctuation:no_comma |  | 0.25 |  |  |" in text  # per type: reference first, the only one with it


@pytest.mark.parametrize("command", ["prefs", "eval", "grid"])
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        ifeval.parse_args([command, "--help"])
    assert done.value.code == 0 and "usage" in capsys.readouterr().out


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct


def test_the_three_commands_on_smollm2(tmp_path):
    """prefs on 3 prompts x 2 samples, eval on 2 held-out prompts, a grid of one DPO step into a CSV and the
    same grid again, which finds its cell done. The grid trains on the sampled pairs and two hand-made ones,
    so that it has pairs whatever the samples were."""
    try:
        smollm2.gguf_file()
    except SystemExit as missing:
        pytest.skip(str(missing))
    model = smollm2.write(tmp_path / "smollm2")
    prefs = tmp_path / "prefs.jsonl"
    counts = ifeval.main(["prefs", "--model", str(model), "--output", str(prefs), "--prompts", "3", "--samples", "2",
                          "--max-new-tokens", "16"])
    assert counts["pairs"] + counts["ties"] + counts["too_few"] == 3
    sampled = prefs.read_text()
    assert len(sampled.splitlines()) == counts["pairs"]
    metrics = ifeval.main(["eval", "--model", str(model), "--heldout", "2", "--samples", "2", "--max-new-tokens",
                           "16"])
    assert 0 <= metrics["inst_level_strict_acc"] <= 1 and 0 < metrics["response_tokens"] <= 16
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(sampled + hand_prefs(tmp_path / "hand.jsonl", n=2).read_text())
    argv = ["grid", "--model", str(model), "--prefs", str(data_file), "--methods", "dpo", "--seeds", "0", "--steps",
            "1", "--heldout", "2", "--samples", "2", "--max-new-tokens", "16", "--max-length", "192",
            "--batch-size", "2", "--output", str(tmp_path / "grid.csv"), "--runs-dir", str(tmp_path / "runs")]
    ifeval.main(argv)
    rows = ifeval.read_rows(tmp_path / "grid.csv")
    assert [(r["method"], r["seed"], r["steps"]) for r in rows] == [("dpo", "0", "1")]
    ifeval.main(argv)
    assert ifeval.read_rows(tmp_path / "grid.csv") == rows
