"""Tests for tidpo.py, in the order of the paper's equations.

Each part starts with numbers small enough to check by hand (the arithmetic is in the comments),
then compares random inputs with a float64 reference written here with plain loops, so that a
reader can check the reference against the equation without reading tidpo.py.

Run: python -m pytest -q tests/test_tidpo.py
"""

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import experiments  # noqa: E402  (the attribution variants beyond the paper)
from training import memory  # noqa: E402
import tidpo  # noqa: E402

EXACT = dict(rtol=1e-12, atol=1e-12)  # float64 arithmetic against a float64 reference


@pytest.fixture(params=["tidpo", "memory"])
def lp(request):
    """token_logps and sequence_kl: tidpo.py's plain formulas, or training/memory.py's bounded-memory ones.
    Every test of the two runs on both, so both are checked against the same references."""
    return tidpo if request.param == "tidpo" else memory


# ---------------------------------------------------------------------------------------------
# Helpers: random batches and plain-Python references
# ---------------------------------------------------------------------------------------------

def randint(gen, low, high):
    """One integer in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=gen))


def random_masks(gen, batch, length):
    """Attention and response masks [B, L]: a prompt of >= 1 token, then a response of >= 1 token,
    padding on the right for even rows and on the left for odd rows."""
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    response_mask = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        real = randint(gen, 2, length + 1)
        prompt = randint(gen, 1, real)
        start = length - real if b % 2 else 0
        attention_mask[b, start:start + real] = 1
        response_mask[b, start + prompt:start + real] = 1
    return attention_mask, response_mask


def random_logps(gen, response_mask):
    """Per-token log-probs as token_logps returns them: negative on the response, 0 elsewhere."""
    return -3 * torch.rand(response_mask.shape, generator=gen, dtype=torch.float64) * response_mask


def random_weights(gen, response_mask):
    """Positive per-token weights on the response, 0 elsewhere (shaped like hybrid_weights)."""
    return (0.2 + 2 * torch.rand(response_mask.shape, generator=gen, dtype=torch.float64)) * response_mask


def softplus(x):
    """log(1 + exp(x)) = -log sigmoid(-x), without overflow."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def response_positions(response_mask_row):
    return [t for t, m in enumerate(response_mask_row.tolist()) if m]


def reference_logsoftmax(logits_row, index):
    """log softmax(logits_row)[index] with math, in float64."""
    values = [float(v) for v in logits_row]
    top = max(values)
    return values[index] - top - math.log(sum(math.exp(v - top) for v in values))


# ---------------------------------------------------------------------------------------------
# token_logps: token t is scored by the logits at t - 1, only on the response
# ---------------------------------------------------------------------------------------------

def test_token_logps_hand_case(lp):
    # V = 3, L = 3. Position 0 has logits [0, 1, 2]: log softmax = [0, 1, 2] - log(1 + e + e^2),
    # log(1 + e + e^2) = log(11.107337927) = 2.40760596444438.
    # Position 1 has logits log([0.6, 0.3, 0.1]) + 5: log softmax = log([0.6, 0.3, 0.1]).
    # Position 2 predicts what follows the sequence, so its logits are never used.
    logits = torch.tensor([[[0.0, 1.0, 2.0],
                            [math.log(0.6) + 5, math.log(0.3) + 5, math.log(0.1) + 5],
                            [100.0, -100.0, 0.0]]], dtype=torch.float64)
    input_ids = torch.tensor([[2, 0, 1]])
    response_mask = torch.tensor([[0, 1, 1]])
    # token 1 (id 0) by position 0: 0 - 2.40760596444438; token 2 (id 1) by position 1: log 0.3
    expected = torch.tensor([[0.0, -2.40760596444438, math.log(0.3)]], dtype=torch.float64)
    assert_close(lp.token_logps(logits, input_ids, response_mask), expected, **EXACT)
    # Off the response, 0: here token 1 becomes a prompt token.
    expected_short = torch.tensor([[0.0, 0.0, math.log(0.3)]], dtype=torch.float64)
    assert_close(lp.token_logps(logits, input_ids, torch.tensor([[0, 0, 1]])), expected_short, **EXACT)


def test_token_logps_shift_convention(lp):
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab = 2, 5, 4
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    response_mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    base = lp.token_logps(logits, input_ids, response_mask)
    for t in range(1, length):
        # Changing the logits at t - 1 changes the score of token t and of no other token.
        changed = logits.clone()
        changed[:, t - 1] += torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
        diff = (lp.token_logps(changed, input_ids, response_mask) - base).abs() > 1e-9
        assert torch.equal(diff[:, t], response_mask[:, t].bool())
        diff[:, t] = False
        assert not diff.any()
    # The logits at the last position predict nothing in the sequence.
    changed = logits.clone()
    changed[:, -1] = 50.0 * torch.randn(batch, vocab, generator=gen, dtype=torch.float64)
    assert torch.equal(lp.token_logps(changed, input_ids, response_mask), base)


def test_token_logps_bfloat16_logits_give_float32(lp):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 7, generator=gen)
    input_ids = torch.randint(0, 7, (3, 6), generator=gen)
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
    out = lp.token_logps(logits.bfloat16(), input_ids, response_mask)
    assert out.dtype == torch.float32
    # The arithmetic is float32 on the bfloat16 values ...
    assert_close(out, lp.token_logps(logits.bfloat16().float(), input_ids, response_mask),
                 rtol=1e-6, atol=1e-6)
    # ... and only the rounding of the logits (bfloat16 has 8 bits of mantissa) separates it
    # from the float32 result.
    assert_close(out, lp.token_logps(logits, input_ids, response_mask), rtol=0, atol=5e-2)


def test_token_logps_random_vs_loop_reference(lp):
    gen = torch.Generator().manual_seed(2)
    batch, length, vocab = 4, 7, 5
    logits = 3 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    _, response_mask = random_masks(gen, batch, length)
    expected = torch.zeros(batch, length, dtype=torch.float64)
    for b in range(batch):
        for t in response_positions(response_mask[b]):
            expected[b, t] = reference_logsoftmax(logits[b, t - 1], int(input_ids[b, t]))
    out = lp.token_logps(logits, input_ids, response_mask)
    assert out.dtype == torch.float64
    assert_close(out, expected, **EXACT)


def plain_token_logps(logits, input_ids, response_mask):
    """token_logps written with plain autograd: the whole [B, L, V] in float32 at least."""
    logits = logits.float() if logits.dtype == torch.bfloat16 else logits
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).unsqueeze(-1)  # the last is never used
    next_logps = logits.gather(-1, next_ids).squeeze(-1) - logits.logsumexp(-1)
    logps = torch.cat([torch.zeros_like(next_logps[:, :1]), next_logps[:, :-1]], dim=1)
    return logps * response_mask


def value_and_grad(function, logits, *args, loss_weights):
    """function's output and the gradient of sum(output * loss_weights) with respect to logits."""
    logits = logits.detach().requires_grad_(True)
    out = function(logits, *args)
    (out * loss_weights).sum().backward()
    return out.detach(), logits.grad


@pytest.fixture
def small_chunks(monkeypatch):
    # 3 rows of 40 logits per chunk: the [B, L] rows are split unevenly, across sequences
    monkeypatch.setattr(memory, "_CHUNK_ELEMENTS", 3 * 40)


