"""Preference data to tensors: records, checks, rendering, tokenizing and batching.

A preference record pairs one prompt with a preferred ("chosen") and a dispreferred ("rejected")
response. Two formats are accepted, the same ones TRL users already have:

    plain:          {"prompt": "...", "chosen": "...", "rejected": "..."}
    conversational: {"prompt": [{"role": "user", "content": "..."}],
                     "chosen": [{"role": "assistant", "content": "..."}],
                     "rejected": [{"role": "assistant", "content": "..."}]}

The pipeline is  load_jsonl -> render -> encode_pair -> collate (or batches) -> stack_pair.
Hugging Face datasets arrive as the same records (training/hf_datasets.py), and the built-in task
makes its own (training/builtin_task.py).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

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
            message = f"invalid JSON ({error.msg} at column {error.colno})"
            raise DataError(f"{where}: {message}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got a {_json_type(record)}")
        check_record(record, where)
        records.append({**record, "source": where})
    if not records:
        raise DataError(f"{name}: the file is empty (no records)")
    return records


def check_record(record, where):
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
            wanted = ("a string or a list of messages" if field == "prompt"
                      else "a string, like the prompt")
            raise DataError(f"{where}: field '{field}' must be {wanted}, got a {_json_type(value)}")
    if conversational and not record["prompt"]:
        raise DataError(f"{where}: field 'prompt' has no messages")
    for field in RESPONSES:
        if not _text_of(record[field]).strip():
            raise DataError(f"{where}: field '{field}' is an empty response")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical, so there is no "
                        "preference")


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
        raise DataError(f"{source}: the record is conversational but the tokenizer has no chat "
                        "template (set tokenizer.chat_template or use plain-text records)")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    def response_text(field):
        # Templates render whole conversations, so the response is what the full
        # conversation adds after the prompt. This only works if the prompt's
        # rendering (with its assistant header) is a prefix of the full one.
        full = tokenizer.apply_chat_template(prompt + record[field], tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"{source}: field '{field}': the chat template renders prompt + "
                            "response so that it does not start with the rendered prompt; cannot "
                            "split them")
        return full[len(prompt_text):].rstrip()

    return prompt_text, response_text("chosen"), response_text("rejected")


def encode_pair(tokenizer, prompt_text, chosen_text, rejected_text, max_length, source="",
                max_prompt_length=None) -> dict:
    """Tokenize one pair into {"prompt_ids", "chosen_ids", "rejected_ids"} (lists of ints).

    Response ids exclude the prompt and end with eos, so the policy also learns
    where a good answer stops, unless they already end with a token that ends a
    turn (end_of_turn_ids: a chat template's own, such as "<|im_end|>"), which
    would then be there twice. prompt + the longer response fit in max_length;
    a longer pair's prompt keeps at least its last max_prompt_length tokens
    (None: max_length // 2).
    """
    where = source or "record"
    if max_length < 2:
        raise DataError("max_length must be at least 2 (one prompt and one response token), "
                        f"got {max_length}")
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 1 <= max_prompt_length < max_length:
        raise DataError(f"max_prompt_length must be at least 1 and below max_length {max_length} "
                        f"(the responses need the rest), got {max_prompt_length}")
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
    # losing its oldest tokens, but it keeps its last max_prompt_length (TRL's
    # and the DPO reference code's max_prompt_length): a prompt cut to nothing
    # says nothing about what the responses answer. The responses are then cut
    # from the right to what remains. Both share the same truncated prompt, so
    # their log-probabilities stay comparable.
    longest = max(len(ids) for ids in responses.values())
    kept = prompt_ids[-max(max_prompt_length, max_length - longest):]
    room = max_length - len(kept)
    return {"prompt_ids": kept,
            "chosen_ids": responses["chosen"][:room],
            "rejected_ids": responses["rejected"][:room],
            # tokens cut from the prompt, the chosen and the rejected response (cut_report)
            "cut": [len(prompt_ids) - len(kept),
                    *(max(0, len(responses[field]) - room) for field in RESPONSES)]}


def end_of_turn_ids(tokenizer) -> set[int]:
    """The ids a response may already end with: eos and the tokenizer's other special tokens
    (a chat template's end of turn: ChatML's <|im_end|>, Llama 3's <|eot_id|>), except those that
    never end a turn (bos, unk, and pad where it is not eos)."""
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    never = ({tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id}
             - {tokenizer.eos_token_id})
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
    return (_stack_sides(batch, "input_ids", length, pad_id),
            _stack_sides(batch, "attention_mask", length),
            _stack_sides(batch, "response_mask", length))


def stack_critical(batch, length) -> torch.Tensor:
    """[2B, length] the chosen, then the rejected rows' critical masks, padded like stack_pair's."""
    return _stack_sides(batch, "critical_mask", length)


def _stack_sides(batch, name, length, fill=0):
    # batch["chosen_<name>"] over batch["rejected_<name>"], each right-padded with `fill`
    sides = [batch[f"{side}_{name}"] for side in RESPONSES]
    return torch.cat([F.pad(x, (0, length - x.shape[1]), value=fill) for x in sides])


def batches(pairs, batch_size, pad_id, generator=None, skip=0):
    """Collated batches over encoded `pairs`, shuffled by `generator` when one is given.

    The first `skip` batches of that order are left out, so that a resumed run continues its epoch.
    """
    order = (torch.randperm(len(pairs), generator=generator).tolist() if generator
             else list(range(len(pairs))))
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
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.min_pairs = min_pairs
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
        self.stream = batches(self.pairs, self.batch_size, self.pad_id, self.generator,
                              skip=self.taken)
