"""--data and --eval-data: a JSONL file, or a Hugging Face dataset in one of TRL's formats.

A dataset is a hub name, a local folder (parquet files, or save_to_disk's) or a .parquet, .arrow or
.csv file, with an optional split after a colon. Reading one needs the `datasets` package, which
is imported only then; JSONL files need nothing beyond data.py.
"""

import os

from data import FIELDS, DataError, check_record, load_jsonl

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
        check_record(record, where)
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
    return row  # check_record names what is missing
