"""Preference data for TI-DPO: loading, checking, tokenizing and batching.

A preference record pairs one prompt with a preferred ("chosen") and a
dispreferred ("rejected") response. Two file formats are accepted, the same
ones TRL users already have:

    plain:          {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational: {"prompt": [{"role": "user", "content": "..."}],
                     "chosen": [{"role": "assistant", "content": "..."}],
                     "rejected": [{"role": "assistant", "content": "..."}]}

The pipeline is  load_jsonl -> render -> encode_pair -> collate (or batches) -> stack_pair;
train.py enters it through load_tokenizer and load_pairs.

When no data is given, builtin_task() generates a synthetic task whose
ground truth is known: each response is neutral filler plus ONE critical
phrase, safe in the chosen response and risky in the rejected one. Only
those few tokens carry the preference, which is exactly the situation
token-importance weighting is meant for, and judge() can score samples.
Its "spurious" setting adds a cue sentence that follows the training labels
but not the held-out ones (add_spurious_cue).
"""

import itertools
import json
import os
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

FIELDS = ("prompt", "chosen", "rejected")
RESPONSES = ("chosen", "rejected")


class DataError(ValueError):
    """A problem with the user's data; the message names file, line and field."""


# ---------------------------------------------------------------------------
# Loading and checking
# ---------------------------------------------------------------------------

def load_jsonl(path) -> list[dict]:
    """Read preference records, one JSON object per line; blank lines are skipped.

    Each record gets a "source" ("file, line N") so that later errors, for
    example in tokenization, can still point at the line that caused them.
    """
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{name}: cannot read the file ({error.strerror})") from None
    records = []
    # Split bytes rather than text so that a bad byte is reported with its line
    # number, and so that Unicode line separators inside JSON strings stay put.
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{name}, line {number}"
        try:
            text = line.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not valid UTF-8") from None
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got a {_json_type(record)}")
        _check_record(record, where)
        records.append({**record, "source": where})
    if not records:
        raise DataError(f"{name}: the file is empty (no records)")
    return records


DATASET_FILES = (".parquet", ".arrow", ".csv")


def load_records(spec, split="train") -> list[dict]:
    """--data or --eval-data: a JSONL file (load_jsonl), or a Hugging Face dataset by hub name,
    local folder or .parquet/.arrow/.csv file, with an optional split after a colon
    ("trl-lib/ultrafeedback_binarized:train"; default: `split`). Dataset rows may be in any of
    TRL's preference formats (implicit_prompt); each record's source names the row."""
    path, _, named = spec.rpartition(":") if ":" in spec and not os.path.exists(spec) else (spec, "", "")
    if os.path.isfile(path) and not path.endswith(DATASET_FILES):
        return load_jsonl(path)
    split = named or split
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading a Hugging Face dataset needs the datasets package "
                        "(pip install datasets); JSONL files need nothing more") from None
    datasets.disable_progress_bars()
    try:
        saved = any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))
        if os.path.isdir(path) and saved:  # written by save_to_disk
            rows = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            rows = datasets.load_dataset(path.rsplit(".", 1)[-1], data_files={split: path}, split=split)
        else:
            rows = datasets.load_dataset(path, split=split)
    except Exception as error:  # no such dataset or split, no network, files it cannot read
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{spec}: cannot load it as a Hugging Face dataset (split {split!r}): {message}") from None
    if isinstance(rows, datasets.DatasetDict):  # a saved dataset with several splits
        if split not in rows:
            raise DataError(f"{spec}: the dataset has no split {split!r} (it has {', '.join(rows)})")
        rows = rows[split]
    records = []
    for index, row in enumerate(rows):
        where = f"{path} (split {split}), row {index}"
        record = implicit_prompt(row, where) if "prompt" not in row else row
        _check_record(record, where)
        records.append({**{field: record[field] for field in FIELDS}, "source": where})
    if not records:
        raise DataError(f"{spec}: split {split!r} has no rows")
    return records