def test_token_logps_gradient_is_onehot_minus_softmax(lp, small_chunks):
    # d log softmax(x)[target] / dx = onehot(target) - softmax(x), at the position that predicts
    # each response token; 0 at every other position.
    gen = torch.Generator().manual_seed(3)
    batch, length, vocab = 3, 7, 40
    logits = 4 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    _, response_mask = random_masks(gen, batch, length)
    loss_weights = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    _, grad = value_and_grad(lp.token_logps, logits, input_ids, response_mask, loss_weights=loss_weights)
    expected = torch.zeros_like(logits)
    for b in range(batch):
        for t in response_positions(response_mask[b]):
            onehot = torch.zeros(vocab, dtype=torch.float64)
            onehot[input_ids[b, t]] = 1
            expected[b, t - 1] = loss_weights[b, t] * (onehot - logits[b, t - 1].softmax(-1))
    assert_close(grad, expected, **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_equals_the_plain_formula(lp, dtype, small_chunks):
    # The chunked forward and the written-out backward against plain autograd on the whole tensor:
    # the same float32 arithmetic. Values to 1e-5; gradients to 1e-5, or, for bfloat16 logits, to
    # one bfloat16 rounding step (2^-8 relative), as both round a float32 gradient to bfloat16.
    gen = torch.Generator().manual_seed(4)
    batch, length, vocab = 3, 9, 40
    logits = (5 * torch.randn(batch, length, vocab, generator=gen)).to(dtype)
    input_ids = torch.randint(0, vocab, (batch, length), generator=gen)
    _, response_mask = random_masks(gen, batch, length)
    loss_weights = torch.randn(batch, length, generator=gen)
    out, grad = value_and_grad(lp.token_logps, logits, input_ids, response_mask, loss_weights=loss_weights)
    expected, expected_grad = value_and_grad(plain_token_logps, logits, input_ids, response_mask,
                                             loss_weights=loss_weights)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_close(out, expected, rtol=0, atol=1e-5)
    assert_close(grad, expected_grad, rtol=0 if dtype == torch.float32 else 2 ** -8, atol=1e-5)


def test_token_logps_keeps_no_float32_copy_of_the_logits():
    # For the backward, autograd keeps the logits themselves (they exist anyway) and [B, L] numbers,
    # never a tensor of the logits' size: plain autograd would keep a float32 copy, 2x bf16 logits.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 6, 50, generator=gen).bfloat16().requires_grad_(True)
    input_ids = torch.randint(0, 50, (2, 6), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        memory.token_logps(logits, input_ids, torch.ones(2, 6))
    large = [t for t in saved if t.numel() >= logits.numel()]
    assert len(large) == 1 and large[0].data_ptr() == logits.data_ptr() and large[0].dtype == torch.bfloat16
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        plain_token_logps(logits, input_ids, torch.ones(2, 6))  # the test would see the plain formula's copy
    assert any(t.dtype == torch.float32 and t.numel() == logits.numel() for t in saved)


def test_token_logps_without_gradients(lp):
    # The frozen reference's forward: inference mode, no graph, the same numbers.
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 30, generator=gen, dtype=torch.float64)
    input_ids = torch.randint(0, 30, (2, 5), generator=gen)
    response_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    with torch.inference_mode():
        out = lp.token_logps(logits, input_ids, response_mask)
    assert_close(out, plain_token_logps(logits, input_ids, response_mask), **EXACT)


@pytest.mark.parametrize("logits_shape, ids_shape, mask_shape, message", [
    ((2, 5), (2, 5), (2, 5), r"token_logps: logits must be a \[B, L, V\] tensor of floats, got shape \[2, 5\]"),
    ((2, 5, 7), (2, 4), (2, 5), r"token_logps: input_ids must have shape \[B, L\] = \[2, 5\], got \[2, 4\]"),
    ((2, 5, 7), (2, 5), (5,), r"token_logps: response_mask must have shape \[B, L\] = \[2, 5\], got \[5\]"),
])
def test_token_logps_rejects_mismatched_shapes(lp, logits_shape, ids_shape, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        lp.token_logps(torch.zeros(logits_shape), torch.zeros(ids_shape, dtype=torch.long), torch.ones(mask_shape))


# ---------------------------------------------------------------------------------------------
# gaussian_prior (Eq. 7): exp(-0.5 ((t - mu) / sigma)^2), mu = (T - 1) / 2, sigma = T / 4
# ---------------------------------------------------------------------------------------------

def test_gaussian_prior_five_tokens():
    # T = 5: mu = 2, sigma = 1.25; t = 0: exp(-0.5 * (2 / 1.25)^2) = exp(-1.28) = 0.2780,
    # t = 1: exp(-0.5 * (1 / 1.25)^2) = exp(-0.32) = 0.7261, t = 2: 1.
    expected = torch.tensor([0.2780, 0.7261, 1.0, 0.7261, 0.2780])
    assert_close(tidpo.gaussian_prior(5), expected, rtol=0, atol=1e-4)
    assert_close(tidpo.gaussian_prior(5, dtype=torch.float64),
                 torch.tensor([math.exp(-1.28), math.exp(-0.32), 1.0, math.exp(-0.32), math.exp(-1.28)],
                              dtype=torch.float64), **EXACT)


def test_gaussian_prior_one_token():
    assert_close(tidpo.gaussian_prior(1), torch.tensor([1.0]), rtol=0, atol=0)


@pytest.mark.parametrize("length", range(2, 13))
def test_gaussian_prior_symmetric_with_peak_in_the_middle(length):
    prior = tidpo.gaussian_prior(length, dtype=torch.float64)
    assert prior.shape == (length,)
    assert_close(prior, prior.flip(0), **EXACT)
    middle = (length - 1) // 2  # for even T the peak lies between positions middle and middle + 1
    assert prior[middle] == prior.max()
    assert (prior[1:middle + 1] > prior[:middle]).all()  # rising up to the middle
    assert (prior <= 1).all() and (prior > 0).all()
    if length % 2:
        assert prior[middle] == 1.0


def test_gaussian_prior_random_lengths_vs_closed_form():
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        length = randint(gen, 1, 200)
        mu, sigma = (length - 1) / 2, length / 4
        expected = torch.tensor([math.exp(-0.5 * ((t - mu) / sigma) ** 2) for t in range(length)],
                                dtype=torch.float64)
        prior = tidpo.gaussian_prior(length, dtype=torch.float64)
        assert prior.dtype == torch.float64
        assert_close(prior, expected, **EXACT)


# ---------------------------------------------------------------------------------------------
# hybrid_weights (Eq. 8): lambda I / sum(I) + (1 - lambda) P / sum(P), per row's response
# ---------------------------------------------------------------------------------------------

def reference_hybrid_weights(importance, response_mask, lam, scale):
    out = torch.zeros(importance.shape, dtype=torch.float64)
    for b in range(importance.shape[0]):
        positions = response_positions(response_mask[b])
        length = len(positions)
        scores = [float(importance[b, t]) for t in positions]
        total = sum(scores)
        mu, sigma = (length - 1) / 2, length / 4
        prior = [math.exp(-0.5 * ((k - mu) / sigma) ** 2) for k in range(length)]
        for k, t in enumerate(positions):
            prior_norm = prior[k] / sum(prior)
            weight = lam * scores[k] / total + (1 - lam) * prior_norm if total > 0 else prior_norm
            out[b, t] = weight * length if scale == "mean" else weight
    return out


def test_hybrid_weights_hand_case():
    # Two prompt tokens, a 3-token response with importance [1, 2, 3], one padding token.
    # The 9s sit off the response and must be ignored.
    importance = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    # I_norm = [1, 2, 3] / 6.
    # Prior, T = 3: mu = 1, sigma = 0.75: [exp(-8/9), 1, exp(-8/9)] = [0.411112, 1, 0.411112],
    # sum 1.822225, P_norm = [0.225610, 0.548780, 0.225610].
    # W = 0.7 * [0.166667, 0.333333, 0.5] + 0.3 * P_norm = [0.184350, 0.397967, 0.417683] (sums to 1)
    edge = math.exp(-8 / 9)
    prior_norm = [edge / (1 + 2 * edge), 1 / (1 + 2 * edge), edge / (1 + 2 * edge)]
    summed = [0.7 * i / 6 + 0.3 * p for i, p in zip([1, 2, 3], prior_norm)]
    expected_sum = torch.tensor([[0, 0, *summed, 0]], dtype=torch.float64)
    weights = tidpo.hybrid_weights(importance, response_mask, lam=0.7, scale="sum")
    assert_close(weights, expected_sum, **EXACT)
    assert_close(weights[0, 2:5], torch.tensor([0.184350, 0.397967, 0.417683], dtype=torch.float64),
                 rtol=0, atol=1e-6)
    # "mean" = "sum" * T = [0.553049, 1.193902, 1.253049], mean weight 1.
    weights = tidpo.hybrid_weights(importance, response_mask, lam=0.7, scale="mean")
    assert_close(weights, 3 * expected_sum, **EXACT)
    assert weights[0, 2:5].mean().item() == pytest.approx(1.0, abs=1e-12)


def test_hybrid_weights_mean_scale_is_sum_scale_times_length():
    gen = torch.Generator().manual_seed(4)
    _, response_mask = random_masks(gen, 6, 9)
    importance = torch.rand(6, 9, generator=gen, dtype=torch.float64)
    summed = tidpo.hybrid_weights(importance, response_mask, lam=0.7, scale="sum")
    mean = tidpo.hybrid_weights(importance, response_mask, lam=0.7, scale="mean")
    lengths = response_mask.sum(-1, keepdim=True)
    assert_close(mean, summed * lengths, **EXACT)
    assert_close(summed.sum(-1), torch.ones(6, dtype=torch.float64), **EXACT)
    assert_close(mean.sum(-1) / lengths.squeeze(-1), torch.ones(6, dtype=torch.float64), **EXACT)


def test_hybrid_weights_lambda_extremes():
    gen = torch.Generator().manual_seed(5)
    _, response_mask = random_masks(gen, 4, 8)
    importance = torch.rand(4, 8, generator=gen, dtype=torch.float64)
    for b in range(4):
        positions = response_positions(response_mask[b])
        length = len(positions)
        prior = tidpo.gaussian_prior(length, dtype=torch.float64)
        scores = importance[b, positions]
        # lambda = 0: the prior alone; lambda = 1: the attribution alone ("mean" scale, times T).
        only_prior = tidpo.hybrid_weights(importance, response_mask, lam=0.0)
        assert_close(only_prior[b, positions], prior / prior.sum() * length, **EXACT)
        only_importance = tidpo.hybrid_weights(importance, response_mask, lam=1.0)
        assert_close(only_importance[b, positions], scores / scores.sum() * length, **EXACT)


def test_hybrid_weights_without_attribution_use_the_prior():
    # Row 1 has importance only off its response: it counts as no attribution at all.
    importance = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.0],
                               [7.0, 0.0, 0.0, 0.0, 0.0],
                               [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    response_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    weights = tidpo.hybrid_weights(importance, response_mask, lam=0.7)
    # Prior, T = 3, "mean" scale: 3 * [0.225610, 0.548780, 0.225610] (see the hand case above).
    edge = math.exp(-8 / 9)
    prior_weights = torch.tensor([3 * edge, 3, 3 * edge], dtype=torch.float64) / (1 + 2 * edge)
    assert_close(weights[1, 1:4], prior_weights, **EXACT)
    assert_close(weights[2, 2:5], prior_weights, **EXACT)
    assert torch.isfinite(weights).all()
    # Row 0 is not touched by its neighbours: the same as on its own.
    alone = tidpo.hybrid_weights(importance[:1], response_mask[:1], lam=0.7)
    assert_close(weights[0], alone[0], **EXACT)
    assert weights[0, 2] > weights[0, 1]  # its attribution counts


def test_hybrid_weights_one_token_response():
    response_mask = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0]])
    for importance in (torch.tensor([[3.0, 1.0, 0.25, 8.0], [0.0, 0.0, 0.0, 0.0]]),
                       torch.zeros(2, 4)):
        expected = response_mask.float()
        assert_close(tidpo.hybrid_weights(importance, response_mask, scale="mean"), expected,
                     rtol=1e-6, atol=1e-6)
        assert_close(tidpo.hybrid_weights(importance, response_mask, scale="sum"), expected,
                     rtol=1e-6, atol=1e-6)


