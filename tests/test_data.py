import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from data import DataError  # noqa: E402
from training import builtin_task as builtin  # noqa: E402
from training import setup  # noqa: E402
from training import hf_datasets  # noqa: E402

PAD, EOS, BOS, UNK = 0, 1, 2, 3
CHAT_TEMPLATE = ("{% for m in messages %}{% if loop.first %}<bos>{% endif %}"
                 "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def letters():
    """Each word once, so ids are alphabetical after the 4 specials: a=4, b=5, ..., j=13."""
    return setup.build_tokenizer(["a b c d e f g h i j"])


@pytest.fixture(scope="module")
def task():
    return builtin.builtin_task(seed=0)


@pytest.fixture(scope="module")
def task_tokenizer(task):
    train, heldout = task
    return setup.build_tokenizer([r[f] for r in train + heldout for f in data.FIELDS])


# --- collate ---------------------------------------------------------------

def test_collate_pads_and_masks_exactly():
    pairs = [
        {"prompt_ids": [2, 5, 6], "chosen_ids": [7, 1], "rejected_ids": [8, 9, 1],
         "chosen_critical": [0], "rejected_critical": [1]},
        {"prompt_ids": [2], "chosen_ids": [7, 8, 9, 1], "rejected_ids": [9, 1],
         "chosen_critical": [1, 2], "rejected_critical": []},
    ]
    batch = data.collate(pairs, pad_id=0)
    expected = {
        "chosen_input_ids":        [[2, 5, 6, 7, 1], [2, 7, 8, 9, 1]],
        "chosen_attention_mask":   [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
        "chosen_response_mask":    [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]],
        "chosen_critical_mask":    [[0, 0, 0, 1, 0], [0, 0, 1, 1, 0]],
        "rejected_input_ids":      [[2, 5, 6, 8, 9, 1], [2, 9, 1, 0, 0, 0]],
        "rejected_attention_mask": [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]],
        "rejected_response_mask":  [[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]],
        "rejected_critical_mask":  [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]],
        "prompt_input_ids":        [[2, 5, 6], [0, 0, 2]],
        "prompt_attention_mask":   [[1, 1, 1], [0, 0, 1]],
    }
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].dtype == torch.long, key
        assert batch[key].tolist() == value, key


def test_collate_omits_critical_masks_unless_every_pair_has_them():
    pairs = [{"prompt_ids": [2], "chosen_ids": [4, 1], "rejected_ids": [5, 1], "chosen_critical": [0]},
             {"prompt_ids": [2], "chosen_ids": [6, 1], "rejected_ids": [7, 1]}]
    batch = data.collate(pairs, pad_id=0)
    assert "chosen_critical_mask" not in batch and "rejected_critical_mask" not in batch


# --- encode_pair -------------------------------------------------------------

def test_encode_pair_adds_bos_and_eos(letters):
    pair = data.encode_pair(letters, "a b c", "d e", "f g h", max_length=100)
    assert pair == {"prompt_ids": [BOS, 4, 5, 6], "chosen_ids": [7, 8, EOS], "rejected_ids": [9, 10, 11, EOS],
                    "cut": [0, 0, 0]}


def test_encode_pair_does_not_double_bos(letters):
    pair = data.encode_pair(letters, "<bos>a b", "c", "d", max_length=100)
    assert pair["prompt_ids"] == [BOS, 4, 5]