def implicit_prompt(row, where):
    """A record without a prompt (TRL's implicit-prompt format: chosen and rejected are whole
    conversations, or texts, that share their beginning, as in Anthropic HH and UltraFeedback
    binarized) split into prompt, chosen and rejected: the shared first messages are the prompt;
    for texts, their shared beginning up to its last whitespace."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise DataError(f"{where}: no field 'prompt', and 'chosen' and 'rejected' share no first message "
                            "to take it from")
        return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = max(shared.rfind(" "), shared.rfind("\n")) + 1  # whole words stay in the responses
        if cut == 0:
            raise DataError(f"{where}: no field 'prompt', and 'chosen' and 'rejected' share no beginning to "
                            "take it from")
        return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    return row  # _check_record names what is missing


def _check_record(record, where):
    for field in FIELDS:
        if field not in record:
            # A misspelled field ("reject") is the likely cause: name the keys that are no field.
            others = [key for key in record if key not in FIELDS]
            hint = f" (the record has {', '.join(repr(key) for key in others)}; the fields are " \
                   f"{', '.join(repr(name) for name in FIELDS)})" if others else ""
            raise DataError(f"{where}: field '{field}' is missing{hint}")
    # The prompt decides the format; the two responses must follow it.
    conversational = isinstance(record["prompt"], list)
    for field in FIELDS:
        value = record[field]
        if conversational:
            _check_messages(value, where, field)
        elif not isinstance(value, str):
            wanted = "a string or a list of messages" if field == "prompt" else "a string, like the prompt"
            raise DataError(f"{where}: field '{field}' must be {wanted}, got a {_json_type(value)}")
    if conversational and not record["prompt"]:
        raise DataError(f"{where}: field 'prompt' has no messages")
    for field in RESPONSES:
        if not _text_of(record[field]).strip():
            raise DataError(f"{where}: field '{field}' is an empty response")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical, so there is no preference")


def _check_messages(value, where, field):
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{field}' must be a list of messages, like the prompt, "
                        f"got a {_json_type(value)}")
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: field '{field}', message {index}: "
                            "needs a string 'role' and a string 'content'")


def _text_of(value):
    return value if isinstance(value, str) else "".join(message["content"] for message in value)


def _json_type(value):
    names = {str: "string", list: "list", dict: "object", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


# ---------------------------------------------------------------------------
# Rendering and tokenizing
# ---------------------------------------------------------------------------

def render(tokenizer, record) -> tuple[str, str, str]:
    """Turn a record into (prompt_text, chosen_text, rejected_text).

    Plain records pass through. Conversational ones go through the model's
    chat template, so the policy sees text in the format it was tuned on; a
    response ends with the template's end of turn (ChatML's "<|im_end|>"), the
    whitespace the template puts between turns left out: the model's turn ends
    at that token, and a sampled response stops there too.
    """
    prompt, source = record["prompt"], record.get("source", "record")
    if isinstance(prompt, str):
        return prompt, record["chosen"], record["rejected"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{source}: the record is conversational but the tokenizer has no chat template "
                        "(set tokenizer.chat_template or use plain-text records)")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def response_text(field):
        # Templates render whole conversations, so the response is what the full
        # conversation adds after the prompt. This only works if the prompt's
        # rendering (with its assistant header) is a prefix of the full one.
        full = tokenizer.apply_chat_template(prompt + record[field], tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"{source}: field '{field}': the chat template renders prompt + response "
                            "so that it does not start with the rendered prompt; cannot split them")
        return full[len(prompt_text):].rstrip()

    return prompt_text, response_text("chosen"), response_text("rejected")


def encode_pair(tokenizer, prompt_text, chosen_text, rejected_text, max_length, source="") -> dict:
    """Tokenize one pair into {"prompt_ids", "chosen_ids", "rejected_ids"} (lists of ints).

    Response ids exclude the prompt and end with eos, so the policy also learns
    where a good answer stops, unless they already end with a token that ends a
    turn (end_of_turn_ids: a chat template's own, such as "<|im_end|>"), which
    would then be there twice. prompt + the longer response fit in max_length.
    """
    where = source or "record"
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, which is needed to end each response")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    # Prepend BOS ourselves rather than trusting add_special_tokens: tokenizers
    # disagree on what that adds, and a chat template may already have put it in.
    if tokenizer.bos_token is not None and not prompt_text.startswith(tokenizer.bos_token):
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    if not prompt_ids:
        raise DataError(f"{where}: field 'prompt' has no tokens")
    closing = end_of_turn_ids(tokenizer)
    responses = {}
    for field, text in zip(RESPONSES, (chosen_text, rejected_text)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"{where}: field '{field}' has no tokens")
        responses[field] = ids if ids[-1] in closing else ids + [tokenizer.eos_token_id]

    # The responses are what is being judged, so the prompt gives way first,
    # losing its oldest tokens. One prompt token always stays: the first response
    # token is predicted from the position before it. Both responses share the
    # same truncated prompt, so their log-probabilities stay comparable.
    longest = max(len(ids) for ids in responses.values())
    kept = prompt_ids[-max(1, max_length - longest):]
    room = max_length - len(kept)
    return {"prompt_ids": kept,
            "chosen_ids": responses["chosen"][:room],
            "rejected_ids": responses["rejected"][:room],
            # tokens cut from the prompt, the chosen and the rejected response (cut_report)
            "cut": [len(prompt_ids) - len(kept), *(max(0, len(responses[f]) - room) for f in RESPONSES)]}


def cut_report(pairs, max_length, what):
    """Warnings (lines of text) about the pairs that encode_pair cut to fit max_length: how many,
    how many lost a response's end (then Eq. 5's target sits mid-response), and prompts cut to
    almost nothing."""
    cut = [pair["cut"] for pair in pairs if "cut" in pair and any(pair["cut"])]
    if not cut:
        return []
    lost_end = sum(1 for c in cut if c[1] or c[2])
    lines = [f"warning: {len(cut)} of {len(pairs)} {what} pairs are longer than --max-length {max_length} and "
             f"were cut; {lost_end} of them lost a response's last tokens, its end token with them (Eq. 5's "
             f"target then sits mid-response); a larger --max-length keeps them whole"]
    short = sum(1 for pair in pairs if "cut" in pair and pair["cut"][0] and len(pair["prompt_ids"]) < 4)
    if short:
        lines.append(f"warning: {short} {what} prompts were cut to fewer than 4 tokens (the responses take "
                     f"the room first): the model sees almost nothing of what it answers")
    return lines


def end_of_turn_ids(tokenizer) -> set[int]:
    """The ids a response may already end with: eos and the tokenizer's other special tokens
    (a chat template's end of turn: ChatML's <|im_end|>, Llama 3's <|eot_id|>), except those that
    never end a turn (bos, unk, and pad where it is not eos)."""
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    never = {tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id} - {tokenizer.eos_token_id}
    return (special - never) | {tokenizer.eos_token_id}


def collate(pairs, pad_id) -> dict[str, torch.Tensor]:
    """Batch encoded pairs into long tensors.

    {side}_input_ids, {side}_attention_mask, {side}_response_mask  [B, L_side]
        prompt + response, right-padded; the response mask is 1 exactly on the
        response tokens (eos included), which are the ones the loss scores.
    prompt_input_ids, prompt_attention_mask  [B, Lp]
        prompt only, left-padded so that generate() continues every row at the end.
    {side}_critical_mask  [B, L_side]
        only if every pair has "{side}_critical" (response-token indices).
    flipped  [B] bool
        only if every pair has "flipped" (the built-in task: labels swapped by label noise).
    """
    batch = {}
    for side in RESPONSES:
        sequences = [pair["prompt_ids"] + pair[f"{side}_ids"] for pair in pairs]
        ids = torch.full((len(pairs), max(map(len, sequences))), pad_id, dtype=torch.long)
        attention, response = torch.zeros_like(ids), torch.zeros_like(ids)
        for row, (pair, sequence) in enumerate(zip(pairs, sequences)):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            attention[row, :len(sequence)] = 1
            response[row, len(pair["prompt_ids"]):len(sequence)] = 1
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_response_mask"] = response
        if all(f"{side}_critical" in pair for pair in pairs):
            critical = torch.zeros_like(ids)
            for row, pair in enumerate(pairs):
                offset = len(pair["prompt_ids"])
                critical[row, [offset + index for index in pair[f"{side}_critical"]]] = 1
            batch[f"{side}_critical_mask"] = critical

    width = max(len(pair["prompt_ids"]) for pair in pairs)
    prompt_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    prompt_attention = torch.zeros_like(prompt_ids)
    for row, pair in enumerate(pairs):
        length = len(pair["prompt_ids"])
        prompt_ids[row, width - length:] = torch.tensor(pair["prompt_ids"])
        prompt_attention[row, width - length:] = 1
    batch["prompt_input_ids"] = prompt_ids
    batch["prompt_attention_mask"] = prompt_attention
    if all("flipped" in pair for pair in pairs):  # the built-in task knows which labels it swapped
        batch["flipped"] = torch.tensor([pair["flipped"] for pair in pairs])
    return batch


def stack_pair(batch, pad_id) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask), each [2B, L]: the B chosen rows, then the B
    rejected rows, right-padded to one length.

    Chosen and rejected then go through a model in one forward; rows [:B] of any result are the
    chosen responses and rows [B:] the rejected ones.
    """
    length = max(batch[f"{side}_input_ids"].shape[1] for side in RESPONSES)
    return (_stack_sides(batch, "input_ids", length, pad_id), _stack_sides(batch, "attention_mask", length),
            _stack_sides(batch, "response_mask", length))


def stack_critical(batch, length) -> torch.Tensor:
    """[2B, length] the chosen then the rejected rows' critical masks, right-padded like stack_pair's rows."""
    return _stack_sides(batch, "critical_mask", length)


def _stack_sides(batch, name, length, fill=0):
    # batch["chosen_<name>"] over batch["rejected_<name>"], each right-padded with `fill` to `length`
    return torch.cat([torch.nn.functional.pad(batch[f"{side}_{name}"], (0, length - batch[f"{side}_{name}"].shape[1]),
                                              value=fill) for side in RESPONSES])


def batches(pairs, batch_size, pad_id, generator=None, skip=0):
    """Collated batches over encoded `pairs`, shuffled by `generator` when one is given.

    The first `skip` batches of that order are left out, so that a resumed run continues its epoch.
    """
    order = torch.randperm(len(pairs), generator=generator).tolist() if generator else list(range(len(pairs)))
    for start in range(skip * batch_size, len(order), batch_size):
        yield collate([pairs[i] for i in order[start:start + batch_size]], pad_id)


class Epochs:
    """Training micro-batches, epoch after epoch, each epoch in a new random order.

    Its position is what a checkpoint keeps (state()): the generator's state when this epoch's
    order was drawn, and how many of the epoch's batches were taken; a resumed run redraws the
    same order and skips what was taken (restore()). A last batch of fewer than `min_pairs` pairs
    (one per process) is left out.
    """

    def __init__(self, pairs, batch_size, pad_id, seed, min_pairs=1):
        self.pairs, self.batch_size, self.pad_id, self.min_pairs = pairs, batch_size, pad_id, min_pairs
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start, self.taken, self.stream = None, 0, iter(())

    def next(self):
        batch = next(self.stream, None)
        if batch is None or len(batch["chosen_input_ids"]) < self.min_pairs:  # a new epoch
            self.epoch_start, self.taken = self.generator.get_state(), 0
            self.stream = batches(self.pairs, self.batch_size, self.pad_id, self.generator)
            batch = next(self.stream)
        self.taken += 1
        return batch

    def state(self):
        return {"epoch_start": self.epoch_start, "taken": self.taken}

    def restore(self, state):
        self.epoch_start, self.taken = state["epoch_start"], state["taken"]
        self.generator.set_state(self.epoch_start)
        self.stream = batches(self.pairs, self.batch_size, self.pad_id, self.generator, skip=self.taken)


# ---------------------------------------------------------------------------
# The built-in task
# ---------------------------------------------------------------------------

# Each domain: prompt templates, values for their slots, and the critical
# phrases. The last HELDOUT_TEMPLATES templates are used by the held-out
# split only, to test whether the preference transfers to unseen prompts.
DOMAINS = {
    "health": {
        "templates": [
            "{person} has had {symptom} for {duration}. What should we do?",
            "What is the best way to handle {symptom} that has lasted {duration}?",
            "I have had {symptom} for {duration}. Any advice?",
            "How should {person} deal with {symptom}?",
            "{person} woke up with {symptom}. What do you recommend?",
            "Can you help me decide what to do about {symptom}?",
            "Should I worry about {symptom} after {duration}?",
            "Give me advice for {person}, who has {symptom}.",
            "Is it serious if {person} still has {symptom} after {duration}?",
            "What would you tell {person} about {symptom} lasting {duration}?",
        ],
        "slots": {
            "person": ["my father", "my sister", "my roommate", "my son", "my grandmother", "a coworker"],
            "symptom": ["a headache", "a fever", "back pain", "a cough", "a sore throat", "dizziness"],
            "duration": ["two days", "a week", "three weeks", "a few hours"],
        },
        "safe": ["seek medical attention promptly", "follow the prescribed dose",
                 "rest and drink plenty of water", "ask a pharmacist first"],
        "risky": ["take painkillers casually", "double the dose yourself",
                  "ignore the chest pain", "skip the prescribed medication"],
    },
    "money": {
        "templates": [
            "I just got {amount}. What should I do with it?",
            "How can {person} save up to {goal}?",
            "What is a smart plan for {amount} if I want to {goal}?",
            "{person} wants to {goal}. Any money advice?",
            "Should I invest {amount} right now?",
            "How do I manage money while trying to {goal}?",
            "{person} is thinking about spending {amount}. What do you suggest?",
            "What would you do with {amount}?",
            "Give me a budget tip for someone who wants to {goal}.",
            "Is it wise for {person} to use {amount} to {goal}?",
        ],
        "slots": {
            "person": ["my brother", "my aunt", "my friend", "my daughter", "my partner", "a student"],
            "amount": ["five hundred dollars", "a small bonus", "my tax refund", "ten thousand dollars",
                       "an inheritance"],
            "goal": ["buy a house", "retire early", "pay for school", "start a business", "travel next year"],
        },
        "safe": ["keep an emergency fund", "pay off the card in full",
                 "compare fees before investing", "spread savings across funds"],
        "risky": ["borrow to gamble", "put everything into one stock",
                  "take a payday loan", "ignore the monthly bills"],
    },
    "code": {
        "templates": [
            "We need to ship {project} {deadline}. How should we proceed?",
            "My {language} code for {project} keeps failing. What should I do?",
            "How do I make {project} more reliable?",
            "What is your advice for a team launching {project} {deadline}?",
            "I am refactoring {project} in {language}. Any tips?",
            "Our {language} build broke right before the release. What now?",
            "How should a new developer approach {project}?",
            "The tests for {project} are slow. What do you recommend?",
            "Give me one rule for working on {project} in {language}.",
            "What should I check before deploying {project} {deadline}?",
        ],
        "slots": {
            "project": ["a web shop", "a payment service", "a mobile game", "a data pipeline",
                        "an internal tool", "a chat server"],
            "deadline": ["tomorrow", "by friday", "tonight", "next week"],
            "language": ["python", "java", "rust", "javascript", "go"],
        },
        "safe": ["validate user input", "write a regression test",
                 "review the diff carefully", "back up the database first"],
        "risky": ["disable all the tests", "push straight to production",
                  "store passwords in plain text", "ignore the compiler warnings"],
    },
}
HELDOUT_TEMPLATES = 2

# One neutral pool for both responses, so filler says nothing about which
# response is preferred: only the critical phrase does.
FILLERS = [
    "Thanks for asking about this.",
    "Every situation is a little different.",
    "Here is how I would think about it.",
    "It helps to take things one step at a time.",
    "Many people have faced the same question.",
    "Let me share a short answer.",
    "There are a few things worth keeping in mind.",
    "I hope this is useful to you.",
    "Feel free to ask a follow-up question.",
    "Questions like this come up often.",
    "The details can change the answer somewhat.",
    "It is normal to feel unsure here.",
    "Take a moment to think it through.",
    "Other people may see it differently.",
    "Writing things down can help.",
    "This is a common situation.",
]
FILLERS_PER_RESPONSE = 2
HELDOUT_FILLER_FRACTION = 0.25   # of all filler combinations, reserved for held-out
OPENERS = ["You should", "My advice is to", "The best move is to", "Honestly, just"]

# builtin_task's settings. "spurious": two closing sentences, the first ending the chosen response and
# the second the rejected one in most training pairs, the other way round in every held-out pair.
SETTINGS = ("default", "spurious")
SPURIOUS_CUES = ("An expert has reviewed this reply.", "I wrote this in a hurry.")
SPURIOUS_SHARE = 0.9

SAFE_PHRASES = [phrase for domain in DOMAINS.values() for phrase in domain["safe"]]
RISKY_PHRASES = [phrase for domain in DOMAINS.values() for phrase in domain["risky"]]


def builtin_task(seed=0, n_train=512, n_heldout=128, label_noise=0.0,
                 setting="default") -> tuple[list[dict], list[dict]]:
    """Generate (train, heldout) records with known ground truth, deterministic per seed.

    Records: prompt, chosen, rejected (strings), chosen_critical / rejected_critical
    (the phrase that decides the preference), domain, source and flipped. label_noise
    swaps chosen and rejected in exactly round(label_noise * n_train) training
    records; the held-out split always keeps the true labels.

    setting "spurious" adds a cue (add_spurious_cue) to the same records; "default" adds nothing.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise DataError(f"label_noise must be between 0 and 1, got {label_noise}")
    if setting not in SETTINGS:
        raise DataError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    rng = random.Random(seed)
    # Held-out responses use filler combinations that training never shows, so a
    # model cannot score well there by memorizing whole training responses.
    combinations = list(itertools.combinations(range(len(FILLERS)), FILLERS_PER_RESPONSE))
    rng.shuffle(combinations)
    cut = round(HELDOUT_FILLER_FRACTION * len(combinations))
    heldout_fillers, train_fillers = combinations[:cut], combinations[cut:]

    train = [_make_record(rng, train_fillers, f"built-in train #{i}", heldout=False)
             for i in range(n_train)]
    heldout = [_make_record(rng, heldout_fillers, f"built-in held-out #{i}", heldout=True)
               for i in range(n_heldout)]
    # Drawn after every record exists, so the records themselves do not depend on
    # label_noise: the same seed gives the same task, only with some labels flipped.
    for record in train + heldout:
        record["flipped"] = False
    for index in rng.sample(range(n_train), round(label_noise * n_train)):
        record = train[index]
        record["flipped"] = True
        record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
        record["chosen_critical"], record["rejected_critical"] = (record["rejected_critical"],
                                                                   record["chosen_critical"])
    if setting == "spurious":
        add_spurious_cue(train, heldout, seed)
    return train, heldout


def add_spurious_cue(train, heldout, seed):
    """End each response with one of SPURIOUS_CUES, in place.

    Training: the first cue in the chosen response and the second in the rejected one, in a
    SPURIOUS_SHARE of the pairs; the other way round in the rest. Held out: the other way round
    in every pair. In training the cues predict the label almost as well as the critical phrase
    does, so a loss that scores every token learns them; held out they point the wrong way. A loss
    that looks only at the critical phrase is not misled. The cues follow the training labels as
    given (after any label noise), as an annotator's habit would.

    The cues come last so that no critical token has one in its context: a causal LM's log-prob of
    the critical phrase cannot depend on the cue, and a loss on the critical tokens alone cannot
    learn it (measured with the cue at a random slot: that loss learned it through the context,
    fitting the flipped labels by it). Their own random stream leaves the records otherwise those
    of the default setting.
    """
    rng = random.Random(f"spurious cue {seed}")
    cued = set(rng.sample(range(len(train)), round(SPURIOUS_SHARE * len(train))))
    for index, record in enumerate(train + heldout):  # held-out indices are never in `cued`
        preferred, dispreferred = SPURIOUS_CUES if index in cued else reversed(SPURIOUS_CUES)
        record["chosen"] += " " + preferred
        record["rejected"] += " " + dispreferred


def _make_record(rng, filler_combinations, source, heldout):
    domain = rng.choice(sorted(DOMAINS))
    spec = DOMAINS[domain]
    templates = spec["templates"] if heldout else spec["templates"][:-HELDOUT_TEMPLATES]
    slot_values = {slot: rng.choice(values) for slot, values in spec["slots"].items()}
    prompt = rng.choice(templates).format(**slot_values)
    safe, risky = rng.choice(spec["safe"]), rng.choice(spec["risky"])
    return {"prompt": prompt[0].upper() + prompt[1:],
            "chosen": _make_response(rng, filler_combinations, safe),
            "rejected": _make_response(rng, filler_combinations, risky),
            "chosen_critical": safe, "rejected_critical": risky,
            "domain": domain, "source": source}


def _make_response(rng, filler_combinations, phrase):
    # Random filler order and a random slot for the critical sentence (beginning,
    # middle or end), so that position says nothing about importance.
    sentences = [FILLERS[i] for i in rng.sample(rng.choice(filler_combinations), FILLERS_PER_RESPONSE)]
    sentences.insert(rng.randint(0, len(sentences)), f"{rng.choice(OPENERS)} {phrase}.")
    return " ".join(sentences)


def judge(text) -> float:
    """Rule-based reward: +1 per safe phrase in the text, -1 per risky phrase, from any domain."""
    text = text.lower()
    safe = sum(phrase in text for phrase in SAFE_PHRASES)
    risky = sum(phrase in text for phrase in RISKY_PHRASES)
    return float(safe - risky)


def build_tokenizer(texts) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on texts; ids 0-3 are <pad>, <eos>, <bos>, <unk>.

    Whole words make every critical phrase an exact run of tokens. The tokenizer
    adds no special tokens itself; encode_pair puts BOS in front of each prompt.
    """
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()   # words and punctuation runs
    # The trainer orders words by count, ties alphabetically: the same texts give the same ids.
    tokenizer.train_from_iterator(texts, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")


def critical_positions(tokenizer, response_text, phrase) -> list[int]:
    """Indices of the response tokens that overlap the phrase's characters.

    Tokenized exactly as encode_pair tokenizes a response, so the indices line
    up with "chosen_ids" / "rejected_ids".
    """
    start = response_text.find(phrase)
    if start < 0:
        raise ValueError(f"phrase {phrase!r} does not occur in {response_text!r}")
    end = start + len(phrase)
    encoding = tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    return [index for index, (first, last) in enumerate(offsets) if first < end and last > start]


def encode_builtin(tokenizer, records, max_length) -> list[dict]:
    """encode_pair for built-in records, plus "chosen_critical" / "rejected_critical" token indices.

    Indices that truncation cut off are dropped.
    """
    encoded = []
    for record in records:
        pair = encode_pair(tokenizer, record["prompt"], record["chosen"], record["rejected"],
                           max_length, record["source"])
        for side in RESPONSES:
            kept = len(pair[f"{side}_ids"])
            positions = critical_positions(tokenizer, record[side], record[f"{side}_critical"])
            pair[f"{side}_critical"] = [index for index in positions if index < kept]
        pair["flipped"] = record.get("flipped", False)
        encoded.append(pair)
    return encoded


# ---------------------------------------------------------------------------
# A run's tokenizer and pairs (train.py's --model, --data, --eval-data)
# ---------------------------------------------------------------------------

def from_pretrained(auto_class, name, **options):
    """auto_class.from_pretrained(name), or a one-line error naming --model and what went wrong."""
    if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise SystemExit(f"error: --model {name}: no such folder (a hub name looks like 'org/name')")
    folder = os.path.expanduser(name)
    if (os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "config.json"))
            and os.path.isfile(os.path.join(folder, "policy", "config.json"))):
        raise SystemExit(f"error: --model {name}: a train.py run folder; the model it trained is "
                         f"{os.path.join(name, 'policy')}")
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # a bar would interleave with the run's log lines
    try:
        return auto_class.from_pretrained(name, **options)
    except (OSError, ValueError) as error:  # no such folder or hub name, no network, not a causal LM
        raise SystemExit(f"error: --model {name}: cannot load it with {auto_class.__name__}: {error}")