def test_hybrid_weights_zero_off_the_response():
    gen = torch.Generator().manual_seed(6)
    _, response_mask = random_masks(gen, 5, 10)
    importance = torch.rand(5, 10, generator=gen) + 1  # nonzero everywhere, prompt and padding too
    for scale in ("mean", "sum"):
        weights = tidpo.hybrid_weights(importance, response_mask, scale=scale)
        assert (weights[response_mask == 0] == 0).all()
        assert (weights[response_mask == 1] > 0).all()


def test_hybrid_weights_do_not_depend_on_padding():
    scores = torch.tensor([0.5, 2.0, 1.0, 4.0], dtype=torch.float64)
    # The same response after a 1-token prompt with 4 padding tokens on the right, after a 3-token
    # prompt with 2 on the right, and after a 2-token prompt with 3 on the left. Off the
    # response, the scores are 0.75 (they must not count).
    starts = [1, 3, 5]
    importance = torch.full((3, 9), 0.75, dtype=torch.float64)
    response_mask = torch.zeros(3, 9, dtype=torch.long)
    for row, start in enumerate(starts):
        importance[row, start:start + 4] = scores
        response_mask[row, start:start + 4] = 1
    for scale in ("mean", "sum"):
        weights = tidpo.hybrid_weights(importance, response_mask, scale=scale)
        for row, start in enumerate(starts[1:], 1):
            assert_close(weights[row, start:start + 4], weights[0, 1:5], **EXACT)
        # and the first row without its padding
        unpadded = tidpo.hybrid_weights(importance[:1, :5], response_mask[:1, :5], scale=scale)
        assert_close(weights[0, :5], unpadded[0], **EXACT)


@pytest.mark.parametrize("scale", ["mean", "sum"])
def test_hybrid_weights_random_rows_vs_reference(scale):
    gen = torch.Generator().manual_seed(7)
    batch, length = 8, 12
    _, response_mask = random_masks(gen, batch, length)
    importance = 10 * torch.rand(batch, length, generator=gen, dtype=torch.float64)
    importance[3] = 0.0  # one row without attribution
    for lam in (0.0, 0.3, 0.7, 1.0):
        expected = reference_hybrid_weights(importance, response_mask, lam, scale)
        weights = tidpo.hybrid_weights(importance, response_mask, lam=lam, scale=scale)
        assert weights.dtype == torch.float64
        assert_close(weights, expected, **EXACT)


def test_hybrid_weights_rejects_an_unknown_scale():
    with pytest.raises(ValueError):
        tidpo.hybrid_weights(torch.ones(1, 3), torch.tensor([[0, 1, 1]]), scale="total")


# ---------------------------------------------------------------------------------------------
# weighted_logratio (Eq. 11, one side): sum_t w_t (log pi_theta - log pi_ref)
# ---------------------------------------------------------------------------------------------

def reference_weighted_logratio(policy_logps, ref_logps, weights, response_mask):
    return torch.tensor([sum(float(weights[b, t]) * (float(policy_logps[b, t]) - float(ref_logps[b, t]))
                             for t in response_positions(response_mask[b]))
                         for b in range(policy_logps.shape[0])], dtype=torch.float64)


def test_weighted_logratio_hand_case():
    # One prompt token, two response tokens, one padding token.
    # log-ratios: -1.0 - (-1.5) = 0.5 and -2.0 - (-1.0) = -1.0
    # weighted: 0.5 * 0.5 + 1.5 * (-1.0) = -1.25; unweighted (all ones): 0.5 - 1.0 = -0.5
    policy_logps = torch.tensor([[0.0, -1.0, -2.0, 0.0]], dtype=torch.float64)
    ref_logps = torch.tensor([[0.0, -1.5, -1.0, 0.0]], dtype=torch.float64)
    weights = torch.tensor([[0.0, 0.5, 1.5, 0.0]], dtype=torch.float64)
    assert_close(tidpo.weighted_logratio(policy_logps, ref_logps, weights),
                 torch.tensor([-1.25], dtype=torch.float64), **EXACT)
    assert_close(tidpo.weighted_logratio(policy_logps, ref_logps, torch.ones(1, 4)),
                 torch.tensor([-0.5], dtype=torch.float64), **EXACT)


