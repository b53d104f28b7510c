"""Checkpoints shaped like the ones users load from a hub, built here and saved to disk.

Tiny random models, but with what real checkpoints have and the built-in Llama has not: weights
saved in bfloat16, a byte-level BPE tokenizer whose chat template closes each turn with a special
token, several end ids in the generation config, tied or untied embeddings, sliding-window
attention, absolute positions and no pad token. Each goes through `train.py --model DIR --data
chat.jsonl` for a few steps with the triplet on.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PreTrainedTokenizerFast,
                          Qwen2Config)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from training import sampling  # noqa: E402
import train  # noqa: E402
from training import builtin_task as builtin  # noqa: E402
from training import setup  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
           "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
GPT2 = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# name: (its special tokens, the tokenizer's roles, chat template, the model's config class and settings, the
# dtype it is saved in, the token that ends an assistant turn, the generation config's end tokens)
KINDS = {
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
              CHATML, Qwen2Config, dict(SIZES, tie_word_embeddings=True), torch.bfloat16, "<|im_end|>",
              ["<|im_end|>", "<|endoftext|>"]),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), LLAMA3, LlamaConfig,
               dict(SIZES, tie_word_embeddings=False), torch.bfloat16, "<|eot_id|>", ["<|eot_id|>", "<|end_of_text|>"]),
    "mistral": (["<unk>", "<s>", "</s>"], dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), MISTRAL,
                MistralConfig, dict(SIZES, sliding_window=4, tie_word_embeddings=False), torch.bfloat16, "</s>",
                ["</s>"]),
    "gpt2": (["<|endoftext|>"], dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"),
             GPT2, GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=256), torch.float32, "<|endoftext|>",
             ["<|endoftext|>"]),
}


def chat_records(n=10):
    train_records, _ = builtin.builtin_task(seed=0, n_train=n, n_heldout=0)
    return [{field: [{"role": "user" if field == "prompt" else "assistant", "content": record[field]}]
             for field in data.FIELDS} for record in train_records]


def build_checkpoint(folder, kind):
    specials, roles, template, config_class, settings, dtype, _, end_tokens = KINDS[kind]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [message["content"] for record in chat_records() for field in data.FIELDS for message in record[field]]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=[ids(token) for token in end_tokens], **settings)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = [ids(token) for token in end_tokens]
    model.to(dtype).save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each kind's folder, and a conversational chat.jsonl (built once for the module)."""
    root = tmp_path_factory.mktemp("hub")
    folders = {}
    for kind in KINDS:
        folders[kind] = root / kind
        build_checkpoint(folders[kind], kind)
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(record) + "\n" for record in chat_records()))
    return folders, chat


# --max-length 128 holds every pair whole (the longest takes about 105 tokens): no response is cut
FLAGS = ["--steps", "3", "--batch-size", "2", "--lr", "1e-6", "--warmup-steps", "0", "--max-new-tokens", "4",
         "--max-length", "128", "--log-every", "1", "--seed", "0"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_hub_shaped_checkpoint_trains_in_float32_with_one_end_of_turn(kind, checkpoints, tmp_path, capsys):
    folders, chat = checkpoints
    folder, (_, _, _, _, _, saved_dtype, end_of_turn, _) = folders[kind], KINDS[kind]
    args = train.parse_args(["--model", str(folder), "--data", str(chat), *FLAGS])
    tokenizer = setup.load_tokenizer(args)
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    # Every response holds its end of turn once, as its last token, where Eq. 5 takes its target.
    for pair in setup.load_pairs(args, tokenizer)[0]:
        for side in data.RESPONSES:
            assert pair[f"{side}_ids"].count(end_id) == 1 and pair[f"{side}_ids"][-1] == end_id

    result = train.main(["--model", str(folder), "--data", str(chat), *FLAGS, "--output-dir", str(tmp_path)])
    first_line = capsys.readouterr().out.splitlines()[0]
    assert f"(saved in {str(saved_dtype)[6:]}, trained in float32)" in first_line
    assert result["history"][-1]["loss/triplet"] > 0  # the anchors were sampled and scored

    start = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert trained.dtype == torch.float32  # the policy is saved as it was trained
    trained = trained.state_dict()
    moved = sum(int((trained[name] != start[name]).sum()) for name in start)
    total = sum(tensor.numel() for tensor in start.values())
    # 3 AdamW steps at lr 1e-6: in float32 almost every weight moves (all but embedding rows of tokens
    # no batch held, in an untied model); stored in bfloat16, almost every update would round away.
    assert moved / total > 0.75, moved / total
    if saved_dtype == torch.bfloat16:
        kept = sum(int((trained[name].to(saved_dtype) == start[name].to(saved_dtype)).sum()) for name in start)
        assert kept / total > 0.9, kept / total


def test_a_local_parquet_dataset_in_the_implicit_prompt_format_trains_like_its_jsonl(checkpoints, tmp_path):
    # UltraFeedback binarized's shape: chosen and rejected are whole conversations sharing the
    # user's turn, in a dataset folder of parquet files (a hub name goes through the same
    # datasets.load_dataset call). The pairs are the JSONL file's, and so is the run.
    datasets = pytest.importorskip("datasets")
    folders, chat = checkpoints
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chat_records()]
    (tmp_path / "uf" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "uf" / "data" / "train-00000-of-00001.parquet"))
    runs = {}
    for name, source in (("dataset", tmp_path / "uf"), ("jsonl", chat)):
        runs[name] = train.main(["--model", str(folders["qwen2"]), "--data", str(source), *FLAGS,
                                 "--output-dir", str(tmp_path / name)])
    assert runs["dataset"]["history"] == runs["jsonl"]["history"]
    assert runs["dataset"]["after"] == runs["jsonl"]["after"]


