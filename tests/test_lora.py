"""train.py --lora-r (training/lora.py): LoRA adapters with the reference as the same weights with
the adapters off.

A LoRA step against the same step of the plain model with the merged weights W + (alpha / R) B A
in float64 (the adapters' gradients by the chain rule from that model's weight gradients, the
reference a separate copy of the base); whole runs on the built-in task and on hub-shaped
checkpoints (saved merged model, adapter, resume); two processes under torchrun against one; the
memory formula's LoRA terms against the bytes a CPU step holds.

Run: python -m pytest -q tests/test_lora.py
"""

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

peft = pytest.importorskip("peft")
# peft 0.21's from_pretrained asks is_gradient_checkpointing, which transformers 5.2x deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import data  # noqa: E402
import tidpo  # noqa: E402
import train  # noqa: E402
from test_fsdp import assert_same_run, records  # noqa: E402
from test_real_models import build_checkpoint, chat_records  # noqa: E402
from training import lora, memory, sampling, setup  # noqa: E402

CPU = torch.device("cpu")
SCALE = lora.ALPHA_PER_RANK  # alpha / R


# ----------------------------------------------------------------------------- one step by hand


def step_inputs(*flags):
    args = train.parse_args(["--max-new-tokens", "3", "--temperature", "0", "--batch-size", "2", *flags])
    tokenizer = setup.load_tokenizer(args)
    batch = data.collate(setup.load_pairs(args, tokenizer)[0][:2], tokenizer.pad_token_id)
    return args, tokenizer, batch


def tiny_llama(tokenizer, tied=True):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def lora_policy(base, rank=4):
    """(policy, reference) with lora_B drawn away from 0, so that the policy is not the reference."""
    policy, ref = lora.wrap(copy.deepcopy(base), argparse.Namespace(lora_r=rank, model=None))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy, ref


def merged_by_hand(base, policy, dtype):
    """The plain model with W + SCALE B A in `dtype`, every weight trainable, and {its adapted
    Linear layer: (A, B)} in that dtype."""
    model = copy.deepcopy(base).to(dtype)
    adapters, named = {}, dict(policy.named_parameters())
    with torch.no_grad():
        for name, module in model.named_modules():
            key = f"base_model.model.{name}.lora_A.default.weight"
            if key in named:
                a, b = named[key].to(dtype), named[key.replace("lora_A", "lora_B")].to(dtype)
                module.weight += SCALE * b @ a
                adapters[name] = (module, a, b)
    assert len(adapters) == 7 * base.config.num_hidden_layers  # q, k, v, o, gate, up, down
    return model, adapters


@pytest.mark.parametrize("loss, checkpointing", [("tidpo", False), ("tidpo", True), ("dpo", True)])
def test_a_lora_step_is_the_plain_step_of_the_merged_weights(loss, checkpointing):
    # TI-DPO with the triplet: greedy anchors sampled from the policy with its adapters on, the
    # attribution to the (frozen) input embeddings, the reference's log-probs with the adapters off.
    args, tokenizer, batch = step_inputs("--loss", loss)
    base = tiny_llama(tokenizer)
    policy, ref = lora_policy(base)
    if checkpointing:
        memory.checkpoint_activations(policy)
    loss_lora, metrics = train.tidpo_step(policy, ref, batch, tokenizer, args, CPU, contextlib.nullcontext())
    loss_lora.backward()
    assert all((p.grad is not None) == ("lora_" in name) for name, p in policy.named_parameters())

    # by hand, float64: the merged model as the policy, a separate copy of the base as the reference
    model, adapters = merged_by_hand(base, policy, torch.float64)
    reference = copy.deepcopy(base).double().requires_grad_(False)
    loss_hand, metrics_hand = train.tidpo_step(model, reference, batch, tokenizer, args, CPU,
                                               contextlib.nullcontext())
    loss_hand.backward()
    assert loss_lora.item() == pytest.approx(loss_hand.item(), rel=1e-5)
    for name in ("rewards/margins", "loss/dpo_w"):
        assert metrics[name].item() == pytest.approx(metrics_hand[name].item(), rel=1e-4, abs=1e-7), name
    if loss == "tidpo":
        assert metrics_hand["loss/triplet"].item() > 0  # the anchors took part
    named = dict(policy.named_parameters())
    for name, (module, a, b) in adapters.items():
        grad_w = module.weight.grad  # dL/dW of the merged weight; W = W0 + s B A gives:
        for side, expected in (("lora_A", SCALE * b.T @ grad_w), ("lora_B", SCALE * grad_w @ a.T)):
            got = named[f"base_model.model.{name}.{side}.default.weight"].grad.double()
            assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item() + 1e-12)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_attribution_through_frozen_embeddings_is_the_full_models(checkpointing):
    # Under LoRA the embedding layer is frozen and its output needs no gradient; tidpo's hook
    # attributes to it anyway. The importance equals the plain model's at the same (merged) weights.
    args, tokenizer, batch = step_inputs()
    base = tiny_llama(tokenizer)
    policy, _ = lora_policy(base)
    assert not policy.get_input_embeddings().weight.requires_grad
    if checkpointing:
        memory.checkpoint_activations(policy)
    merged, _ = merged_by_hand(base, policy, torch.float32)
    inputs = [t for t in data.stack_pair(batch, tokenizer.pad_token_id)]
    logits, importance = tidpo.gradient_attribution(policy, *inputs)
    expected_logits, expected = tidpo.gradient_attribution(merged, *inputs)
    assert importance.sum() > 0
    assert_close(importance, expected, rtol=1e-4, atol=1e-6)
    assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    logits.sum().backward()  # the logits still lead to the adapters
    assert all(p.grad is not None for name, p in policy.named_parameters() if "lora_" in name)


