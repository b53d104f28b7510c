"""Tests for training/memory.py: activation checkpointing changes no number, and the memory formula.

Run: python -m pytest -q tests/test_memory.py
"""

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from training import memory  # noqa: E402
import train  # noqa: E402
from training import setup  # noqa: E402
from training import plain_sampler  # noqa: E402

# ---------------------------------------------------------------------------------------------
# checkpoint_activations: training mode, dropout 0, the layers recomputed in the backward
# ---------------------------------------------------------------------------------------------


def test_checkpointed_training_mode_is_the_eval_forward():
    # GPT-2's config has dropout 0.1 in the embeddings, the attention and the residual stream: in
    # training mode with dropout left on, two forwards would differ.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    expected = model.eval()(torch.arange(10).view(2, 5)).logits
    assert model.config.use_cache
    end = memory.checkpoint_activations(model)
    assert model.training and not model.config.use_cache
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    for _ in range(2):
        assert torch.equal(model(torch.arange(10).view(2, 5)).logits, expected)
    # Ended: eval mode, no checkpointing, and the config (saved with the policy) as it came.
    end()
    assert not model.training and model.config.use_cache
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_eval_mode_restores_the_mode():
    model = torch.nn.Linear(2, 2).train()
    with plain_sampler.eval_mode(model):
        assert not model.training
    assert model.training


def tiny_llama(tokenizer, seed):
    # attention dropout 0.1 in the config: checkpoint_activations must turn it off
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def test_one_step_is_the_same_with_and_without_checkpointing(monkeypatch):
    # Full TI-DPO (attribution, sampled anchors, the release's KL term): the loss, every metric and
    # every gradient are the same; only the backward recomputes the layers.
    args = train.parse_args(["--kl-alpha", "0.5", "--max-new-tokens", "6"])
    tokenizer = setup.load_tokenizer(args)
    batch = data.collate(setup.load_pairs(args, tokenizer)[0][:4], tokenizer.pad_token_id)
    policy = tiny_llama(tokenizer, seed=0)
    ref = tiny_llama(tokenizer, seed=1).requires_grad_(False)  # another model: log-ratios and KL not 0
    # count the MLP forwards that run during the backward: the recomputation
    calls, mlp_forward = [], type(policy.model.layers[0].mlp).forward
    monkeypatch.setattr(type(policy.model.layers[0].mlp), "forward",
                        lambda self, x: calls.append(1) or mlp_forward(self, x))
    results = {}
    for checkpointing in (False, True):
        model = copy.deepcopy(policy)
        if checkpointing:
            memory.checkpoint_activations(model)
        torch.manual_seed(1)  # the same anchors
        loss, metrics = train.tidpo_step(model, ref, batch, tokenizer, args, torch.device("cpu"),
                                         contextlib.nullcontext())
        calls.clear()
        loss.backward()
        results[checkpointing] = loss, metrics, [p.grad for p in model.parameters()], len(calls)
    (loss_off, metrics_off, grads_off, calls_off), (loss_on, metrics_on, grads_on, calls_on) = results.values()
    # the 2 layers of the anchors' forward and of the chosen/rejected forward, recomputed in the backward
    assert (calls_off, calls_on) == (0, 4)
    assert metrics_on["loss/triplet"] > 0 and metrics_on["loss/kl"] != 0  # every term takes part
    # float32 arithmetic on the same numbers in the same order: equal to float32 rounding
    assert_close(loss_on, loss_off, rtol=1e-6, atol=0)
    for name in metrics_off:
        assert_close(metrics_on[name], metrics_off[name], rtol=1e-6, atol=1e-7)
    for grad_on, grad_off in zip(grads_on, grads_off):
        assert_close(grad_on, grad_off, rtol=1e-5, atol=1e-7)


def test_train_with_checkpointing_gives_the_same_run(tmp_path):
    # Whole runs of train.py (built-in model, SFT, steps with sampled anchors, both evaluations):
    # the same numbers with and without --gradient-checkpointing.
    flags = ["--sft-steps", "5", "--steps", "3", "--batch-size", "4", "--log-every", "1",
             "--max-new-tokens", "4", "--seed", "0"]
    off = train.main([*flags, "--output-dir", str(tmp_path / "off")])
    on = train.main([*flags, "--gradient-checkpointing", "--output-dir", str(tmp_path / "on")])
    for step_off, step_on in zip(off["history"], on["history"], strict=True):
        assert step_on == pytest.approx(step_off, rel=1e-5, abs=1e-6)
    assert on["after"] == pytest.approx(off["after"], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# step_peak_bytes: the formula of docs/training.md's table
# ---------------------------------------------------------------------------------------------


def small_config(layers=1, tied=True):
    # h = 4, i = 8, 2 heads of 2 with 1 key/value head: kv = 2, V = 10
    return LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=8, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)