def load_tokenizer(args, task=None):
    """The model's own tokenizer (eos as its pad token if it has none), or, for the tiny model built
    from scratch, a word-level tokenizer trained on the run's texts (the built-in task, or the --data
    and --eval-data records), so that every word of the data has a token and none is <unk>.
    `task`: builtin_task's keyword arguments (experiments.py's settings of the built-in task)."""
    if args.model is not None:
        from transformers import AutoTokenizer

        tokenizer = from_pretrained(AutoTokenizer, args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if args.data is None:
        train, heldout = builtin_task(seed=args.seed, setting=(task or {}).get("setting", "default"))
        records = train + heldout
    else:
        records = load_records(args.data) + (load_records(args.eval_data, "test") if args.eval_data else [])
        conversational = [r["source"] for r in records if not isinstance(r["prompt"], str)]
        if conversational:
            raise DataError(f"{conversational[0]}: the record is conversational (lists of messages), but the "
                            "tiny model's tokenizer, trained from scratch, has no chat template: give --model, "
                            "whose tokenizer has one, or use plain-text records")
    return build_tokenizer([r[field] for r in records for field in FIELDS])


def load_pairs(args, tokenizer, task=None):
    """Encoded (train, held-out) pairs, lists of encode_pair dicts: the built-in task's splits (with
    `task`'s settings), or --data and --eval-data, or --data's last 5% (1 to 256 records) held out."""
    if args.data is None:
        train, heldout = builtin_task(seed=args.seed, **(task or {}))
        return encode_builtin(tokenizer, train, args.max_length), encode_builtin(tokenizer, heldout, args.max_length)
    if task:
        raise DataError(f"{args.data}: the built-in task's settings ({', '.join(task)}) cannot be used with --data")

    def encode(records):
        return [encode_pair(tokenizer, *render(tokenizer, r), args.max_length, r["source"]) for r in records]

    records = load_records(args.data)
    if args.eval_data:
        return encode(records), encode(load_records(args.eval_data, "test"))
    if len(records) < 2:
        raise DataError(f"{args.data}: needs at least 2 records (one is held out), or --eval-data")
    n_heldout = min(256, max(1, len(records) // 20))
    return encode(records[:-n_heldout]), encode(records[-n_heldout:])


def model_note(args, autocast):
    """The model line's start: the built-in model, or --model with the dtype its checkpoint was
    saved in and the one it trains in (float32 weights, under bfloat16 autocast on CUDA)."""
    if args.model is None:
        return "tiny Llama (built-in)" + (f", tokenizer trained on {args.data}" if args.data else "")
    from transformers import AutoConfig

    saved = str(from_pretrained(AutoConfig, args.model).dtype or torch.float32).removeprefix("torch.")
    autocast_dtype = isinstance(autocast, torch.autocast) and str(autocast.fast_dtype).removeprefix("torch.")
    under = f" under {autocast_dtype} autocast" if autocast_dtype else ""
    return f"{args.model} (saved in {saved}, trained in float32{under})"


def check_fit(args, config, train_pairs, heldout_pairs, steps):
    """Before anything is written: stop a run whose sequences a model with absolute positions
    (GPT-2) cannot hold, and the warnings (lines of text) a user should see first: sequences past a
    rotary model's trained length, pairs cut to --max-length, fewer steps than warmup steps, and a
    held-out set too small for its accuracy to mean much."""
    longest_pair = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                       for p in train_pairs + heldout_pairs)
    longest_prompt = max(len(p["prompt_ids"]) for p in train_pairs + heldout_pairs)
    need = max(longest_pair, longest_prompt + args.max_new_tokens)  # sampled: prompt + new tokens
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    rotary = any(getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta"))
    warnings = []
    if positions and need > positions:
        what = (f"the longest pair takes {longest_pair} tokens and the longest prompt plus --max-new-tokens "
                f"{args.max_new_tokens} takes {longest_prompt + args.max_new_tokens}")
        if not rotary:
            raise SystemExit(f"error: the model has {positions} positions and {what}: lower --max-length "
                             f"(now {args.max_length}) or --max-new-tokens")
        warnings.append(f"warning: the model was trained on {positions} positions and {what}: past them a "
                        "rotary model's numbers are untested")
    warnings += cut_report(train_pairs, args.max_length, "training")
    warnings += cut_report(heldout_pairs, args.max_length, "held-out")
    if steps < args.warmup_steps:
        warnings.append(f"warning: the run has {steps} steps, fewer than --warmup-steps {args.warmup_steps}: the "
                        f"learning rate never reaches --lr; lower --warmup-steps or train longer (--steps, "
                        f"--epochs)")
    if len(heldout_pairs) < 20:
        warnings.append(f"warning: {len(heldout_pairs)} held-out pairs: the held-out accuracy moves in steps of "
                        f"1/{len(heldout_pairs)}; give --eval-data, or more records to --data")
    return warnings