def test_the_reference_is_the_base_and_the_policy_starts_equal_to_it():
    args, tokenizer, batch = step_inputs()
    base = tiny_llama(tokenizer)
    policy, ref = lora.wrap(copy.deepcopy(base), argparse.Namespace(lora_r=4, model=None))
    ids, mask, _ = data.stack_pair(batch, tokenizer.pad_token_id)
    expected = tidpo.forward_logits(base, ids, mask)
    assert torch.equal(tidpo.forward_logits(policy, ids, mask), expected)  # lora_B starts at 0
    policy, ref = lora_policy(base)
    got = tidpo.forward_logits(ref, ids, mask)
    assert torch.equal(got, expected) and not got.requires_grad
    assert not torch.equal(tidpo.forward_logits(policy, ids, mask), expected)
    assert ref.state_dict().keys() == base.state_dict().keys()  # reference.pt: the plain model's names


def test_a_model_with_dropout_stays_deterministic_through_wrapping_and_sampling():
    # A config with dropout (here Llama's attention dropout, as GPT-2, OPT and Phi have their
    # own): the policy and the reference are deterministic forwards after lora.wrap and after
    # the anchors' sampler has put the model in eval mode and back, as without LoRA.
    args, tokenizer, batch = step_inputs()
    base = tiny_llama(tokenizer)
    base.config.attention_dropout = 0.5
    for layer in base.model.layers:
        layer.self_attn.attention_dropout = 0.5
    policy, ref = lora_policy(base)
    ids, mask, _ = data.stack_pair(batch, tokenizer.pad_token_id)
    prompt = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    for when in ("wrapped", "sampled"):
        assert [name for name, module in policy.named_modules() if module.training] == [], when
        for model in (policy, ref):
            with torch.no_grad():
                assert torch.equal(tidpo.forward_logits(model, ids, mask), tidpo.forward_logits(model, ids, mask))
        sampling.sample(policy, *prompt, tokenizer, max_new_tokens=3, temperature=0.0)
    # the dropout is there to be switched on: in training mode two forwards differ
    policy.train()
    with torch.no_grad():
        assert not torch.equal(tidpo.forward_logits(policy, ids, mask), tidpo.forward_logits(policy, ids, mask))