def test_step_peak_bytes_hand_case():
    # Linear: q, o 4 x 4 each, k, v 4 x 2 each, gate, up, down 4 x 8 each: 32 + 16 + 96 = 144;
    # embedding 10 x 4 = 40 (tied output layer); norms 3 x 4 = 12. P = 196.
    # 1 pair of 3 tokens: N = 6 tokens with gradient (chosen and rejected).
    terms = memory.step_peak_bytes(small_config(), pairs=1, length=3, anchor_length=4, full_tidpo=False,
                                   checkpointing=False)
    assert terms["weights"] == terms["gradients"] == 4 * 196
    assert terms["adamw"] == 8 * 196
    assert terms["reference"] == 2 * (144 + 40) + 4 * 40  # bfloat16 Linear (output layer too), float32 embedding
    assert terms["autocast copies"] == 2 * (144 + 40)
    assert terms["activations"] == 6 * (30 * 4 + 8 * 8 + 4 * 2)  # one layer, bfloat16
    assert terms["logits"] == 2 * 6 * 10 * 2 + 12 * 60  # logits and gradient, float32 temporaries
    assert "sampler" not in terms
    assert terms["total"] == sum(value for name, value in terms.items() if name != "total")
    # checkpointing keeps each layer's float32 input (4h per token) and recomputes one layer
    on = memory.step_peak_bytes(small_config(layers=2), 1, 3, 4, False, True)
    assert on["activations"] == 6 * 2 * 16 + 6 * (30 * 4 + 8 * 8 + 4 * 2)
    # full TI-DPO: the anchor's 4 tokens carry gradient too, and the sampler holds its shadow and
    # a static cache (1 row, 4 + 64 positions, kv 2: keys float32, values bfloat16)
    full = memory.step_peak_bytes(small_config(), 1, 3, 4, True, False)
    assert full["activations"] == 10 * (30 * 4 + 8 * 8 + 4 * 2)
    assert full["sampler"] == 2 * (144 + 40) + (4 + 2) * 1 * 1 * (4 + 64) * 2
    cpu = memory.step_peak_bytes(small_config(), 1, 3, 4, False, False, gpu=False)
    assert cpu["reference"] == 4 * 196 and "autocast copies" not in cpu
    assert cpu["activations"] == 6 * (32 * 4 + 16 * 8 + 8 * 2)


def test_step_peak_bytes_sharded_hand_case():
    # P = 196 over 2 shards: 98 each. The root (the tied embedding 40 + the final norm 4) = 44, one
    # layer's Linear weights 144. bfloat16 on CUDA: gathered 2 (44 + 2 x 144), unsharded gradients
    # (2 + 4) (44 + 144) and the reduction's float32 result, half of it: 4 (44 + 144) / 2; no
    # autocast copies (FSDP gathers bfloat16), the reference sharded float32.
    terms = memory.step_peak_bytes(small_config(), 1, 3, 4, False, False, shards=2)
    assert terms["weights"] == terms["gradients"] == terms["reference"] == 4 * 98
    assert terms["adamw"] == 8 * 98
    assert terms["gathered"] == 2 * (44 + 2 * 144)
    assert terms["unsharded gradients"] == 6 * (44 + 144) + 4 * (44 + 144) // 2
    assert "autocast copies" not in terms and "sampler" not in terms and "sampling" not in terms
    assert terms["activations"] == 6 * (30 * 4 + 8 * 8 + 4 * 2)  # this process's pairs, as unsharded
    # full TI-DPO: the sampling, with the whole policy gathered (2 P) and the anchors' cache and
    # one step's float32 logits (1 row, V 10), is a peak of its own
    full = memory.step_peak_bytes(small_config(), 1, 3, 4, True, False, shards=2)
    static = 4 * 98 * 3 + 8 * 98
    assert full["sampling"] == static + 2 * 196 + 6 * 1 * 1 * 68 * 2 + 1 * 10 * 4
    backward = sum(v for name, v in full.items() if name not in ("total", "sampling"))
    assert full["total"] == max(backward, full["sampling"])


@pytest.mark.parametrize("tied", [True, False])
def test_step_peak_bytes_counts_the_parameters_of_the_model(tied):
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert memory.step_peak_bytes(config, 1, 4, 4, False, False)["weights"] == 4 * params