@pytest.mark.parametrize("max_length, max_prompt_length, prompt, chosen, rejected, cut", [
    (8, 1, [BOS, 4, 5, 6], [7, 8, EOS], [9, 10, 11, EOS], [0, 0, 0]),   # fits exactly
    (6, 1, [5, 6], [7, 8, EOS], [9, 10, 11, EOS], [2, 0, 0]),    # prompt loses its oldest tokens first
    (5, 1, [6], [7, 8, EOS], [9, 10, 11, EOS], [3, 0, 0]),       # down to its last --max-prompt-length
    (4, 1, [6], [7, 8, EOS], [9, 10, 11], [3, 0, 1]),            # then responses are cut from the right
    (2, 1, [6], [7], [9], [3, 2, 3]),
    # the default, half of max_length: the prompt keeps 3 of 6 tokens, 2 of 5, 2 of 4, 1 of 2
    (6, None, [4, 5, 6], [7, 8, EOS], [9, 10, 11], [1, 0, 1]),
    (5, None, [5, 6], [7, 8, EOS], [9, 10, 11], [2, 0, 1]),
    (4, None, [5, 6], [7, 8], [9, 10], [2, 1, 2]),
    (2, None, [6], [7], [9], [3, 2, 3]),
    (7, 6, [BOS, 4, 5, 6], [7, 8, EOS], [9, 10, 11], [0, 0, 1]),   # a short prompt is not padded
])
def test_encode_pair_truncation(letters, max_length, max_prompt_length, prompt, chosen, rejected, cut):
    pair = data.encode_pair(letters, "a b c", "d e", "f g h", max_length=max_length,
                            max_prompt_length=max_prompt_length)
    assert pair == {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "cut": cut}
    assert len(prompt) >= min(4, max_prompt_length or max_length // 2)  # never below it


def test_cut_report_counts_the_cut_prompts_and_responses(letters):
    pairs = [data.encode_pair(letters, "a b c", "d e", "f g h", max_length=n, max_prompt_length=1)
             for n in (8, 6, 4, 2)]
    lines = setup.cut_report(pairs, 4, "training", 1)
    # prompts cut in the pairs of max_length 6, 4, 2; responses: the rejected of 4, both of 2
    assert lines[0].startswith("warning: 3 of 4 training pairs are longer than --max-length 4 and were "
                               "cut: 3 prompts lost their oldest tokens (keeping at least their last "
                               "--max-prompt-length 1), 3 of 8 responses their last tokens")
    assert lines[1].startswith("warning: 3 training prompts were cut to fewer than 4 tokens "
                               "(--max-prompt-length 1)")
    assert setup.cut_report(pairs[:1], 8, "training", 1) == []
    # with the default (half): at max_length 6 the prompt keeps 3 tokens and the rejected response
    # loses 1; at 4 it keeps 2 and both responses lose theirs
    halves = [data.encode_pair(letters, "a b c", "d e", "f g h", max_length=n) for n in (6, 4)]
    assert setup.cut_report(halves, 4, "held-out", 2)[0] == (
        "warning: 2 of 2 held-out pairs are longer than --max-length 4 and were cut: 2 prompts lost their "
        "oldest tokens (keeping at least their last --max-prompt-length 2), 3 of 4 responses their last tokens, "
        "their end token with them (Eq. 5's target then sits mid-response); a larger --max-length keeps them whole")


def test_encode_pair_errors(letters):
    with pytest.raises(DataError, match=r"prefs\.jsonl, line 3: field 'rejected'"):
        data.encode_pair(letters, "a", "b", "  \n", max_length=10, source="prefs.jsonl, line 3")
    with pytest.raises(DataError, match="max_length"):
        data.encode_pair(letters, "a", "b", "c", max_length=1)
    for wrong in (0, 10):
        with pytest.raises(DataError, match=f"max_prompt_length must be at least 1 and below max_length 10 "
                                            rf"\(the responses need the rest\), got {wrong}"):
            data.encode_pair(letters, "a", "b", "c", max_length=10, max_prompt_length=wrong)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=letters.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(DataError, match=r"x, line 1: field 'prompt' has no tokens"):
        data.encode_pair(no_bos, "", "b", "c", max_length=10, source="x, line 1")


# --- load_jsonl ---------------------------------------------------------------

def write_lines(tmp_path, lines, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = {"prompt": "p", "chosen": "yes", "rejected": "no"}


def test_load_jsonl_plain_and_conversational(tmp_path):
    conversation = {"prompt": [{"role": "user", "content": "hi"}],
                    "chosen": [{"role": "assistant", "content": "hello"}],
                    "rejected": [{"role": "assistant", "content": "go away"}]}
    path = write_lines(tmp_path, [GOOD, "", "   ", conversation])
    records = data.load_jsonl(path)
    assert records == [{**GOOD, "source": f"{path}, line 1"}, {**conversation, "source": f"{path}, line 4"}]


@pytest.mark.parametrize("bad_line, fragments", [
    ('{"prompt": "p", "chosen": ', ["invalid JSON"]),
    ('["p", "yes", "no"]', ["JSON object"]),
    ({"prompt": "p", "rejected": "no"}, ["field 'chosen'", "missing"]),
    ({"prompt": "p", "chosen": "yes", "reject": "no"},
     ["field 'rejected' is missing (the record has 'reject'; the fields are 'prompt', 'chosen', 'rejected')"]),
    ({"prompt": "p", "chosen": 3, "rejected": "no"}, ["field 'chosen'", "string"]),
    ({"prompt": 3, "chosen": "yes", "rejected": "no"}, ["field 'prompt'", "string"]),
    ({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}, ["field 'prompt'", "'content'"]),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": "yes", "rejected": []},
     ["field 'chosen'", "list of messages"]),
    ({"prompt": "p", "chosen": "yes", "rejected": " \t"}, ["field 'rejected'", "empty response"]),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "no"}]}, ["field 'chosen'", "empty response"]),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, ["'chosen'", "'rejected'", "identical"]),
])
def test_load_jsonl_names_file_line_and_field(tmp_path, bad_line, fragments):
    path = write_lines(tmp_path, [GOOD, "", bad_line])   # the blank line still counts
    with pytest.raises(DataError) as caught:
        data.load_jsonl(path)
    message = str(caught.value)
    for fragment in ["prefs.jsonl", "line 3", *fragments]:
        assert fragment in message