@pytest.mark.parametrize("tied", [True, False])
def test_the_merged_save_of_the_cuda_layout_adds_the_adapters_to_the_bfloat16_base(tied, tmp_path):
    # On CUDA train.py stores the reference's Linear weights in bfloat16 (memory.linear_weights_in),
    # which under LoRA are the frozen base's, the tied output layer a copy of its own; the adapters
    # stay float32. Done here on the CPU: policy/ is then bf16(W) + s B A in float32, the untied
    # output layer bf16(W), the tied one the float32 embedding (autocast casts either to the same).
    args, tokenizer, _ = step_inputs()
    base = tiny_llama(tokenizer, tied)
    policy, ref = lora_policy(base)
    replaced = memory.linear_weights_in(ref, torch.bfloat16)
    assert len(replaced) == 2 * 7 + 1 and all(not copied.requires_grad for copied, _ in replaced)
    assert all(p.dtype == torch.float32 for name, p in policy.named_parameters() if "lora_" in name)
    lora.save(policy, tokenizer, tmp_path / "policy", tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    expected, _ = merged_by_hand(base, policy, torch.float32)
    with torch.no_grad():
        for name, module in expected.named_modules():
            if isinstance(module, torch.nn.Linear) and not (tied and name == "lm_head"):  # the base rounded
                module.weight -= base.get_submodule(name).weight - base.get_submodule(name).weight.bfloat16().float()
    got = merged.state_dict()
    for name, value in expected.state_dict().items():
        assert got[name].dtype == torch.float32 and torch.allclose(got[name], value, rtol=0, atol=1e-6), name
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied


# ----------------------------------------------------------------------------- runs on the built-in task

BUILTIN = ["--lora-r", "4", "--sft-steps", "20", "--batch-size", "8", "--log-every", "1", "--max-new-tokens", "4",
           "--save-every", "2", "--seed", "0", "--gradient-checkpointing"]


def run_keeping_the_model(argv, monkeypatch):
    """train.main(argv), and the model setup.build_model made (peft puts the adapters into it)."""
    built, original = [], setup.build_model
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    result = train.main(argv)
    return result, built[0]


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, model = run_keeping_the_model([*BUILTIN, "--steps", "4", "--output-dir", str(folder)], patch)
    return result, model, folder, caught


def heldout_logps(model, folder):
    args = train.parse_args(BUILTIN)
    tokenizer = AutoTokenizer.from_pretrained(folder / "policy")
    pairs = setup.load_pairs(args, tokenizer)[1][:16]
    ids, mask, response = data.stack_pair(data.collate(pairs, tokenizer.pad_token_id), tokenizer.pad_token_id)
    with torch.no_grad():
        return memory.token_logps(tidpo.forward_logits(model, ids, mask), ids, response)


def test_builtin_run_starts_at_margin_0_and_saves_the_merged_model_and_the_adapter(builtin_run):
    result, trained, folder, _ = builtin_run
    assert result["before"]["margin"] == 0.0 and result["before"]["accuracy"] == 0.5  # policy = reference
    assert result["after"]["margin"] != 0.0
    # policy/: the merged model, loaded without peft, computes the trained policy's log-probs
    merged = AutoModelForCausalLM.from_pretrained(folder / "policy")
    assert not any("lora" in name for name in merged.state_dict())
    expected = heldout_logps(trained, folder)
    assert_close(heldout_logps(merged, folder), expected, rtol=0, atol=2e-5)
    # adapter/ over the base (the built-in model's base is the checkpoints' reference.pt)
    def base():
        model = LlamaForCausalLM(AutoConfig.from_pretrained(folder / "policy"))
        model.load_state_dict(torch.load(folder / "checkpoints" / "reference.pt", weights_only=True))
        return model.eval()

    loaded = peft.PeftModel.from_pretrained(base(), folder / "adapter")  # (it puts them into the model)
    assert torch.equal(heldout_logps(loaded, folder), expected)
    # training moved the adapters only: the base with them off is still reference.pt
    with trained_adapters_off(trained):
        assert torch.equal(heldout_logps(trained, folder), heldout_logps(base(), folder))


@contextlib.contextmanager
def trained_adapters_off(model):
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def test_a_lora_run_gives_no_deprecation_warnings(builtin_run):
    # peft's own call of a name transformers deprecates is silenced in lora.wrap; nothing else
    caught = [w for w in builtin_run[3] if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not caught, [f"{w.filename}:{w.lineno}: {w.message}" for w in caught]


def test_builtin_checkpoints_hold_the_adapters_and_the_base_once(builtin_run):
    _, trained, folder, _ = builtin_run
    checkpoints = folder / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["reference.pt", "step-000002.pt", "step-000004.pt"]
    state = torch.load(checkpoints / "step-000004.pt", weights_only=True)
    assert len(state["policy"]) == 2 * 7 * 2 and all(".lora_" in name for name in state["policy"])
    assert len(state["optimizer"]["state"]) == 28  # AdamW moments of the adapters only
    reference = torch.load(checkpoints / "reference.pt", weights_only=True)
    assert reference.keys() == LlamaForCausalLM(trained.config).state_dict().keys()


def test_builtin_resume_equals_the_uninterrupted_run(builtin_run, tmp_path, monkeypatch):
    whole, _, whole_folder, _ = builtin_run
    folder = tmp_path / "run"
    train.main([*BUILTIN, "--steps", "2", "--output-dir", str(folder)])
    resumed = train.main([*BUILTIN, "--steps", "4", "--output-dir", str(folder), "--resume", "latest"])
    assert resumed["history"] == whole["history"] and resumed["after"] == whole["after"]
    expected = AutoModelForCausalLM.from_pretrained(whole_folder / "policy").state_dict()
    got = AutoModelForCausalLM.from_pretrained(folder / "policy").state_dict()
    assert all(torch.equal(got[name], value) for name, value in expected.items())


# ----------------------------------------------------------------------------- hub-shaped checkpoints

HUB = ["--lora-r", "4", "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "0", "--max-new-tokens", "4",
       "--max-length", "96", "--log-every", "1", "--seed", "0", "--save-every", "2", "--gradient-checkpointing"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    for kind in ("qwen2", "llama3"):  # bfloat16, chat templates; tied and untied embeddings
        build_checkpoint(root / kind, kind)
    (root / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in chat_records()))
    return root


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_a_hub_shaped_checkpoint_trains_resumes_and_saves_with_lora(kind, hub, tmp_path):
    flags = ["--model", str(hub / kind), "--data", str(hub / "chat.jsonl"), *HUB]
    whole = train.main([*flags, "--steps", "3", "--output-dir", str(tmp_path / "whole")])
    assert whole["before"]["margin"] == 0.0 and whole["history"][-1]["loss/triplet"] > 0
    # the base is --model's: no checkpoint holds it, and --resume reads it from there again
    checkpoints = tmp_path / "whole" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002.pt", "step-000003.pt"]
    assert all(".lora_" in name for name in torch.load(checkpoints / "step-000003.pt", weights_only=True)["policy"])
    train.main([*flags, "--steps", "2", "--output-dir", str(tmp_path / "stopped")])
    resumed = train.main([*flags, "--steps", "3", "--output-dir", str(tmp_path / "stopped"), "--resume", "latest"])
    assert resumed["history"] == whole["history"] and resumed["after"] == whole["after"]

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "policy")
    assert merged.dtype == torch.float32
    config = json.loads((tmp_path / "whole" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hub / kind) and config["r"] == 4 and config["lora_alpha"] == 8
    base = AutoModelForCausalLM.from_pretrained(hub / kind, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "whole" / "adapter").eval()
    ids = torch.arange(3, 40).view(1, -1)
    assert_close(merged(ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=2e-5)
    with adapted.disable_adapter():
        assert not torch.allclose(merged(ids).logits, adapted(input_ids=ids).logits, atol=1e-4)  # it trained


# ----------------------------------------------------------------------------- DDP, refusals


def test_two_processes_match_one_process_with_lora(tmp_path):
    # greedy anchors, as in the DDP test of full fine-tuning (test_reliability.py)
    flags = [*BUILTIN, "--steps", "3", "--grad-accum", "2", "--temperature", "0", "--device", "cpu"]
    child = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train.py", *flags, "--output-dir", str(tmp_path / "two")], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    assert "x 2 processes" in child.stdout and child.stdout.count("step 3/3") == 1
    assert "Warning" not in child.stderr and "warning" not in child.stderr, child.stderr[-3000:]
    train.main([*flags, "--output-dir", str(tmp_path / "one")])
    assert records(tmp_path / "two")[("eval", "before")]["margin"] == 0.0
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_lora_with_fsdp_a_negative_rank_and_no_peft_are_refused(capsys, monkeypatch):
    for flags, message in [
        (["--lora-r", "8", "--fsdp"], "--lora-r cannot be combined with --fsdp: LoRA keeps one copy of the weights"),
        (["--lora-r", "-1"], "--lora-r must be at least 0, got -1"),
    ]:
        with pytest.raises(SystemExit) as stop:
            train.parse_args(flags)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(SystemExit):
        train.parse_args(["--lora-r", "8"])
    assert "--lora-r 8 needs the peft package (pip install peft==0.21.2)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- memory


def small_config(tied=True):
    # h = 4, i = 8, 2 heads of 2 with 1 key/value head: kv = 2, V = 10, one layer
    return LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)


def test_step_peak_bytes_lora_hand_case():
    # Linear 144, embedding 40 (tied), norms 12: P = 196. Rank 2 adapters: q 2(4+4), k 2(4+2), v 2(4+2),
    # o 2(4+4), gate 2(4+8), up 2(4+8), down 2(8+4) = 16 + 12 + 12 + 16 + 24 + 24 + 24 = 128.
    terms = memory.step_peak_bytes(small_config(), 1, 3, 4, True, False, lora_r=2)
    assert terms["weights"] == 2 * (144 + 40) + 4 * (40 + 12) + 4 * 128  # bfloat16 Linear, float32 rest
    assert terms["gradients"] == 4 * 128 and terms["adamw"] == 8 * 128 and terms["reference"] == 0
    assert terms["autocast copies"] == 2 * 128
    assert terms["sampler"] == 2 * 128 + (4 + 2) * 1 * 1 * (4 + 64) * 2
    full = memory.step_peak_bytes(small_config(), 1, 3, 4, True, False)
    assert terms["activations"] == full["activations"] and terms["logits"] == full["logits"]
    assert terms["total"] == sum(value for name, value in terms.items() if name != "total")
    cpu = memory.step_peak_bytes(small_config(), 1, 3, 4, False, False, gpu=False, lora_r=2)
    assert cpu["weights"] == 4 * 196 + 4 * 128 and "autocast copies" not in cpu


def held_bytes(policy, ref, optimizer):
    """What a process holds after a step: every weight (each storage once), gradients, AdamW's
    moments, and the reference's weights that are not the policy's."""
    def nbytes(tensors):
        return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in tensors}.values())
    own = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    return {"weights": nbytes(policy.parameters()),
            "gradients": nbytes(p.grad for p in policy.parameters() if p.grad is not None),
            "adamw": nbytes(v for state in optimizer.state.values() for v in state.values() if v.dim() > 0),
            "reference": nbytes(p for p in ref.parameters() if p.untyped_storage().data_ptr() not in own)}