def test_activation_bytes_are_what_autograd_saves_per_layer():
    # float32: what a decoder layer saves for the backward (weights left out), per token, is
    # 32h + 16i + 8kv bytes, plus a few numbers per token (the norms' reciprocal square roots).
    h, i, kv, tokens = 64, 192, 32, 2 * 48

    def saved_bytes(layers):
        config = LlamaConfig(vocab_size=20, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(config)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        ids = torch.randint(0, 20, (2, tokens // 2))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return sum(storages.values())

    per_layer_per_token = (saved_bytes(3) - saved_bytes(2)) / tokens
    formula = sum(c * n for c, n in zip(memory.ACTIVATION_BYTES["float32"], (h, i, kv)))
    assert formula <= per_layer_per_token <= formula + 32


def test_a_step_keeps_one_bfloat16_copy_of_each_weight_for_the_backward():
    # Under autocast each float32 weight is cast to bfloat16 once per autocast region; the step's
    # forwards (the anchors', the pair's with the attribution) share one region, so the backward
    # holds one copy of each weight, as step_peak_bytes counts ("autocast copies"). The CPU's
    # bfloat16 autocast shows it: the MLP weights (gate, up [i, h], down [h, i]) of 2 layers are
    # 6 weights, each saved by both forwards (as itself or transposed: the same storage).
    args = train.parse_args(["--max-new-tokens", "3", "--temperature", "0", "--batch-size", "2"])
    tokenizer = setup.load_tokenizer(args)
    batch = data.collate(setup.load_pairs(args, tokenizer)[0][:2], tokenizer.pad_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).eval()
    ref = copy.deepcopy(policy).requires_grad_(False)
    saves = {}

    def pack(tensor):
        if tensor.dtype == torch.bfloat16 and tensor.dim() == 2 and tensor.numel() == 48 * 32:
            key = tensor.untyped_storage().data_ptr()
            saves[key] = saves.get(key, 0) + 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = train.tidpo_step(policy, ref, batch, tokenizer, args, torch.device("cpu"),
                                   torch.autocast("cpu", dtype=torch.bfloat16))
    assert len(saves) == 6 and all(count >= 2 for count in saves.values()), saves
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters())


# ---------------------------------------------------------------------------------------------
# gradient_attribution: Eq. 5-6 without the backward through the output layer at every position
# ---------------------------------------------------------------------------------------------


def attribution_inputs(tokenizer):
    args = train.parse_args(["--batch-size", "4"])
    batch = data.collate(setup.load_pairs(args, tokenizer)[0][:4], tokenizer.pad_token_id)
    return data.stack_pair(batch, tokenizer.pad_token_id)


def logits_gradients(model):
    """The shapes of the gradients that reach the output layer's outputs, as a list that fills."""
    shapes = []

    def watch(layer, inputs, output):
        if output.requires_grad:
            output.register_hook(lambda grad: shapes.append(tuple(grad.shape)))

    model.get_output_embeddings().register_forward_hook(watch)
    return shapes


@pytest.mark.parametrize("case", ["tied", "untied", "bfloat16-autocast", "frozen"])
def test_gradient_attribution_gives_tidpos_numbers_without_the_full_output_layer_backward(case):
    import tidpo

    tokenizer = setup.load_tokenizer(train.parse_args([]))
    ids, mask, response = attribution_inputs(tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=case != "untied")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().requires_grad_(case != "frozen")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bfloat16-autocast")
    shapes = logits_gradients(model)
    with autocast:
        expected_logits, expected = tidpo.gradient_attribution(model, ids, mask, response)
    assert (ids.shape[0], ids.shape[1], len(tokenizer)) in shapes  # tidpo's way: a [B, L, V] gradient
    shapes.clear()
    with autocast:
        for _ in range(2):  # the first call checks the model's logits once; the second trusts it
            logits, importance = memory.gradient_attribution(model, ids, mask, response)
            assert torch.equal(logits, expected_logits)
            assert torch.equal(importance, expected)
    assert shapes == [(ids.shape[0], len(tokenizer))] * 2  # one row per sequence, twice
    assert importance.sum() > 0 and (importance[response == 0] == 0).all()
    if case != "frozen":  # the logits still lead to the weights for the loss
        logits.float().sum().backward()
        assert model.get_input_embeddings().weight.grad is not None


def test_gradient_attribution_takes_tidpos_way_when_the_logits_are_changed_after_the_output_layer():
    # Gemma 2 caps its logits (tanh) after the output layer: the layer's output is not the logits,
    # and Eq. 5's gradient passes through the cap. The model is then attributed tidpo's way.
    import tidpo
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = setup.load_tokenizer(train.parse_args([]))
    ids, mask, response = attribution_inputs(tokenizer)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=1.0,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # large logits, far into the cap
        model.get_output_embeddings().weight.mul_(50)
    expected_logits, expected = tidpo.gradient_attribution(model, ids, mask, response)
    for _ in range(2):
        logits, importance = memory.gradient_attribution(model, ids, mask, response)
        assert torch.equal(logits, expected_logits) and torch.equal(importance, expected)
    assert memory._plain_output_layer[model] is False
