"""The static-cache sampler (the CUDA default, with graphs there) against the dynamic one.

Greedy decoding must give the same tokens, token for token; sampling must follow the same rules
(top-k, top-p, temperature, min_new_tokens, padding after the end of sequence) and draw each
token with the probability those rules give it. On the CPU the static way runs its decode step
eagerly; where CUDA is present, the same tests also run the captured CUDA graph ("graph").
"""

import argparse
import warnings
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training import sampling  # noqa: E402
from training import static_sampler  # noqa: E402
from training import plain_sampler  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
STATIC = ["static", pytest.param("graph", marks=CUDA)]


def settings(**overrides):
    values = dict(max_new_tokens=12, min_new_tokens=0, temperature=0.8, top_k=50, top_p=0.95)
    return {**values, **overrides}


def peaked_model(method="static", attn_implementation="sdpa"):
    """A random Llama with large weights (clear greedy choices) and three left-padded prompts, on
    the device `method` runs on (CUDA for "graph")."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.3)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn_implementation).eval()
    prompt_ids = torch.tensor([[1, 5, 6, 7, 8], [0, 0, 1, 9, 3], [0, 0, 0, 1, 4]])
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]])
    device = "cuda" if method == "graph" else "cpu"
    return model.to(device), prompt_ids.to(device), prompt_mask.to(device)


@pytest.mark.parametrize("method", STATIC)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_static_greedy_equals_dynamic_token_for_token(method, attn_implementation, autocast):
    model, prompt_ids, prompt_mask = peaked_model(method, attn_implementation)
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    greedy = settings(temperature=0.0)
    # the end-of-sequence token: the one row 0 makes at its 5th step, so that row 0 ends early
    # (followed by padding) while the other rows run to max_new_tokens
    first = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method="dynamic")
    tokenizer.eos_token_id = int(first[0][0, 5 + 4])
    # bfloat16: the static way runs a shadow with bfloat16 Linear weights, the same bits
    with torch.autocast(prompt_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        dynamic = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method="dynamic")
        # three prompts run as a bucket of four rows and 64 prompt columns; twice, so that the
        # second call reuses the bucket's cache (and graph)
        static = [sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method=method)
                  for _ in range(2)]
    assert dynamic[2][0].sum() == 5 and dynamic[2][1:].sum(-1).tolist() == [12, 12]
    for got in static:
        for tensor, expected in zip(got, dynamic):
            assert torch.equal(tensor, expected)


@pytest.mark.parametrize("method", STATIC)
def test_static_masks_end_at_the_first_eos_and_honour_min_new_tokens(method):
    model, prompt_ids, prompt_mask = peaked_model(method)
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    bias = torch.zeros(50, device=prompt_ids.device)
    bias[2] = 100.0  # eos by far the likeliest token
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    torch.manual_seed(0)
    ids, attention_mask, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(),
                                                         method=method)
    assert ids[:, 5:].tolist() == [[2]] * 3 and response_mask[:, 5:].tolist() == [[1]] * 3  # cut after the longest
    ids, attention_mask, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                                         **settings(min_new_tokens=3), method=method)
    assert ids[:, 8].tolist() == [2, 2, 2] and not (ids[:, 5:8] == 2).any()
    assert response_mask[:, 5:].sum(-1).tolist() == [4, 4, 4]
    assert torch.equal(attention_mask[:, 5:], response_mask[:, 5:])


@pytest.mark.parametrize("method", STATIC)
def test_static_top_k_1_is_greedy_and_responses_end_in_padding(method):
    model, prompt_ids, prompt_mask = peaked_model(method)
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    greedy = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(temperature=0.0), method=method)
    tokenizer.eos_token_id = int(greedy[0][0, 5 + 4])
    torch.manual_seed(0)
    ids, attention_mask, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                                         **settings(top_k=1, temperature=1.5), method=method)
    assert torch.equal(ids, sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(temperature=0.0),
                                            method=method)[0])
    assert response_mask[0, 5:].tolist() == [1] * 5 + [0] * 7 and (ids[0, 10:] == 0).all()
    assert torch.equal(attention_mask[:, :5], prompt_mask) and not response_mask[:, :5].any()


@pytest.mark.parametrize("method", ["dynamic", *STATIC])
def test_draws_follow_the_temperature_top_k_top_p_distribution(method):
    # The model's logits replaced by fixed ones: each of 1024 prompts draws two tokens. The rules
    # by hand, in float64: temperature 0.5, then the 4 likeliest, then the smallest prefix reaching 0.9.
    model, prompt_ids, prompt_mask = peaked_model(method)
    logits = torch.full((50,), -5.0, device=prompt_ids.device)
    logits[[10, 11, 12, 13, 14]] = torch.tensor([1.0, 0.8, 0.5, 0.0, -0.2], device=prompt_ids.device)
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * 0 + logits)
    expected = (logits[[10, 11, 12, 13]].double().cpu() / 0.5).softmax(-1)  # [0.50, 0.34, 0.15, 0.01]
    expected = expected[:3] / expected[:3].sum()  # 0.50 + 0.34 < 0.9: the third is kept, the fourth not
    n = 1024
    torch.manual_seed(0)
    ids, _, _ = sampling.sample(model, prompt_ids[:1].repeat(n, 1), prompt_mask[:1].repeat(n, 1),
                                argparse.Namespace(pad_token_id=0, eos_token_id=2),
                                **settings(max_new_tokens=2, temperature=0.5, top_k=4, top_p=0.9), method=method)
    for drawn in (ids[:, -2].cpu(), ids[:, -1].cpu()):  # the first token, then a decode step's
        counts = torch.bincount(drawn, minlength=50).double()
        assert counts.sum() == counts[[10, 11, 12]].sum()  # nothing outside top-k and top-p
        # each frequency within 4.5 standard deviations of its probability
        sigma = (expected * (1 - expected) / n).sqrt()
        assert ((counts[[10, 11, 12]] / n - expected).abs() < 4.5 * sigma).all(), (counts / n, expected)


def test_a_response_ends_at_any_end_id_and_min_new_tokens_holds_them_all_back():
    # The generation config lists two end ids (2 and 3), the tokenizer's eos is 2. A model whose
    # likeliest token is 3 ends every response there; with min_new_tokens both are held back.
    model, prompt_ids, prompt_mask = peaked_model()
    model.generation_config.eos_token_id = [2, 3]
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    assert plain_sampler.end_ids(model, tokenizer) == (2, 3)
    bias = torch.zeros(50)
    bias[3], bias[2] = 100.0, 50.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    for method in ("dynamic", "static"):
        ids, _, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(), method=method)
        assert ids[:, 5].tolist() == [3, 3, 3] and response_mask[:, 5:].sum(-1).tolist() == [1, 1, 1]
        ids, _, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                                **settings(min_new_tokens=2), method=method)
        assert not (ids[:, 5:7] == 2).any() and not (ids[:, 5:7] == 3).any() and ids[:, 7].tolist() == [3, 3, 3]
        assert response_mask[:, 5:].sum(-1).tolist() == [3, 3, 3]


def test_a_bucket_made_in_inference_mode_serves_a_later_call_under_no_grad():
    model, prompt_ids, prompt_mask = peaked_model()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    greedy = settings(temperature=0.0)
    with torch.inference_mode():
        first = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method="static")
    with torch.no_grad():  # the same bucket: its state is updated in place
        again = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method="static")
    assert len(static_sampler.static_sampler(model).buckets) == 1
    assert torch.equal(first[0], again[0])


def test_buckets_are_bounded_least_recently_used_first():
    model, prompt_ids, prompt_mask = peaked_model()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    sampler = static_sampler.static_sampler(model)
    limit = sampler.MAX_BUCKETS
    # max_new_tokens is part of a bucket's key: limit + 2 buckets, the first one used again before the last two
    for n in [*range(1, limit + 1), 1, limit + 1, limit + 2]:
        sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(max_new_tokens=n), method="static")
    kept = [key[2].max_new_tokens for key in sampler.buckets]  # least recently used first
    assert kept == [*range(4, limit + 1), 1, limit + 1, limit + 2]  # 2 and 3 are gone


def test_the_static_way_stops_once_every_response_has_ended(monkeypatch):
    # eos (2) is the likeliest token from min_new_tokens on: every response ends at its 5th token,
    # and the decode loop looks every 8 steps whether all have ended: 8 steps of 63, not 63.
    model, prompt_ids, prompt_mask = peaked_model()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    bias = torch.zeros(50)
    bias[2] = 100.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    steps = []
    step = static_sampler.DecodeLoop.step
    monkeypatch.setattr(static_sampler.DecodeLoop, "step", lambda loop, runner: steps.append(1) or step(loop, runner))
    ids, _, response_mask = sampling.sample(model, prompt_ids, prompt_mask, tokenizer,
                                            **settings(max_new_tokens=64, min_new_tokens=4), method="static")
    assert len(steps) == 8
    assert response_mask.sum(-1).tolist() == [5, 5, 5] and ids[:, -1].tolist() == [2, 2, 2]


def test_an_evicted_bucket_is_freed_at_once_not_by_the_garbage_collector():
    # A bucket's static cache is large on a GPU; when the least recently used one goes, its memory
    # must go with it, not wait for a collection of reference cycles.
    import gc
    import weakref

    model, prompt_ids, prompt_mask = peaked_model()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    sampler = static_sampler.static_sampler(model)
    sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(max_new_tokens=1), method="static")
    (loop,) = sampler.buckets.values()
    cache, layer = weakref.ref(loop.cache), weakref.ref(loop.cache.layers[0])
    del loop
    gc.disable()
    try:
        for n in range(2, sampler.MAX_BUCKETS + 2):  # one bucket more than are kept: the first goes
            sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(max_new_tokens=n), method="static")
        assert cache() is None and layer() is None
    finally:
        gc.enable()


def test_a_static_way_that_fails_at_first_use_warns_once_and_samples_dynamically(monkeypatch):
    model, prompt_ids, prompt_mask = peaked_model()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    greedy = settings(temperature=0.0)
    dynamic = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method="dynamic")

    def broken(*args, **kwargs):
        raise RuntimeError("a model this sampler cannot run")

    monkeypatch.setattr(static_sampler.DecodeLoop, "start", broken)
    with pytest.warns(UserWarning, match="static sampler failed at its first use.*cannot run"):
        fallback = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method="static")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **greedy, method="static")
    for got in (fallback, again):
        for tensor, expected in zip(got, dynamic):
            assert torch.equal(tensor, expected)


def test_a_static_way_that_ran_once_raises_its_later_failures(monkeypatch):
    model, prompt_ids, prompt_mask = peaked_model()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(), method="static")
    monkeypatch.setattr(static_sampler.DecodeLoop, "start", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(), method="static")


def test_unknown_or_impossible_methods_are_refused_by_name():
    model, prompt_ids, prompt_mask = peaked_model()
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    with pytest.raises(sampling.SamplerError, match="unknown sampling method 'fast'"):
        sampling.sample(model, prompt_ids, prompt_mask, tokenizer, method="fast")
    if not torch.cuda.is_available():
        with pytest.raises(sampling.SamplerError, match="graph sampler needs a CUDA device"):
            sampling.sample(model, prompt_ids, prompt_mask, tokenizer, method="graph")
    assert sampling.choose_method(model, "auto", cuda=False) == "dynamic"
    assert sampling.choose_method(model, "auto", cuda=True) == "graph"


class _ReplayedStep:
    """A CPU stand-in for a captured CUDA graph: each replay runs the decode step eagerly."""

    def __init__(self, loop, runner):
        self.loop, self.runner = loop, runner

    def replay(self):
        self.loop.step(self.runner)


def _capture_on_the_cpu(loop, runner):
    """DecodeLoop.capture's work on the CPU: the two warm-up steps (which draw tokens from the
    default generator, as on CUDA), then the "graph" that replays the step."""
    for _ in range(2):
        loop.step(runner)
    loop.graph = _ReplayedStep(loop, runner)
    return 0.0


@pytest.mark.parametrize("method", ["cpu-stand-in", pytest.param("graph", marks=CUDA)])
def test_a_buckets_first_graph_call_draws_what_a_warm_one_draws(method, monkeypatch):
    # The first call in a bucket warms up and captures the decode step, which samples tokens. It
    # must leave the random stream as it found it: after --resume (no buckets yet) the anchors are
    # the uninterrupted run's, and a cold model and a warm one draw the same numbers for the same
    # prompt (the evaluation's common random numbers). On the CPU the capture is stood in for by
    # its warm-up and an eager replay; the stream handling is the same code.
    if method == "cpu-stand-in":
        monkeypatch.setattr(static_sampler.DecodeLoop, "capture", _capture_on_the_cpu)
    model, prompt_ids, prompt_mask = peaked_model(method)
    rules = plain_sampler.Settings(12, 0, 1.0, 0, 1.0, (2,), 0)
    warm = static_sampler.StaticSampler(model)
    warm.sample(prompt_ids, prompt_mask, rules, graph=True)  # the bucket's graph made
    draws = {}
    for name, sampler in (("warm", warm), ("cold", static_sampler.StaticSampler(model))):
        torch.manual_seed(7)
        draws[name] = sampler.sample(prompt_ids, prompt_mask, rules, graph=True)[0]
        draws[name + " next"] = torch.rand(3, device=prompt_ids.device)  # the stream after the call
    assert static_sampler.StaticSampler(model) is not warm and warm.buckets
    assert torch.equal(draws["cold"], draws["warm"])
    assert torch.equal(draws["cold next"], draws["warm next"])
    # the draws are random ones: another seed gives other tokens
    torch.manual_seed(8)
    assert not torch.equal(static_sampler.StaticSampler(model).sample(prompt_ids, prompt_mask, rules, graph=True)[0],
                           draws["cold"])


@pytest.mark.parametrize("method", ["dynamic", "static"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's call
def test_samplers_compute_only_the_last_positions_logits(method, wrapped):
    # Only the last prompt position's logits are needed to draw a token: the output layer runs on
    # one position per row at every forward (the prompt's too), also through a peft model, whose
    # forward takes **kwargs and passes logits_to_keep on.
    model, prompt_ids, prompt_mask = peaked_model()
    if wrapped:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0))
        model.eval()
    positions = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, inputs, output: positions.append(inputs[0].shape[1]))
    tokenizer = argparse.Namespace(pad_token_id=0, eos_token_id=2)
    result = sampling.sample(model, prompt_ids, prompt_mask, tokenizer, **settings(temperature=0.0), method=method)
    handle.remove()
    assert result[2].sum() > 0 and len(positions) >= 2
    assert set(positions) == {1}, positions