@pytest.mark.parametrize("tied", [True, False])
def test_a_cpu_step_holds_what_the_formula_says_and_lora_far_less(tied):
    args, tokenizer, batch = step_inputs("--lora-r", "4")
    base = tiny_llama(tokenizer, tied)
    held = {}
    for rank in (0, 4):
        if rank:
            policy, ref = lora.wrap(copy.deepcopy(base), args)
        else:
            policy, ref = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
        optimizer = train.make_optimizer(policy.parameters(), args)  # as train_loop makes it
        loss, _ = train.tidpo_step(policy, ref, batch, tokenizer, args, CPU, contextlib.nullcontext())
        loss.backward()
        optimizer.step()
        held[rank] = held_bytes(policy, ref, optimizer)
        formula = memory.step_peak_bytes(base.config, 2, 8, 8, True, False, gpu=False, lora_r=rank)
        for term, value in held[rank].items():
            assert value == formula[term], (rank, term)
    # one copy of the weights instead of four of their size: 20 bytes a weight against 4, plus the
    # adapters' 16 bytes a number (rank 4 of 32 dimensions: here they are 15% of the weights)
    assert sum(held[4].values()) < 0.4 * sum(held[0].values()), held


def test_lora_saves_no_more_activation_bytes_per_layer_than_the_formula_counts():
    # float32: the frozen Linear layers no longer save their inputs for a weight gradient; the
    # adapters save A's R-wide outputs. Per layer and token that stays within 32h + 16i + 8kv.
    h, i, kv, tokens = 64, 192, 32, 2 * 48

    def saved_bytes(layers):
        config = LlamaConfig(vocab_size=20, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)
        model, _ = lora.wrap(LlamaForCausalLM(config), argparse.Namespace(lora_r=8, model=None))
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        ids = torch.randint(0, 20, (2, tokens // 2))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return sum(storages.values())

    per_layer_per_token = (saved_bytes(3) - saved_bytes(2)) / tokens
    formula = sum(c * n for c, n in zip(memory.ACTIVATION_BYTES["float32"], (h, i, kv)))
    assert 0.9 * formula <= per_layer_per_token <= formula
