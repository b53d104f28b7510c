"""The fast paths of a training step compute what the plain, slow ones compute.

train.tidpo_step takes the attribution from the training forward itself (one forward, one
backward to the embeddings), runs chosen and rejected through each model in one padded forward,
gives the anchors a forward of their own and runs the reference under inference_mode. Here the
same loss is built the plain way: a separate forward per response for the attribution, fresh
forwards for the loss, the reference under no_grad. Float64 models, so the match is tight.
"""

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import tidpo  # noqa: E402
from training import memory  # noqa: E402
import train  # noqa: E402

PAD, EOS = 0, 2


def setup(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=EOS)
    policy = LlamaForCausalLM(config).double().eval()
    ref = LlamaForCausalLM(config).double().eval().requires_grad_(False)  # differs from the policy
    pairs = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 9, EOS], "rejected_ids": [10, EOS]},
             {"prompt_ids": [1, 11], "chosen_ids": [12, EOS], "rejected_ids": [13, 14, 15, 16, EOS]}]
    batch = data.collate(pairs, PAD)
    # fixed anchors, as a sampler would return them: left-padded prompt + response + padding
    anchor = (torch.tensor([[1, 5, 6, 20, 21, EOS], [0, 1, 11, 22, PAD, PAD]]),
              torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]]),
              torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0]]))
    return policy, ref, pairs, batch, anchor


def plain_logps(model, ids, response):
    """token_logps of one unpadded sequence, by a loop over its tokens."""
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    out = torch.zeros(len(ids), dtype=torch.float64)
    for t in range(1, len(ids)):
        if response[t]:
            out[t] = torch.log_softmax(logits[t - 1], -1)[ids[t]]
    return out


def plain_importance(model, ids, response):
    """Eq. 5-6 by a separate forward of one unpadded sequence."""
    embeddings = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits[0]
    last = max(t for t in range(len(ids)) if response[t])
    (grad,) = torch.autograd.grad(logits[last].max(), embeddings)
    return grad[0].abs().sum(-1) * torch.tensor(response, dtype=torch.float64)


def plain_loss(policy, ref, pairs, anchor, args):
    losses = []
    for b, pair in enumerate(pairs):
        logratios, weighted = {}, {}
        for side in ("chosen", "rejected"):
            ids = pair["prompt_ids"] + pair[f"{side}_ids"]
            response = [0] * len(pair["prompt_ids"]) + [1] * len(pair[f"{side}_ids"])
            with torch.no_grad():
                ref_lp = plain_logps(ref, ids, response)
            lr = plain_logps(policy, ids, response) - ref_lp
            weights = tidpo.hybrid_weights(plain_importance(policy, ids, response)[None],
                                           torch.tensor([response]), lam=args.lam)[0]
            keep = torch.tensor(response).bool()
            logratios[side], weighted[side] = lr[keep], (weights * lr).sum()  # the response's log-ratios
        loss = -torch.nn.functional.logsigmoid(args.beta * (weighted["chosen"] - weighted["rejected"]))
        if args.gamma:
            keep = anchor[1][b].bool()
            ids, response = anchor[0][b][keep].tolist(), anchor[2][b][keep].tolist()
            with torch.no_grad():
                ref_lp = plain_logps(ref, ids, response)
            a = (plain_logps(policy, ids, response) - ref_lp)[torch.tensor(response).bool()]
            # Eq. 13, token by token over the positions both responses have
            distance = {side: ((a[:len(lr)] - lr[:len(a)]) ** 2).sum() for side, lr in logratios.items()}
            loss = loss + args.gamma * torch.clamp(distance["chosen"] - distance["rejected"] + args.margin, min=0)
        losses.append(loss)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_step_matches_the_plain_computation(gamma, monkeypatch):
    policy, ref, pairs, batch, anchor = setup()
    args = argparse.Namespace(loss="tidpo", weights="hybrid", beta=0.1, gamma=gamma, lam=0.7, margin=0.01,
                              kl_alpha=0.0, max_new_tokens=64,
                              min_new_tokens=0, temperature=0.8, top_k=50, top_p=0.95, sampler="auto")
    monkeypatch.setattr(train.sampling, "sample", lambda *a, **k: anchor)
    tokenizer = argparse.Namespace(pad_token_id=PAD, eos_token_id=EOS)

    loss, _ = train.tidpo_step(policy, ref, batch, tokenizer, args, torch.device("cpu"), nullcontext())
    fast_grads = torch.autograd.grad(loss, list(policy.parameters()))
    expected = plain_loss(policy, ref, pairs, anchor, args)
    plain_grads = torch.autograd.grad(expected, list(policy.parameters()))

    assert loss.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    assert loss.item() != pytest.approx(0.6931471805599453, abs=1e-6)  # the models differ: not a trivial log 2
    for fast, plain in zip(fast_grads, plain_grads):
        torch.testing.assert_close(fast, plain, rtol=1e-7, atol=1e-10)


def test_reference_with_bfloat16_linear_weights_gives_the_same_bits_under_autocast():
    # On CUDA the frozen reference keeps its Linear weights in bfloat16; under bfloat16 autocast
    # (here the CPU's) its logits are the float32 model's, bit for bit. Tied output layer included.
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1,
                         eos_token_id=EOS, tie_word_embeddings=True)
    ref = LlamaForCausalLM(config).eval().requires_grad_(False)
    input_ids = torch.tensor([[0, 1, 5, 6, 7], [1, 9, 8, 7, 6]])
    attention_mask = (input_ids != PAD).long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = tidpo.forward_logits(ref, input_ids, attention_mask)
        memory.linear_weights_in(ref, torch.bfloat16)
        got = tidpo.forward_logits(ref, input_ids, attention_mask)
    assert ref.lm_head.weight.dtype == torch.bfloat16 and ref.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(got, expected)