def biased(model, token_id):
    """`model` with `token_id` by far the likeliest next token everywhere."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = 100.0
    model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: output + bias)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_anchors_stop_at_either_end_id(kind, method, checkpoints):
    folders, _ = checkpoints
    tokenizer = setup.load_tokenizer(train.parse_args(["--model", str(folders[kind])]))
    prompt_ids, prompt_mask = torch.tensor([[5, 6, 7], [tokenizer.pad_token_id, 8, 9]]), torch.tensor([[1, 1, 1],
                                                                                                       [0, 1, 1]])
    for end_token in KINDS[kind][7]:  # the tokenizer's eos, then the generation config's other end id
        end_id = tokenizer.convert_tokens_to_ids(end_token)
        model = biased(AutoModelForCausalLM.from_pretrained(folders[kind], dtype=torch.float32).eval(), end_id)
        ids, _, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, max_new_tokens=6,
                                                method=method)
        # each response is that one token (the dynamic way pads after it, the static one cuts there)
        assert ids[:, 3].tolist() == [end_id, end_id] and response_mask[:, 3:].sum(-1).tolist() == [1, 1]


@pytest.mark.filterwarnings("error")  # a fallback to the dynamic way would warn: it must not happen here
@pytest.mark.parametrize("kind", ["qwen2", "llama3", "gpt2"])
def test_static_greedy_tokens_equal_the_dynamic_ones_on_hub_shaped_models(kind, checkpoints):
    folders, _ = checkpoints
    tokenizer = setup.load_tokenizer(train.parse_args(["--model", str(folders[kind])]))
    model = AutoModelForCausalLM.from_pretrained(folders[kind], dtype=torch.float32).eval()
    prompt_ids = torch.tensor([[5, 6, 7, 8], [tokenizer.pad_token_id, tokenizer.pad_token_id, 9, 10]])
    prompt_mask = (torch.arange(4) >= torch.tensor([[0], [2]])).long()
    dynamic, static = (sampling.sample(model, prompt_ids, prompt_mask, tokenizer, max_new_tokens=8, temperature=0,
                                       method=method) for method in ("dynamic", "static"))
    assert dynamic[2].sum() > 8  # both rows decoded several tokens
    for got, expected in zip(static, dynamic):
        assert torch.equal(got, expected)


def test_sliding_window_model_is_sampled_the_dynamic_way(checkpoints, tmp_path):
    folders, chat = checkpoints
    model = AutoModelForCausalLM.from_pretrained(folders["mistral"], dtype=torch.float32).eval()
    tokenizer = setup.load_tokenizer(train.parse_args(["--model", str(folders["mistral"])]))
    prompt_ids, prompt_mask = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.ones(1, 6, dtype=torch.long)
    # auto takes the dynamic way, on a GPU too; the static ones refuse, naming the reason
    assert sampling.choose_method(model, "auto", cuda=True) == "dynamic"
    for method in ("static", "graph"):
        with pytest.raises(sampling.SamplerError, match=r"sliding-window attention \(window 4\).*--sampler dynamic"):
            sampling.sample(model, prompt_ids, prompt_mask, tokenizer, method=method)
    # train.py stops before anything is written, with the message and no traceback
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(folders["mistral"]), "--data",
                             str(chat), *FLAGS, "--sampler", "static", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the static sampler cannot run this model: it has sliding-window attention (window 4); "
        "use the dynamic sampler (--sampler dynamic, or auto)")
    assert not (tmp_path / "run").exists()


def test_autocast_is_off_after_a_training_step(checkpoints):
    # The anchors' forwards and the reference's each enter the autocast once; entered twice, nested,
    # one torch.autocast object stays on after the outer exit.
    folders, chat = checkpoints
    args = train.parse_args(["--model", str(folders["qwen2"]), "--data", str(chat), *FLAGS])
    tokenizer = setup.load_tokenizer(args)
    policy = setup.build_model(args, torch.device("cpu"), tokenizer)
    batch = data.collate(setup.load_pairs(args, tokenizer)[0][:2], tokenizer.pad_token_id)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    ref = copy.deepcopy(policy).requires_grad_(False)
    seen = []  # the dtype of every policy forward's logits in the step: bfloat16 under the autocast
    policy.get_output_embeddings().register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    loss, metrics = train.tidpo_step(policy, ref, batch, tokenizer, args, torch.device("cpu"), autocast)
    assert metrics["loss/triplet"] > 0  # the anchors were scored
    assert not torch.is_autocast_enabled("cpu")
    assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert len(seen) >= 3 and set(seen) == {torch.bfloat16}  # anchors sampled and scored, chosen and rejected