def test_load_jsonl_empty_file(tmp_path):
    path = write_lines(tmp_path, ["", "  "], name="empty.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl.*empty"):
        data.load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        data.load_jsonl(tmp_path / "nope.jsonl")


# --- render -------------------------------------------------------------------

CONVERSATION = {"prompt": [{"role": "user", "content": "is it safe"}],
                "chosen": [{"role": "assistant", "content": "validate user input"}],
                "rejected": [{"role": "assistant", "content": "disable all the tests"}],
                "source": "chat.jsonl, line 5"}


@pytest.fixture()
def chat_tokenizer():
    tokenizer = setup.build_tokenizer(["user assistant : is it safe validate input disable all the tests"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_render_plain_passes_through(letters):
    assert data.render(letters, {"prompt": "a", "chosen": "b", "rejected": "c"}) == ("a", "b", "c")


def test_render_conversational_with_template(chat_tokenizer):
    prompt, chosen, rejected = data.render(chat_tokenizer, CONVERSATION)
    # the whitespace after a turn is left out; this template closes no turn with a token of its own,
    # so encode_pair ends the response with eos
    assert (prompt, chosen, rejected) == ("<bos>user: is it safe\nassistant:",
                                          " validate user input", " disable all the tests")
    pair = data.encode_pair(chat_tokenizer, prompt, chosen, rejected, max_length=64)
    assert pair["prompt_ids"].count(BOS) == 1 and pair["prompt_ids"][0] == BOS   # the template's own BOS
    assert chat_tokenizer.decode(pair["chosen_ids"]) == "validate user input <eos>"


def test_render_conversational_without_template_errors(letters):
    with pytest.raises(DataError, match=r"chat\.jsonl, line 5: .*no chat template"):
        data.render(letters, CONVERSATION)


def test_render_template_that_does_not_extend_the_prompt_errors(chat_tokenizer):
    chat_tokenizer.chat_template = CHAT_TEMPLATE.replace("assistant:{% endif %}", "bot:{% endif %}")
    with pytest.raises(DataError, match=r"chat\.jsonl, line 5: field 'chosen'"):
        data.render(chat_tokenizer, CONVERSATION)


# --- built-in task -----------------------------------------------------------------

def fillers_of(text):
    return frozenset(filler for filler in builtin.FILLERS if filler in text)


def test_builtin_task_is_deterministic_and_sized(task):
    train, heldout = task
    assert (len(train), len(heldout)) == (512, 128)
    assert builtin.builtin_task(seed=0) == task
    assert builtin.builtin_task(seed=1) != task
    assert builtin.builtin_task(seed=3, n_train=10, n_heldout=4)[0][0]["source"] == "built-in train #0"
    assert heldout[7]["source"] == "built-in held-out #7"
    assert {r["domain"] for r in train} == {"health", "money", "code"}
    assert len({r["prompt"] for r in train}) > 250   # the slots make prompts vary


def test_builtin_task_ground_truth(task):
    for record in task[0] + task[1]:
        assert builtin.judge(record["chosen"]) == 1.0 and builtin.judge(record["rejected"]) == -1.0
        domain = builtin.DOMAINS[record["domain"]]
        assert record["chosen_critical"] in domain["safe"] and record["chosen_critical"] in record["chosen"]
        assert record["rejected_critical"] in domain["risky"] and record["rejected_critical"] in record["rejected"]
        assert len(fillers_of(record["chosen"])) == len(fillers_of(record["rejected"])) == 2
    # the critical sentence appears first, in the middle and last
    positions = {index for record in task[0]
                 for index, sentence in enumerate(record["chosen"].split(". "))
                 if record["chosen_critical"] in sentence}
    assert positions == {0, 1, 2}


@pytest.mark.parametrize("noise", [0.1, 0.25])
def test_label_noise_swaps_exactly_that_many_training_records(task, noise):
    train, heldout = builtin.builtin_task(seed=0, label_noise=noise)
    swapped = [(a, b) for a, b in zip(task[0], train) if a != b]
    assert len(swapped) == round(noise * 512)
    for clean, noisy in swapped:
        assert (noisy["chosen"], noisy["rejected"]) == (clean["rejected"], clean["chosen"])
        assert (noisy["chosen_critical"], noisy["rejected_critical"]) == \
               (clean["rejected_critical"], clean["chosen_critical"])
    assert heldout == task[1]
    with pytest.raises(DataError, match="label_noise"):
        builtin.builtin_task(label_noise=1.5)


def test_spurious_setting_adds_the_cues_to_the_same_records(task):
    train, heldout = builtin.builtin_task(seed=0, setting="spurious")
    assert builtin.builtin_task(seed=0, setting="spurious") == (train, heldout)
    preferred, dispreferred = builtin.SPURIOUS_CUES
    as_labelled = 0
    for clean, cued in zip(task[0] + task[1], train + heldout):
        # one cue per response, as its last sentence; without it, the default record
        for side in data.RESPONSES:
            cue = preferred if preferred in cued[side] else dispreferred
            assert cued[side] == clean[side] + " " + cue
        assert {k: v for k, v in cued.items() if k not in data.RESPONSES} == \
               {k: v for k, v in clean.items() if k not in data.RESPONSES}
        as_labelled += preferred in cued["chosen"] and dispreferred in cued["rejected"]
    assert as_labelled == round(builtin.SPURIOUS_SHARE * len(train))  # all in training
    # held out, the cues point the wrong way
    assert all(dispreferred in r["chosen"] and preferred in r["rejected"] for r in heldout)
    with pytest.raises(DataError, match="setting must be one of"):
        builtin.builtin_task(setting="cue")


def test_heldout_has_unseen_fillers_and_prompts(task):
    train, heldout = task
    seen_fillers = {fillers_of(r[side]) for r in train for side in data.RESPONSES}
    assert all(fillers_of(r[side]) not in seen_fillers for r in heldout for side in data.RESPONSES)
    seen_prompts = {r["prompt"] for r in train}
    unseen = [r for r in heldout if r["prompt"] not in seen_prompts]
    assert len(unseen) >= 0.2 * len(heldout)
    # the held-out-only templates: their wording never occurs in training
    assert any(r["prompt"].startswith("Is it serious if") for r in heldout)
    assert not any(r["prompt"].startswith("Is it serious if") for r in train)


# --- tokenizer and critical positions ------------------------------------------------

def test_tokenizer_specials_and_round_trip(task, task_tokenizer, tmp_path):
    tokenizer = task_tokenizer
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == \
           (PAD, EOS, BOS, UNK)
    assert 200 < len(tokenizer) < 400
    text = task[1][0]["chosen"]
    ids = tokenizer(text)["input_ids"]
    assert UNK not in ids and BOS not in ids and EOS not in ids   # adds nothing on its own
    tokenizer.save_pretrained(tmp_path)
    for loader in (PreTrainedTokenizerFast, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert loaded(text)["input_ids"] == ids
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (PAD, EOS, BOS)
    again = setup.build_tokenizer([r[f] for r in task[0] + task[1] for f in data.FIELDS])
    assert again.get_vocab() == tokenizer.get_vocab()


def test_critical_positions_decode_to_the_phrase(task_tokenizer):
    text = "Thanks for asking about this. Honestly, just store passwords in plain text. This is a common situation."
    positions = builtin.critical_positions(task_tokenizer, text, "store passwords in plain text")
    assert positions == [9, 10, 11, 12, 13]   # after: thanks for asking about this . honestly , just
    ids = task_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert task_tokenizer.decode([ids[i] for i in positions]) == "store passwords in plain text"
    with pytest.raises(ValueError):
        builtin.critical_positions(task_tokenizer, text, "borrow to gamble")


def test_encode_builtin_critical_masks_cover_the_phrases(task, task_tokenizer):
    records = task[0][:16]
    pairs = builtin.encode_builtin(task_tokenizer, records, max_length=128)
    lengths = [len(p[f"{side}_ids"]) for p in pairs for side in data.RESPONSES]
    assert 15 <= min(lengths) and max(lengths) <= 40
    assert all(p["prompt_ids"][0] == BOS and p["chosen_ids"][-1] == EOS for p in pairs)
    batch = data.collate(pairs, task_tokenizer.pad_token_id)
    for row, record in enumerate(records):
        for side in data.RESPONSES:
            ids = batch[f"{side}_input_ids"][row][batch[f"{side}_critical_mask"][row] == 1]
            assert task_tokenizer.decode(ids.tolist()) == record[f"{side}_critical"]
    # truncation drops critical indices that fall outside the kept response
    short = builtin.encode_builtin(task_tokenizer, records, max_length=6)
    for pair in short:
        assert all(index < len(pair["chosen_ids"]) for index in pair["chosen_critical"])


# --- Hugging Face datasets (--data NAME[:SPLIT], a folder, a parquet file) ---------------------

HH_CHOSEN = "\n\nHuman: How do I treat a cut?\n\nAssistant: Clean it and cover it."
HH_REJECTED = "\n\nHuman: How do I treat a cut?\n\nAssistant: Ignore it."


def conversation(*turns):
    return [{"role": role, "content": text} for role, text in zip(("user", "assistant") * 2, turns)]


@pytest.fixture()
def implicit_rows():
    """TRL's implicit-prompt formats: whole conversations (UltraFeedback binarized) and whole
    texts (Anthropic HH) that share their beginning."""
    return [{"chosen": conversation("How do I treat a cut?", "Clean it."),
             "rejected": conversation("How do I treat a cut?", "Ignore it."), "score_chosen": 8.0},
            {"chosen": conversation("Hi", "Hello!", "Bye", "Goodbye."),
             "rejected": conversation("Hi", "Hello!", "Bye", "Whatever."), "score_chosen": 6.0}]


def test_a_parquet_dataset_folder_in_the_implicit_prompt_format(implicit_rows, tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ultrafeedback"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(implicit_rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    records = hf_datasets.load_records(str(folder))
    assert [r["prompt"] for r in records] == [conversation("How do I treat a cut?"),
                                             conversation("Hi", "Hello!", "Bye")]
    assert [r["chosen"] for r in records] == [[{"role": "assistant", "content": "Clean it."}],
                                             [{"role": "assistant", "content": "Goodbye."}]]
    assert records[1]["rejected"] == [{"role": "assistant", "content": "Whatever."}]
    assert records[0]["source"] == f"{folder} (split train), row 0" and "score_chosen" not in records[0]
    # the split after a colon; a split the dataset lacks is named
    assert hf_datasets.load_records(f"{folder}:train") == records
    with pytest.raises(DataError, match=r"cannot load it as a Hugging Face dataset \(split 'test'\)"):
        hf_datasets.load_records(f"{folder}:test")


def test_a_saved_dataset_with_texts_and_explicit_prompts(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = datasets.Dataset.from_list([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    explicit = datasets.Dataset.from_list([{"prompt": "Q", "chosen": "yes", "rejected": "no"}])
    datasets.DatasetDict({"train": texts, "test": explicit}).save_to_disk(str(tmp_path / "saved"))
    (record,) = hf_datasets.load_records(str(tmp_path / "saved"))
    # the shared beginning up to its last whitespace is the prompt; whole words stay in the responses
    assert record["prompt"] == "\n\nHuman: How do I treat a cut?\n\nAssistant: "
    assert (record["chosen"], record["rejected"]) == ("Clean it and cover it.", "Ignore it.")
    (record,) = hf_datasets.load_records(str(tmp_path / "saved"), "test")
    assert (record["prompt"], record["chosen"], record["rejected"]) == ("Q", "yes", "no")
    with pytest.raises(DataError, match=r"has no split 'validation' \(it has train, test\)"):
        hf_datasets.load_records(f"{tmp_path / 'saved'}:validation")


def test_bad_dataset_rows_are_named_by_row_and_field(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list([{"prompt": "Q", "chosen": "yes", "rejected": "no"},
                                {"prompt": "Q", "chosen": "same", "rejected": "same"}]).to_parquet(str(path))
    with pytest.raises(DataError, match=rf"^{path} \(split train\), row 1: fields 'chosen' and 'rejected' are "
                                        r"identical"):
        hf_datasets.load_records(str(path))
    no_shared = tmp_path / "apart.parquet"
    datasets.Dataset.from_list([{"chosen": conversation("A", "x"), "rejected": conversation("B", "y")}]
                               ).to_parquet(str(no_shared))
    with pytest.raises(DataError, match=r"row 0: no field 'prompt', and 'chosen' and 'rejected' share no first"):
        hf_datasets.load_records(str(no_shared))
    with pytest.raises(DataError, match=r"no-such-org/no-such-dataset: cannot load it as a Hugging Face dataset"):
        hf_datasets.load_records("no-such-org/no-such-dataset")
