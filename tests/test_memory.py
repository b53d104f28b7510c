"""Tests for memory.py: activation checkpointing changes no number, and the memory formula.

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
import memory  # noqa: E402
import train  # noqa: E402

# ---------------------------------------------------------------------------------------------
# checkpoint_activations: training mode, dropout 0, the layers recomputed in the backward
# ---------------------------------------------------------------------------------------------


def test_checkpointed_training_mode_is_the_eval_forward():
    # GPT-2's config has dropout 0.1 in the embeddings, the attention and the residual stream: in
    # training mode with dropout left on, two forwards would differ.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    expected = model.eval()(torch.arange(10).view(2, 5)).logits
    memory.checkpoint_activations(model)
    assert model.training
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    for _ in range(2):
        assert torch.equal(model(torch.arange(10).view(2, 5)).logits, expected)


def test_eval_mode_restores_the_mode():
    model = torch.nn.Linear(2, 2).train()
    with memory.eval_mode(model):
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
    tokenizer = train.load_tokenizer(args)
    batch = data.collate(train.load_data(args, tokenizer)[0][:4], tokenizer.pad_token_id)
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