def test_weighted_logratio_random_vs_reference():
    gen = torch.Generator().manual_seed(8)
    _, response_mask = random_masks(gen, 6, 10)
    policy_logps, ref_logps = random_logps(gen, response_mask), random_logps(gen, response_mask)
    weights = random_weights(gen, response_mask)
    expected = reference_weighted_logratio(policy_logps, ref_logps, weights, response_mask)
    assert_close(tidpo.weighted_logratio(policy_logps, ref_logps, weights), expected, **EXACT)
    # bfloat16 log-probs are summed in float32
    out = tidpo.weighted_logratio(policy_logps.bfloat16(), ref_logps.bfloat16(), weights.bfloat16())
    assert out.dtype == torch.float32
    rounded = reference_weighted_logratio(policy_logps.bfloat16(), ref_logps.bfloat16(),
                                          weights.bfloat16(), response_mask)
    assert_close(out.double(), rounded, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# triplet_loss (Eq. 13): max(0, D(y, y_w) - D(y, y_l) + alpha), D summed token by token over the
# positions both responses have, and its gradient (Eq. 38)
# ---------------------------------------------------------------------------------------------

def reference_distance(anchor_values, other_values):
    """sum_{t < min(T_a, T_o)} (a_t - o_t)^2 with plain Python (zip stops at the shorter list)."""
    return sum((a - o) ** 2 for a, o in zip(anchor_values, other_values))


def values_on(tensor_row, mask_row):
    """The response entries of one row, in order."""
    return [float(tensor_row[t].detach()) for t in response_positions(mask_row)]


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_triplet_loss_equal_lengths_hand_case():
    # a = [1, 2], w = [0, 0], l = [3, 3], alpha = 0.5:
    # D(y, y_w) = 1 + 4 = 5, D(y, y_l) = 4 + 1 = 5, loss = 5 - 5 + 0.5 = 0.5 (active)
    anchor, chosen, rejected = (f64(rows).requires_grad_() for rows in ([[1.0, 2.0]], [[0.0, 0.0]], [[3.0, 3.0]]))
    mask = torch.ones(1, 2)
    loss = tidpo.triplet_loss(anchor, mask, chosen, mask, rejected, mask, margin=0.5)
    assert_close(loss, f64([0.5]), **EXACT)
    # Eq. 38: dL/dw_t = 2 (w_t - a_t) = [-2, -4]; dL/dl_t = 2 (a_t - l_t) = [-4, -2];
    # dL/da_t = 2 (a_t - w_t) - 2 (a_t - l_t) = [2 + 4, 4 + 2] = [6, 6]
    grad_anchor, grad_chosen, grad_rejected = torch.autograd.grad(loss.sum(), (anchor, chosen, rejected))
    assert_close(grad_chosen, f64([[-2.0, -4.0]]), **EXACT)
    assert_close(grad_rejected, f64([[-4.0, -2.0]]), **EXACT)
    assert_close(grad_anchor, f64([[6.0, 6.0]]), **EXACT)


def test_triplet_loss_unequal_lengths_and_padding_hand_case():
    # Anchor a = [1, -1, 2] right-padded, chosen w = [0.5, -0.5] left-padded, rejected l = [3, 0, 1, 1]
    # padded on both sides; the padding holds 9s and 7s, which must not count. Each argument has its own L.
    anchor = f64([[1.0, -1.0, 2.0, 9.0, 9.0]]).requires_grad_()
    anchor_mask = torch.tensor([[1, 1, 1, 0, 0]])
    chosen = f64([[7.0, 7.0, 0.5, -0.5]]).requires_grad_()
    chosen_mask = torch.tensor([[0, 0, 1, 1]])
    rejected = f64([[7.0, 3.0, 0.0, 1.0, 1.0, 7.0]]).requires_grad_()
    rejected_mask = torch.tensor([[0, 1, 1, 1, 1, 0]])
    # D(y, y_w) over t < 2: (1 - 0.5)^2 + (-1 + 0.5)^2 = 0.5
    # D(y, y_l) over t < 3: (1 - 3)^2 + (-1 - 0)^2 + (2 - 1)^2 = 6 (l_3 has no anchor token to meet)
    assert_close(tidpo.triplet_distance(anchor, anchor_mask, chosen, chosen_mask), f64([0.5]), **EXACT)
    assert_close(tidpo.triplet_distance(anchor, anchor_mask, rejected, rejected_mask), f64([6.0]), **EXACT)
    # alpha = 0.01: 0.5 - 6 + 0.01 < 0, clamped; alpha = 6: 0.5 - 6 + 6 = 0.5, active
    assert tidpo.triplet_loss(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, 0.01).item() == 0
    loss = tidpo.triplet_loss(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, margin=6.0)
    assert_close(loss, f64([0.5]), **EXACT)
    grad_anchor, grad_chosen, grad_rejected = torch.autograd.grad(loss.sum(), (anchor, chosen, rejected))
    # dL/dw_t = 2 (w_t - a_t), t < 2: [2 (0.5 - 1), 2 (-0.5 + 1)] = [-1, 1] at positions 2, 3
    assert_close(grad_chosen, f64([[0.0, 0.0, -1.0, 1.0]]), **EXACT)
    # dL/dl_t = 2 (a_t - l_t), t < 3: [2 (1 - 3), 2 (-1 - 0), 2 (2 - 1)] = [-4, -2, 2] at positions 1-3; l_3: 0
    assert_close(grad_rejected, f64([[0.0, -4.0, -2.0, 2.0, 0.0, 0.0]]), **EXACT)
    # dL/da_t = 2 (a_t - w_t) [t < 2] - 2 (a_t - l_t) [t < 3]: [1 + 4, -1 + 2, 0 - 2] = [5, 1, -2]
    assert_close(grad_anchor, f64([[5.0, 1.0, -2.0, 0.0, 0.0]]), **EXACT)


def random_triplet(seed, batch=24):
    """Anchor, chosen and rejected log-ratios [B, L] of three different widths, with random response
    lengths and padding on either side (random_masks), garbage off the response, float64."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for length in (7, 10, 5):
        _, mask = random_masks(gen, batch, length)
        values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
        out += [torch.where(mask.bool(), values, 100.0).requires_grad_(), mask]  # 100 off the response
    return out


def test_triplet_loss_random_vs_reference_and_eq38():
    margin = 0.5
    anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask = random_triplet(9)
    loss = tidpo.triplet_loss(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, margin)
    expected, active = [], []
    for b in range(len(anchor)):
        a, w, l = (values_on(x[b], m[b]) for x, m in ((anchor, anchor_mask), (chosen, chosen_mask),
                                                       (rejected, rejected_mask)))
        value = reference_distance(a, w) - reference_distance(a, l) + margin
        expected.append(max(0.0, value))
        active.append(value > 0)
    assert 0 < sum(active) < len(anchor)  # both sides of the hinge are exercised
    assert_close(loss, f64(expected), **EXACT)

    grads = torch.autograd.grad(loss.sum(), (anchor, chosen, rejected))
    expected_grads = [torch.zeros_like(x) for x in (anchor, chosen, rejected)]
    for b in range(len(anchor)):
        if not active[b]:
            continue
        a_pos, w_pos, l_pos = (response_positions(m[b]) for m in (anchor_mask, chosen_mask, rejected_mask))
        for t, (i, j) in enumerate(zip(a_pos, w_pos)):  # Eq. 38, t < min(T_a, T_w)
            a_t, w_t = float(anchor[b, i].detach()), float(chosen[b, j].detach())
            expected_grads[1][b, j] = 2 * (w_t - a_t)
            expected_grads[0][b, i] += 2 * (a_t - w_t)
        for t, (i, j) in enumerate(zip(a_pos, l_pos)):  # t < min(T_a, T_l)
            a_t, l_t = float(anchor[b, i].detach()), float(rejected[b, j].detach())
            expected_grads[2][b, j] = 2 * (a_t - l_t)
            expected_grads[0][b, i] -= 2 * (a_t - l_t)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, **EXACT)


def test_triplet_loss_float32_inputs_match_float64():
    anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask = random_triplet(10)
    exact = tidpo.triplet_loss(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, 0.5)
    rounded = [x.detach().float() if x.is_floating_point() else x
               for x in (anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask)]
    loss = tidpo.triplet_loss(*rounded, 0.5)
    assert loss.dtype == torch.float32
    # the inputs' float32 rounding (2^-24 relative on values of order 1), squared and summed over <= 10 terms
    assert_close(loss.double(), exact.detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# tidpo_loss (Eq. 12-14, and the release's KL term)
# ---------------------------------------------------------------------------------------------

def make_pairs(seed, batch=6, length=9):
    """Random chosen/rejected log-probs, weights and masks, float64."""
    gen = torch.Generator().manual_seed(seed)
    _, chosen_mask = random_masks(gen, batch, length)
    _, rejected_mask = random_masks(gen, batch, length)
    return SimpleNamespace(
        gen=gen, chosen_mask=chosen_mask, rejected_mask=rejected_mask,
        policy_chosen=random_logps(gen, chosen_mask), ref_chosen=random_logps(gen, chosen_mask),
        policy_rejected=random_logps(gen, rejected_mask), ref_rejected=random_logps(gen, rejected_mask),
        chosen_weights=random_weights(gen, chosen_mask), rejected_weights=random_weights(gen, rejected_mask))


def reference_rows(p, beta, anchor=None, gamma=0.0, margin=0.0, kl_chosen=None, kl_rejected=None,
                   kl_alpha=0.0):
    """Per row: the weighted log-ratios, Delta, the DPO-w loss and the triplet loss, in float64.
    `anchor` is (anchor_logratios, anchor_mask)."""
    p = SimpleNamespace(**{name: value.detach() if torch.is_tensor(value) else value
                           for name, value in vars(p).items()})
    anchor = None if anchor is None else [x.detach() for x in anchor]
    rows = []
    for b in range(p.policy_chosen.shape[0]):
        chosen_pos, rejected_pos = response_positions(p.chosen_mask[b]), response_positions(p.rejected_mask[b])
        lr_chosen = [float(p.policy_chosen[b, t] - p.ref_chosen[b, t]) for t in chosen_pos]
        lr_rejected = [float(p.policy_rejected[b, t] - p.ref_rejected[b, t]) for t in rejected_pos]
        chosen_weighted = sum(float(p.chosen_weights[b, t]) * lr for t, lr in zip(chosen_pos, lr_chosen))
        rejected_weighted = sum(float(p.rejected_weights[b, t]) * lr for t, lr in zip(rejected_pos, lr_rejected))
        delta = chosen_weighted - rejected_weighted  # Eq. 11
        if kl_alpha:
            delta -= kl_alpha * (kl_rejected[b].item() - kl_chosen[b].item())
        row = SimpleNamespace(chosen_weighted=chosen_weighted, rejected_weighted=rejected_weighted,
                              delta=delta, dpo_w=softplus(-beta * delta),  # Eq. 12
                              chosen_sum=sum(float(p.policy_chosen[b, t]) for t in chosen_pos),
                              rejected_sum=sum(float(p.policy_rejected[b, t]) for t in rejected_pos),
                              triplet=0.0, active=False)
        if anchor is not None:
            anchor_values = values_on(anchor[0][b], anchor[1][b])
            to_chosen = reference_distance(anchor_values, lr_chosen)
            to_rejected = reference_distance(anchor_values, lr_rejected)
            value = to_chosen - to_rejected + margin  # Eq. 13
            row.triplet, row.active = max(0.0, value), value > 0
            row.a, row.w, row.l = anchor_values, lr_chosen, lr_rejected
            row.to_chosen, row.to_rejected = to_chosen, to_rejected
        rows.append(row)
    return rows


def call_loss(p, anchor=None, **kwargs):
    if anchor is not None:  # (anchor_logratios, anchor_mask) and the two responses' masks
        kwargs.update(anchor_logratios=anchor[0], anchor_mask=anchor[1], chosen_mask=p.chosen_mask,
                      rejected_mask=p.rejected_mask)
    return tidpo.tidpo_loss(p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected,
                            p.chosen_weights, p.rejected_weights, **kwargs)


def anchors_on_both_sides(p):
    """(anchor_logratios, anchor_mask), [B, L + 3]: per token, an anchor near the rejected response
    for even rows (hinge active), near the chosen one for odd rows (hinge clamped unless the responses
    nearly agree). Token t = 0 .. min(T_w, T_l) - 1 of the anchor is l_t + 0.1 (w_t - l_t) (even rows)
    or w_t + 0.1 (l_t - w_t) (odd rows); even rows are right-padded, odd rows left-padded, with 5s."""
    batch, length = p.policy_chosen.shape
    logratios = torch.full((batch, length + 3), 5.0, dtype=torch.float64)
    mask = torch.zeros(batch, length + 3, dtype=torch.long)
    for b in range(batch):
        w = values_on((p.policy_chosen - p.ref_chosen)[b], p.chosen_mask[b])
        l = values_on((p.policy_rejected - p.ref_rejected)[b], p.rejected_mask[b])
        values = [(lt + 0.1 * (wt - lt)) if b % 2 == 0 else (wt + 0.1 * (lt - wt)) for wt, lt in zip(w, l)]
        start = 1 if b % 2 == 0 else length + 3 - len(values)
        logratios[b, start:start + len(values)] = f64(values)
        mask[b, start:start + len(values)] = 1
    return logratios, mask


def test_dpo_hand_case():
    # One response token each side. Chosen log-ratio: -1.0 - (-1.5) = 0.5; rejected: -2.0 - (-1.8) = -0.2.
    # Delta = 0.7, beta = 0.1: loss = -log sigmoid(0.07) = log(1 + exp(-0.07)) = 0.6587595555486971.
    loss, metrics = tidpo.tidpo_loss(
        torch.tensor([[0.0, -1.0]], dtype=torch.float64), torch.tensor([[0.0, -2.0]], dtype=torch.float64),
        torch.tensor([[0.0, -1.5]], dtype=torch.float64), torch.tensor([[0.0, -1.8]], dtype=torch.float64),
        torch.ones(1, 2), torch.ones(1, 2), beta=0.1)
    assert loss.item() == pytest.approx(0.6587595555486971, abs=1e-12)
    # rewards: 0.1 * 0.5 = 0.05 and 0.1 * (-0.2) = -0.02, margin 0.07, chosen ahead
    assert metrics["rewards/chosen"].item() == pytest.approx(0.05, abs=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.02, abs=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx(0.07, abs=1e-12)
    assert metrics["rewards/accuracies"].item() == 1.0


def test_tidpo_loss_with_uniform_weights_is_dpo():
    p = make_pairs(10)
    beta = 0.1
    # Eq. 3, written out independently: -log sigmoid(beta ((sum pc - sum rc) - (sum pr - sum rr)))
    expected = 0.0
    for b in range(p.policy_chosen.shape[0]):
        chosen = float(p.policy_chosen[b].sum() - p.ref_chosen[b].sum())
        rejected = float(p.policy_rejected[b].sum() - p.ref_rejected[b].sum())
        expected += softplus(-beta * (chosen - rejected)) / p.policy_chosen.shape[0]
    ones = torch.ones_like(p.policy_chosen)
    args = (p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected, ones, ones)
    loss, _ = tidpo.tidpo_loss(*args, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # gamma = 0 switches the triplet off even with an anchor; kl_alpha = 0 ignores the KL tensors.
    anchor, anchor_mask = anchors_on_both_sides(p)
    kl = torch.rand(p.policy_chosen.shape[0], generator=p.gen, dtype=torch.float64)
    loss, _ = tidpo.tidpo_loss(*args, beta=beta, anchor_logratios=anchor, anchor_mask=anchor_mask, gamma=0.0,
                               kl_chosen=kl, kl_rejected=2 * kl, kl_alpha=0.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # The "mean" scale makes uniform attribution with lambda = 1 exactly these unit weights.
    chosen_weights = tidpo.hybrid_weights(torch.ones_like(ones), p.chosen_mask, lam=1.0)
    rejected_weights = tidpo.hybrid_weights(torch.ones_like(ones), p.rejected_mask, lam=1.0)
    loss, _ = tidpo.tidpo_loss(p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected,
                               chosen_weights, rejected_weights, beta=beta)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_tidpo_loss_full_objective_vs_reference():
    p = make_pairs(11)
    beta, gamma, margin = 0.3, 0.2, 0.05
    anchor = anchors_on_both_sides(p)
    rows = reference_rows(p, beta, anchor=anchor, gamma=gamma, margin=margin)
    assert any(r.active for r in rows) and not all(r.active for r in rows)
    expected = sum(r.dpo_w + gamma * r.triplet for r in rows) / len(rows)  # Eq. 14, batch mean
    loss, metrics = call_loss(p, anchor, beta=beta, gamma=gamma, margin=margin)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    assert metrics["loss/dpo_w"].item() == pytest.approx(mean([r.dpo_w for r in rows]), abs=1e-12)
    assert metrics["loss/triplet"].item() == pytest.approx(mean([r.triplet for r in rows]), abs=1e-12)
    assert metrics["loss/triplet"].item() > 0
    # the triplet's diagnostics: its distances, the share of active hinges, where the anchor sits
    assert metrics["triplet/distance_chosen"].item() == pytest.approx(mean([r.to_chosen for r in rows]), abs=1e-12)
    assert metrics["triplet/distance_rejected"].item() == pytest.approx(mean([r.to_rejected for r in rows]),
                                                                        abs=1e-12)
    assert metrics["triplet/active"].item() == sum(r.active for r in rows) / len(rows)
    for name, side in (("anchor", "a"), ("chosen", "w"), ("rejected", "l")):
        summed = mean([sum(getattr(r, side)) for r in rows])
        assert metrics[f"triplet/logratio_{name}"].item() == pytest.approx(summed, abs=1e-12), name


def test_an_empty_anchor_is_not_counted_as_an_active_hinge():
    # Two pairs, all log-ratios 0: D(y, y_w) = D(y, y_l) = 0, so each hinge is max(0, 0 - 0 + 0.01) = 0.01.
    # Pair 0's anchor has two tokens (a hinge at the margin); pair 1's has none: its term is the margin alone,
    # which no token's distance can move, and triplet/active leaves it out (1 of 2 pairs, not 2 of 2).
    zeros, ones = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    anchor_mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    loss, metrics = tidpo.tidpo_loss(zeros, zeros, zeros, zeros, ones, ones, beta=0.1, anchor_logratios=zeros,
                                     anchor_mask=anchor_mask, chosen_mask=ones, rejected_mask=ones, gamma=0.1,
                                     margin=0.01)
    assert metrics["loss/triplet"].item() == pytest.approx(0.01, abs=1e-15)
    assert loss.item() == pytest.approx(math.log(2) + 0.1 * 0.01, abs=1e-12)
    assert metrics["triplet/active"].item() == 0.5


def test_tidpo_loss_metrics():
    p = make_pairs(12, batch=8)
    beta = 0.5
    p.policy_chosen.requires_grad_(True)
    p.policy_rejected.requires_grad_(True)
    rows = reference_rows(p, beta)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    wins = [beta * r.chosen_weighted > beta * r.rejected_weighted for r in rows]
    assert 0 < sum(wins) < len(rows)  # the accuracy is a real fraction here
    expected = {
        "rewards/chosen": mean([beta * r.chosen_weighted for r in rows]),
        "rewards/rejected": mean([beta * r.rejected_weighted for r in rows]),
        "rewards/margins": mean([beta * (r.chosen_weighted - r.rejected_weighted) for r in rows]),
        "rewards/accuracies": sum(wins) / len(rows),
        "logps/chosen": mean([r.chosen_sum for r in rows]),
        "logps/rejected": mean([r.rejected_sum for r in rows]),
        "loss/dpo_w": mean([r.dpo_w for r in rows]),
        "loss/triplet": 0.0,  # no anchor
    }
    loss, metrics = call_loss(p, beta=beta)
    assert loss.requires_grad
    assert set(metrics) == set(expected)
    for name, value in metrics.items():
        assert value.dim() == 0, name
        assert not value.requires_grad and value.grad_fn is None, name
        assert value.item() == pytest.approx(expected[name], abs=1e-12), name


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float64, 1e-12)],
                         ids=["float32", "bfloat16", "float64"])
def test_tidpo_loss_dtypes_agree(dtype, tolerance):
    p = make_pairs(13)
    anchor = anchors_on_both_sides(p)
    kwargs = dict(beta=0.1, gamma=0.1, margin=0.01)
    exact, _ = call_loss(p, anchor, **kwargs)

    def cast(x):
        return x.to(dtype)

    q = SimpleNamespace(**{name: cast(value) if torch.is_tensor(value) and value.is_floating_point() else value
                           for name, value in vars(p).items()})
    loss, metrics = call_loss(q, (cast(anchor[0]), anchor[1]), **kwargs)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert metrics["rewards/chosen"].dtype == loss.dtype
    # The arithmetic runs in at least float32: only the rounding of the inputs differs from float64 ...
    rounded = SimpleNamespace(**{name: value.double() if torch.is_tensor(value) and value.is_floating_point()
                                 else value for name, value in vars(q).items()})
    rounded_loss, _ = call_loss(rounded, (cast(anchor[0]).double(), anchor[1]), **kwargs)
    assert loss.item() == pytest.approx(rounded_loss.item(), abs=tolerance)
    # ... and that rounding moves the loss by little (bfloat16 keeps 8 significant bits).
    assert loss.item() == pytest.approx(exact.item(), abs=5e-2 if dtype == torch.bfloat16 else tolerance)


def test_tidpo_loss_kl_needs_its_tensors():
    p = make_pairs(14)
    kl = torch.rand(p.policy_chosen.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError):
        call_loss(p, kl_alpha=0.5)
    with pytest.raises(ValueError):
        call_loss(p, kl_alpha=0.5, kl_chosen=kl)
    with pytest.raises(ValueError):
        call_loss(p, kl_alpha=0.5, kl_rejected=kl)


def test_tidpo_loss_kl_term_value_and_stop_gradient():
    p = make_pairs(15)
    batch, beta, kl_alpha = p.policy_chosen.shape[0], 0.1, 0.5
    kl_chosen = (3 * torch.rand(batch, generator=p.gen, dtype=torch.float64)).requires_grad_()
    kl_rejected = (3 * torch.rand(batch, generator=p.gen, dtype=torch.float64)).requires_grad_()
    # -log sigmoid(beta (Delta - a (KL_l - KL_w)))
    rows = reference_rows(p, beta, kl_chosen=kl_chosen, kl_rejected=kl_rejected, kl_alpha=kl_alpha)
    loss, _ = call_loss(p, beta=beta, kl_chosen=kl_chosen, kl_rejected=kl_rejected, kl_alpha=kl_alpha)
    assert loss.item() == pytest.approx(sum(r.dpo_w for r in rows) / batch, abs=1e-12)
    without_kl, _ = call_loss(p, beta=beta)
    assert abs(loss.item() - without_kl.item()) > 1e-3  # the term does something here

    grad_chosen, grad_rejected = torch.autograd.grad(loss, (kl_chosen, kl_rejected), allow_unused=True)
    # stop-gradient on KL_{y_w}: nothing flows into kl_chosen
    assert grad_chosen is None or (grad_chosen == 0).all()
    # d/dKL_l of -log sigmoid(beta (Delta - a KL_l + ...)) / B = beta a (1 - sigmoid(beta Delta')) / B
    expected = torch.tensor([beta * kl_alpha * (1 - sigmoid(beta * r.delta)) / batch for r in rows],
                            dtype=torch.float64)
    assert_close(grad_rejected, expected, **EXACT)


def test_dpo_w_gradient_matches_eq33():
    p = make_pairs(16)
    batch, beta = p.policy_chosen.shape[0], 0.4
    for tensor in (p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected):
        tensor.requires_grad_(True)
    loss, _ = call_loss(p, beta=beta)
    grads = torch.autograd.grad(loss, (p.policy_chosen, p.policy_rejected, p.ref_chosen, p.ref_rejected))
    # Eq. 33: d loss / d log pi(y_w,t) = -(beta / B) (1 - sigmoid(beta Delta)) w^w_t,
    #         d loss / d log pi(y_l,t) = +(beta / B) (1 - sigmoid(beta Delta)) w^l_t
    rows = reference_rows(p, beta)
    scale = torch.tensor([beta / batch * (1 - sigmoid(beta * r.delta)) for r in rows], dtype=torch.float64)
    expected_chosen = -scale[:, None] * p.chosen_weights
    expected_rejected = scale[:, None] * p.rejected_weights
    assert_close(grads[0], expected_chosen, **EXACT)
    assert_close(grads[1], expected_rejected, **EXACT)
    # the reference model enters the log-ratio with the opposite sign
    assert_close(grads[2], -expected_chosen, **EXACT)
    assert_close(grads[3], -expected_rejected, **EXACT)


def test_tidpo_loss_gradient_matches_eq33_plus_eq38():
    p = make_pairs(17)
    batch, beta, gamma, margin = p.policy_chosen.shape[0], 0.2, 0.3, 0.01
    anchor, anchor_mask = anchors_on_both_sides(p)
    anchor.requires_grad_(True)
    p.policy_chosen.requires_grad_(True)
    p.policy_rejected.requires_grad_(True)
    loss, _ = call_loss(p, (anchor, anchor_mask), beta=beta, gamma=gamma, margin=margin)
    grad_chosen, grad_rejected, grad_anchor = torch.autograd.grad(
        loss, (p.policy_chosen, p.policy_rejected, anchor))
    rows = reference_rows(p, beta, anchor=(anchor, anchor_mask), gamma=gamma, margin=margin)
    assert [r.active for r in rows] == [b % 2 == 0 for b in range(batch)]
    for b, r in enumerate(rows):
        dpo = beta / batch * (1 - sigmoid(beta * r.delta))  # Eq. 33
        hinge = gamma / batch if r.active else 0.0  # Eq. 38, only where the hinge is active
        chosen_pos, rejected_pos = response_positions(p.chosen_mask[b]), response_positions(p.rejected_mask[b])
        anchor_pos = response_positions(anchor_mask[b])
        expected_chosen = [-dpo * float(p.chosen_weights[b, j]) for j in chosen_pos]
        expected_rejected = [dpo * float(p.rejected_weights[b, j]) for j in rejected_pos]
        expected_anchor = [0.0] * len(anchor_pos)
        # token by token over the positions both responses have (the anchor is min(T_w, T_l) long)
        for t in range(min(len(r.a), len(r.w))):
            expected_chosen[t] += hinge * 2 * (r.w[t] - r.a[t])
            expected_anchor[t] += hinge * 2 * (r.a[t] - r.w[t])
        for t in range(min(len(r.a), len(r.l))):
            expected_rejected[t] += hinge * 2 * (r.a[t] - r.l[t])
            expected_anchor[t] -= hinge * 2 * (r.a[t] - r.l[t])
        assert_close(grad_chosen[b, chosen_pos], f64(expected_chosen), **EXACT)
        assert_close(grad_rejected[b, rejected_pos], f64(expected_rejected), **EXACT)
        assert_close(grad_anchor[b, anchor_pos], f64(expected_anchor), **EXACT)
        assert grad_anchor[b][anchor_mask[b] == 0].abs().max().item() == 0.0  # padding gets nothing


def test_triplet_gradient_on_the_chosen_response_hand_case():
    # One token each side: b = -1.0 - (-1.5) = 0.5, c = -2.0 - (-1.8) = -0.2, anchor d = 0, alpha = 0.01:
    # Eq. 13 = (0 - 0.5)^2 - (-0.2 - 0)^2 + 0.01 = 0.25 - 0.04 + 0.01 = 0.22 (active), so the loss is
    # 0.6587595555486971 (test_dpo_hand_case) + 0.1 * 0.22.
    # DPO's push on the chosen token: -beta (1 - sigmoid(beta Delta)) = -0.1 (1 - sigmoid(0.07)) = -0.0482507...
    dpo_push = -0.1 * (1 - sigmoid(0.07))
    # Eq. 38 with gamma = 0.1, one token each (a = 0, w = 0.5, l = -0.2): dL/dw = gamma 2 (w - a) = +0.1,
    # dL/dl = gamma 2 (a - l) = +0.04, dL/da = gamma (2 (a - w) - 2 (a - l)) = 0.1 (-1.0 - 0.4) = -0.14.
    chosen_grad, rejected_grad = dpo_push + 0.1, -dpo_push + 0.04
    assert chosen_grad > 0  # a descent step LOWERS the chosen token's log-prob here
    policy_chosen = torch.tensor([[0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor([[0.0, -2.0]], dtype=torch.float64, requires_grad=True)
    anchor = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    loss, _ = tidpo.tidpo_loss(policy_chosen, policy_rejected, torch.tensor([[0.0, -1.5]], dtype=torch.float64),
                               torch.tensor([[0.0, -1.8]], dtype=torch.float64), mask, mask, beta=0.1,
                               anchor_logratios=anchor, anchor_mask=mask, chosen_mask=mask, rejected_mask=mask,
                               gamma=0.1, margin=0.01)
    assert loss.item() == pytest.approx(0.6587595555486971 + 0.022, abs=1e-12)
    grads = torch.autograd.grad(loss, (policy_chosen, policy_rejected, anchor))
    assert grads[0][0, 1].item() == pytest.approx(chosen_grad, abs=1e-12)
    assert grads[1][0, 1].item() == pytest.approx(rejected_grad, abs=1e-12)
    assert grads[2][0, 1].item() == pytest.approx(-0.14, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Input checks: shapes, names and numbers, without waiting for the device
# ---------------------------------------------------------------------------------------------

def bad_calls():
    """(what is wrong, the call, the words its message must contain)."""
    logps, other = torch.zeros(3, 5), torch.zeros(3, 4)
    mask = torch.ones(3, 5)
    loss_args = (logps, logps, logps, logps, mask, mask)
    return [
        ("lam above 1", lambda: tidpo.hybrid_weights(logps, mask, lam=7.0), "lam"),
        ("lam below 0", lambda: tidpo.hybrid_weights(logps, mask, lam=-0.1), "lam"),
        ("scale name", lambda: tidpo.hybrid_weights(logps, mask, scale="sum1"), "scale"),
        ("mask shape", lambda: tidpo.hybrid_weights(logps, other), "response_mask"),
        ("importance [B]", lambda: tidpo.hybrid_weights(logps[:, 0], mask), "importance"),
        ("prior length 0", lambda: tidpo.gaussian_prior(0), "length"),
        ("prior length 2.5", lambda: tidpo.gaussian_prior(2.5), "length"),
        ("ref shape", lambda: tidpo.weighted_logratio(logps, other, mask), "ref_logps"),
        ("weights shape", lambda: tidpo.weighted_logratio(logps, logps, other), "weights"),
        ("triplet mask shape", lambda: tidpo.triplet_loss(logps, mask, logps, other, logps, mask, 0.01),
         "chosen_mask"),
        ("triplet [B] points", lambda: tidpo.triplet_loss(logps, mask, logps[:, 0], mask, logps, mask, 0.01),
         "chosen_logratios"),
        ("triplet rows differ", lambda: tidpo.triplet_loss(logps, mask, logps[:2], mask[:2], logps, mask, 0.01),
         "chosen_logratios"),
        ("anchor [B] (summed)", lambda: tidpo.tidpo_loss(*loss_args, anchor_logratios=torch.zeros(3),
                                                         anchor_mask=torch.ones(3), chosen_mask=mask,
                                                         rejected_mask=mask), "anchor_logratios"),
        ("anchor of another batch", lambda: tidpo.tidpo_loss(*loss_args, anchor_logratios=torch.zeros(4, 2),
                                                             anchor_mask=torch.ones(4, 2), chosen_mask=mask,
                                                             rejected_mask=mask), "anchor_logratios"),
        ("anchor without masks", lambda: tidpo.tidpo_loss(*loss_args, anchor_logratios=torch.zeros(3, 2),
                                                          anchor_mask=torch.ones(3, 2)), "chosen_mask"),
        ("ref shape", lambda: tidpo.tidpo_loss(logps, logps, other, logps, mask, mask), "ref_chosen_logps"),
        ("rejected weights", lambda: tidpo.tidpo_loss(logps, logps, logps, logps, mask, other), "rejected_weights"),
        ("rows differ", lambda: tidpo.tidpo_loss(logps, logps[:2], logps, logps[:2], mask, mask[:2]),
         "policy_rejected_logps"),
        ("kl shape", lambda: tidpo.tidpo_loss(*loss_args, kl_chosen=torch.zeros(3), kl_rejected=torch.zeros(3, 1),
                                              kl_alpha=0.5), "kl_rejected"),
        ("grad [B, L]", lambda: tidpo.importance_scores(torch.zeros(3, 5), mask), "grad"),
        ("importance mask shape", lambda: tidpo.importance_scores(torch.zeros(3, 5, 2), other), "response_mask"),
        ("attention_mask shape", lambda: tidpo.gradient_attribution(None, mask.long(), other, mask),
         "attention_mask"),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())), ids=[case[0] for case in bad_calls()])
def test_public_functions_name_the_bad_argument(index):
    _, call, name = bad_calls()[index]
    with pytest.raises(ValueError, match=name):
        call()


def test_chosen_and_rejected_may_have_different_lengths():
    # Padded apart, y_w and y_l are [B, L_w] and [B, L_l]: more padding on one side changes nothing.
    p = make_pairs(18)
    loss, _ = call_loss(p, beta=0.1)
    padded = SimpleNamespace(**vars(p))
    for name in ("policy_rejected", "ref_rejected", "rejected_weights"):
        setattr(padded, name, torch.nn.functional.pad(getattr(p, name), (0, 3)))
    assert call_loss(padded, beta=0.1)[0].item() == pytest.approx(loss.item(), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# sequence_kl (the authors' release): sum over response tokens of KL(pi_ref || pi_theta), logits at t - 1
# ---------------------------------------------------------------------------------------------

def test_sequence_kl_hand_case(lp):
    # V = 2, L = 3, response = tokens 1 and 2, so the logits at positions 0 and 1 count.
    # Position 0: policy [0, 0] -> p = [1/2, 1/2]; ref [log 3, 0] -> q = [3/4, 1/4]
    #   KL(q || p) = 3/4 log(3/2) + 1/4 log(1/2) = 0.130812035941137
    #   (the other direction, KL(p || q), would be 0.143841036225890)
    # Position 1: policy [log 3, 0] -> p = [3/4, 1/4]; ref [0, 0] -> q = [1/2, 1/2]
    #   KL(q || p) = 1/2 log(2/3) + 1/2 log(2) = 0.143841036225890
    # Position 2 predicts nothing in the sequence: its (very different) logits do not count.
    policy_logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [9.0, -9.0]]], dtype=torch.float64)
    ref_logits = torch.tensor([[[math.log(3), 0.0], [0.0, 0.0], [-9.0, 9.0]]], dtype=torch.float64)
    both = lp.sequence_kl(policy_logits, ref_logits, torch.tensor([[0, 1, 1]]))
    assert both.item() == pytest.approx(0.130812035941137 + 0.143841036225890, abs=1e-12)
    only_token_1 = lp.sequence_kl(policy_logits, ref_logits, torch.tensor([[0, 1, 0]]))
    assert only_token_1.item() == pytest.approx(0.130812035941137, abs=1e-12)
    only_token_2 = lp.sequence_kl(policy_logits, ref_logits, torch.tensor([[0, 0, 1]]))
    assert only_token_2.item() == pytest.approx(0.143841036225890, abs=1e-12)


def test_sequence_kl_zero_for_identical_models(lp):
    gen = torch.Generator().manual_seed(18)
    logits = 4 * torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    _, response_mask = random_masks(gen, 3, 6)
    assert_close(lp.sequence_kl(logits, logits.clone(), response_mask),
                 torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-14)


def test_sequence_kl_random_vs_reference(lp):
    gen = torch.Generator().manual_seed(19)
    batch, length, vocab = 4, 8, 6
    policy_logits = 2 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    ref_logits = 2 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    _, response_mask = random_masks(gen, batch, length)
    expected = torch.zeros(batch, dtype=torch.float64)
    for b in range(batch):
        for t in response_positions(response_mask[b]):
            for v in range(vocab):
                log_q = reference_logsoftmax(ref_logits[b, t - 1], v)
                log_p = reference_logsoftmax(policy_logits[b, t - 1], v)
                expected[b] += math.exp(log_q) * (log_q - log_p)
    assert_close(lp.sequence_kl(policy_logits, ref_logits, response_mask), expected, **EXACT)
    # bfloat16 logits: computed in float32
    out = lp.sequence_kl(policy_logits.bfloat16(), ref_logits.bfloat16(), response_mask)
    assert out.dtype == torch.float32
    assert_close(out.double(), expected, rtol=0.05, atol=0.05)


def plain_sequence_kl(policy_logits, ref_logits, response_mask):
    """sequence_kl written with plain autograd on the whole [B, L, V]."""
    policy_logps, ref_logps = policy_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    kl = (ref_logps.exp() * (ref_logps - policy_logps)).sum(-1)
    return (kl[:, :-1] * response_mask[:, 1:]).sum(-1)


def test_sequence_kl_gradients_vs_closed_forms(lp, small_chunks):
    # KL(q || p) with p = softmax(policy logits), q = softmax(ref logits):
    #   d KL / d policy logits = p - q,   d KL / d ref logits = q * (log q - log p - KL)
    # at the positions that predict response tokens, 0 elsewhere.
    gen = torch.Generator().manual_seed(20)
    batch, length, vocab = 3, 7, 40
    policy_logits = (2 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ref_logits = (2 * torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)).requires_grad_(True)
    _, response_mask = random_masks(gen, batch, length)
    loss_weights = torch.randn(batch, generator=gen, dtype=torch.float64)
    (lp.sequence_kl(policy_logits, ref_logits, response_mask) * loss_weights).sum().backward()
    expected_policy, expected_ref = torch.zeros_like(policy_logits), torch.zeros_like(ref_logits)
    for b in range(batch):
        for t in response_positions(response_mask[b]):
            log_p = policy_logits[b, t - 1].detach().log_softmax(-1)
            log_q = ref_logits[b, t - 1].detach().log_softmax(-1)
            kl = (log_q.exp() * (log_q - log_p)).sum()
            expected_policy[b, t - 1] = loss_weights[b] * (log_p.exp() - log_q.exp())
            expected_ref[b, t - 1] = loss_weights[b] * log_q.exp() * (log_q - log_p - kl)
    assert_close(policy_logits.grad, expected_policy, **EXACT)
    assert_close(ref_logits.grad, expected_ref, **EXACT)


def test_sequence_kl_bfloat16_equals_the_plain_float32_formula(lp, small_chunks):
    # bfloat16 logits: the same float32 arithmetic as plain autograd on the float32 values. Values
    # to float32 rounding of sums of up to 40 x 9 terms; gradients (the policy's, rounded to
    # bfloat16 by both) to one bfloat16 rounding step.
    gen = torch.Generator().manual_seed(21)
    batch, length, vocab = 3, 9, 40
    policy_logits = (3 * torch.randn(batch, length, vocab, generator=gen)).bfloat16()
    ref_logits = (3 * torch.randn(batch, length, vocab, generator=gen)).bfloat16()
    _, response_mask = random_masks(gen, batch, length)
    loss_weights = torch.randn(batch, generator=gen)
    out, grad = value_and_grad(lp.sequence_kl, policy_logits, ref_logits, response_mask,
                               loss_weights=loss_weights)
    expected, expected_grad = value_and_grad(lambda p, r, m: plain_sequence_kl(p.float(), r.float(), m),
                                             policy_logits, ref_logits, response_mask, loss_weights=loss_weights)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_close(grad, expected_grad, rtol=2 ** -8, atol=1e-5)


def test_sequence_kl_rejects_mismatched_shapes(lp):
    logits = torch.zeros(2, 5, 7)
    with pytest.raises(ValueError, match=r"sequence_kl: policy_logits must be a \[B, L, V\] tensor of floats, "
                                         r"got shape \[10, 7\]"):
        lp.sequence_kl(logits.view(10, 7), logits.view(10, 7), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"sequence_kl: ref_logits must have shape \[B, L, V\] = \[2, 5, 7\], "
                                         r"got \[2, 5, 8\]"):
        lp.sequence_kl(logits, torch.zeros(2, 5, 8), torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"sequence_kl: response_mask must have shape \[B, L\] = \[2, 5\], "
                                         r"got \[2, 4\]"):
        lp.sequence_kl(logits, logits, torch.ones(2, 4))


# ---------------------------------------------------------------------------------------------
# gradient_attribution (Eq. 5-6): I_i = || d max_v logits[last response position, v] / d e_i ||_1
# ---------------------------------------------------------------------------------------------

def test_position_ids_count_real_tokens_only():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    positions = tidpo.position_ids(attention_mask)
    # Each row's real tokens are numbered 0, 1, 2, ... whatever padding sits around them.
    assert positions[0, 2:].tolist() == [0, 1, 2]
    assert positions[1, :3].tolist() == [0, 1, 2]
    assert positions[2].tolist() == [0, 1, 2, 3, 4]


class CumulativeLM(nn.Module):
    """A causal 'LM' simple enough to differentiate by hand: the logits at position t are the
    sum of the (unmasked) embeddings up to t, times a fixed matrix W [E, V]. The logit of token v
    at the last position is then linear in every earlier embedding, with gradient W[:, v]."""

    def __init__(self, embedding_table, readout):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embedding_table, freeze=False)
        self.readout = nn.Parameter(readout)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        if inputs_embeds is None:  # as a transformers model: the embedding layer inside the forward
            inputs_embeds = self.embed(input_ids)
        hidden = (inputs_embeds * attention_mask[..., None]).cumsum(dim=1)
        return SimpleNamespace(logits=hidden @ self.readout)


def cumulative_lm():
    # token 0 (padding): [5, 5], masked out by the attention mask; token 1: [1, 0]; token 2: [0, 1]
    table = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0]])
    readout = torch.tensor([[1.0, -2.0, 0.5],
                            [-1.0, 2.0, 1.0]])
    return CumulativeLM(table, readout)


# Two rows for the hand cases: [1 | 2 2 1] with right padding, and left padding + [1 | 1 1 1]
# (input_ids, attention_mask, response_mask).
HAND_ROWS = (torch.tensor([[1, 2, 2, 1, 0], [0, 1, 1, 1, 1]]),
             torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]),
             torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]))


def test_attribution_hand_case():
    model = cumulative_lm()
    # Row 0: [1 | 2 2 1] + right padding. Last response position 3: hidden = [2, 2],
    #   logits = 2 * [1, -2, 0.5] + 2 * [-1, 2, 1] = [0, 0, 3] -> v* = 2, W[:, 2] = [0.5, 1], I = 1.5.
    # Row 1: left padding + [1 | 1 1 1]. Last response position 4: hidden = [4, 0],
    #   logits = [4, -8, 2] -> v* = 0, W[:, 0] = [1, -1], I = 2.
    input_ids, attention_mask, response_mask = HAND_ROWS
    logits, importance = tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
    # The prompt tokens have the same gradient, but only response tokens keep a score.
    assert torch.equal(importance, torch.tensor([[0.0, 1.5, 1.5, 1.5, 0.0], [0.0, 0.0, 2.0, 2.0, 2.0]]))
    assert not importance.requires_grad
    # The returned logits are those of a plain forward pass.
    assert torch.equal(logits[0, 3], torch.tensor([0.0, 0.0, 3.0]))
    assert torch.equal(logits[1, 4], torch.tensor([4.0, -8.0, 2.0]))
    plain = model(inputs_embeds=model.embed(input_ids), attention_mask=attention_mask).logits
    assert torch.equal(logits.detach(), plain.detach())
    # Attribution does not write gradients into the weights.
    assert all(parameter.grad is None for parameter in model.parameters())

    # A frozen model is attributed all the same (to its inputs).
    model.requires_grad_(False)
    _, frozen_importance = tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
    assert torch.equal(frozen_importance, importance)


def tiny_llama(seed, dtype=torch.float64):
    # SDPA attention (the default): in transformers 5.24, eager attention already yields NaN for
    # left-padded float64 rows in a plain forward pass, with or without TI-DPO.
    config = LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         initializer_range=0.3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed, dtype=torch.float64):
    # Absolute position embeddings: a shift in positions would change its numbers.
    config = GPT2Config(vocab_size=13, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                        initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


# GPT-2 computes in float64 throughout, so central differences with a small step are accurate
# to ~1e-10, far below the tolerance. Llama's RMSNorm normalizes in float32 even in a
# float64 model: below a step of ~1e-3 the differences drown in float32 rounding (measured: 3e-5
# relative at step 1e-3), so it takes a larger step and a looser tolerance.
@pytest.mark.parametrize("make_model, step, rtol", [(tiny_gpt2, 1e-5, 1e-8), (tiny_llama, 1e-3, 3e-4)],
                         ids=["gpt2", "llama"])
def test_attribution_matches_finite_differences(make_model, step, rtol):
    model = make_model(seed=0)
    # 2 prompt tokens, 4 response tokens, 2 padding tokens: the last response position is 5, not L - 1.
    input_ids = torch.tensor([[5, 7, 1, 9, 3, 11, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]])
    _, importance = tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)

    embeddings = model.get_input_embeddings()(input_ids).detach()
    length, width = embeddings.shape[1], embeddings.shape[2]
    # One batch holding every perturbation e_i +- step * unit_k, for the 6 real positions i.
    perturbed = embeddings.repeat(2 * 6 * width, 1, 1)
    for i in range(6):
        for k in range(width):
            row = 2 * (i * width + k)
            perturbed[row, i, k] += step
            perturbed[row + 1, i, k] -= step
    with torch.no_grad():
        logits = model(inputs_embeds=perturbed, attention_mask=attention_mask.expand(len(perturbed), length)).logits
    target = logits[:, 5].max(dim=-1).values  # Eq. 5 at the last response position
    gradient = ((target[0::2] - target[1::2]) / (2 * step)).reshape(6, width)
    finite_difference_importance = gradient.abs().sum(dim=-1)  # Eq. 6

    assert_close(importance[0, 2:6].double(), finite_difference_importance[2:6], rtol=rtol, atol=0)
    # The prompt tokens do influence the target; they are left out on purpose.
    assert (finite_difference_importance[:2] > 1e-3).all()
    assert (importance[0, :2] == 0).all() and (importance[0, 6:] == 0).all()


# Same numbers up to rounding: float64 rounding for GPT-2, float32 rounding (RMSNorm) for Llama.
SAME_SCORES = {tiny_gpt2: dict(rtol=1e-10, atol=1e-12), tiny_llama: dict(rtol=1e-6, atol=1e-9)}


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_attribution_does_not_depend_on_padding(make_model):
    model = make_model(seed=1)
    row = torch.tensor([3, 4, 5, 6, 7, 8])
    row_response = torch.tensor([0, 0, 1, 1, 1, 1])
    _, alone = tidpo.gradient_attribution(model, row[None], torch.ones(1, 6, dtype=torch.long),
                                          row_response[None])
    for side in ("left", "right"):
        span = slice(2, 8) if side == "left" else slice(0, 6)
        # The other row is unpadded (length 8) and has its own prompt and response.
        input_ids = torch.tensor([[0] * 8, [1, 2, 12, 4, 10, 6, 7, 8]])
        attention_mask = torch.tensor([[0] * 8, [1] * 8])
        response_mask = torch.tensor([[0] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
        input_ids[0, span], attention_mask[0, span], response_mask[0, span] = row, 1, row_response
        _, importance = tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
        assert torch.isfinite(importance).all()
        assert_close(importance[0, span], alone[0], **SAME_SCORES[make_model])
        assert (importance[0][attention_mask[0] == 0] == 0).all()


def test_attribution_uses_one_forward_pass():
    model = tiny_llama(seed=2, dtype=torch.float32)
    calls = {"model": 0, "layers": 0}

    def count(name):
        def hook(module, args):
            calls[name] += 1
        return hook

    model.register_forward_pre_hook(count("model"))
    for layer in model.model.layers:
        layer.register_forward_pre_hook(count("layers"))
    input_ids = torch.tensor([[2, 3, 4, 5, 6, 0], [7, 8, 9, 10, 11, 12]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    logits, importance = tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
    assert not importance.requires_grad
    assert logits.requires_grad
    assert all(parameter.grad is None for parameter in model.parameters())
    # The training loss is built from the same logits and reaches every parameter.
    loss = -tidpo.token_logps(logits, input_ids, response_mask).sum()
    loss.backward()
    assert calls == {"model": 1, "layers": len(model.model.layers)}
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Those logits are the ones of a plain forward pass.
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    assert_close(logits.detach()[real], plain[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_attribution_scores_are_per_row(make_model):
    model = make_model(seed=3)
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 1, 2], [3, 5, 7, 9, 11, 4, 6]])
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    _, batched = tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
    for b in range(3):
        _, alone = tidpo.gradient_attribution(model, input_ids[b:b + 1], attention_mask[b:b + 1],
                                              response_mask[b:b + 1])
        assert_close(batched[b], alone[0], **SAME_SCORES[make_model])
        assert (batched[b][response_mask[b] == 1] > 0).all()


def test_attribution_keeps_float64():
    # The file's convention (_at_least_float32): float32 or better, float64 when float64 came in.
    # A float64 model should give float64 scores, not scores rounded to float32.
    model = tiny_llama(seed=4)
    input_ids = torch.tensor([[1, 2, 3, 4]])
    _, importance = tidpo.gradient_attribution(model, input_ids, torch.ones_like(input_ids),
                                               torch.tensor([[0, 1, 1, 1]]))
    assert importance.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# Attribution variants beyond the paper: the final token left out, gradient x input
# ---------------------------------------------------------------------------------------------

def test_leave_out_final_hand_case():
    importance = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    response_mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    left_out = experiments.leave_out_final(importance, response_mask)
    assert torch.equal(left_out, torch.tensor([[0.0, 3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0, 0.0]],
                                              dtype=torch.float64))
    # In Eq. 8 the final token then keeps only its prior share. Row 0, T = 3: I_norm = [0.75, 0.25, 0],
    # P_norm = [0.225610, 0.548780, 0.225610] (the hand case above), so with lambda 0.7
    # W = [0.525 + 0.067683, 0.175 + 0.164634, 0.067683] = [0.592683, 0.339634, 0.067683].
    weights = tidpo.hybrid_weights(left_out, response_mask, lam=0.7, scale="sum")
    assert_close(weights[0, 1:4], torch.tensor([0.592683, 0.339634, 0.067683], dtype=torch.float64),
                 rtol=0, atol=1e-6)


def test_attribution_variants_hand_case():
    model = cumulative_lm()
    # The rows of test_attribution_hand_case: every token's gradient is W[:, v*], [0.5, 1] in row 0
    # and [1, -1] in row 1. Token 1's embedding is [1, 0], token 2's is [0, 1].
    input_ids, attention_mask, response_mask = HAND_ROWS
    _, paper = tidpo.gradient_attribution(model, input_ids, attention_mask, response_mask)
    _, no_final = experiments.variant_attribution("no-final")(model, input_ids, attention_mask, response_mask)
    _, grad_x_input = experiments.variant_attribution("grad-x-input")(model, input_ids, attention_mask, response_mask)
    assert torch.equal(paper, torch.tensor([[0.0, 1.5, 1.5, 1.5, 0.0], [0.0, 0.0, 2.0, 2.0, 2.0]]))
    # The last response token (position 3 in row 0, 4 in row 1) scores 0.
    assert torch.equal(no_final, torch.tensor([[0.0, 1.5, 1.5, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0, 0.0]]))
    # |grad . e|: row 0, token 2: |[0.5, 1] . [0, 1]| = 1; row 1, token 1: |[1, -1] . [1, 0]| = 1.
    assert torch.equal(grad_x_input, torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="attribution must be one of"):
        experiments.variant_attribution("smoothgrad")


def test_grad_x_input_matches_finite_differences():
    # grad . e_i is the derivative of the target along e_i itself: scale e_i by (1 +- h).
    model = tiny_gpt2(seed=5)
    input_ids = torch.tensor([[5, 7, 1, 9, 3, 11, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]])
    _, importance = experiments.variant_attribution("grad-x-input")(model, input_ids, attention_mask, response_mask)
    embeddings = model.get_input_embeddings()(input_ids).detach()
    step = 1e-5
    perturbed = embeddings.repeat(2 * 6, 1, 1)
    for i in range(6):
        perturbed[2 * i, i] *= 1 + step
        perturbed[2 * i + 1, i] *= 1 - step
    with torch.no_grad():
        logits = model(inputs_embeds=perturbed, attention_mask=attention_mask.expand(12, 8)).logits
    target = logits[:, 5].max(dim=-1).values
    expected = ((target[0::2] - target[1::2]) / (2 * step)).abs()
    # Response tokens 2-4 keep their score; the final one (5) is left out.
    assert_close(importance[0, 2:5], expected[2:5], rtol=1e-7, atol=0)
    assert expected[5] > 1e-3 and importance[0, 5] == 0
    assert (importance[0, :2] == 0).all() and (importance[0, 6:] == 0).all()


@pytest.mark.parametrize("attribution", ["no-final", "grad-x-input"])
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_attribution_variants_do_not_depend_on_padding(make_model, attribution):
    model = make_model(seed=1)
    row = torch.tensor([3, 4, 5, 6, 7, 8])
    row_response = torch.tensor([0, 0, 1, 1, 1, 1])
    attribute = experiments.variant_attribution(attribution)
    _, alone = attribute(model, row[None], torch.ones(1, 6, dtype=torch.long), row_response[None])
    assert alone[0, -1] == 0 and (alone[0, 2:5] > 0).all()
    for span in (slice(2, 8), slice(0, 6)):  # left, then right padding
        input_ids = torch.tensor([[0] * 8, [1, 2, 12, 4, 10, 6, 7, 8]])
        attention_mask = torch.tensor([[0] * 8, [1] * 8])
        response_mask = torch.tensor([[0] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
        input_ids[0, span], attention_mask[0, span], response_mask[0, span] = row, 1, row_response
        _, importance = attribute(model, input_ids, attention_mask, response_mask)
        assert_close(importance[0, span], alone[0], **SAME_SCORES[make_model])
        assert (importance[0][attention_mask[0] == 0] == 0).all()
