"""Sampling responses from a causal LM: the anchors of the triplet loss (Eq. 13) and the
evaluation's samples.

Written out rather than calling generate(), because it runs at every TI-DPO training step. Two
ways, one set of rules (temperature, top-k, top-p, min/max new tokens, and a response ends at any
of the model's end ids):

  dynamic   the KV cache grows by a token per step; top-p is applied to the k kept tokens only,
            which avoids a sort over the whole vocabulary. The CPU's default.
  static    a KV cache of fixed size, one fixed-shape decode step, a fixed number of steps and no
            wait for the device inside the loop. On CUDA ("graph", the default there) that step is
            captured once in a CUDA graph per (batch, prompt length) bucket and replayed: a decode
            step of a 24-layer model is hundreds of small kernels, and launching them one by one
            from Python takes longer than running them. Runs on the CPU too, without the graph.
            Not for models with sliding-window attention (Mistral, Gemma 2 and 3): "auto" samples
            those the dynamic way, and "static" or "graph" refuse them.

The static way draws a token by the exponential race, argmax(p / E) with E ~ Exp(1) per token,
which picks token i with probability p_i / sum(p) exactly (the smallest of independent
exponentials with rates p_i is the i-th with that probability). torch.multinomial draws one
sample the same way, but first checks its input with two host synchronisations (.item()), which
a CUDA graph cannot hold. The dynamic way keeps torch.multinomial, so the CPU's random draws are
those of earlier versions.
"""

import collections
import contextlib
import copy
import inspect
import time
import warnings
import weakref
from typing import NamedTuple

import torch

from tidpo import position_ids

METHODS = ("auto", "dynamic", "static", "graph")


class SamplerError(ValueError):
    """A sampling method that cannot run this model; the message says why and what to use instead."""


class Settings(NamedTuple):
    """One call's sampling rules (hashable: a static bucket is kept per settings)."""
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    end_ids: tuple  # a response ends at the first of these
    pad_id: int


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, tokenizer, *, max_new_tokens=64, min_new_tokens=0, temperature=0.8,
           top_k=50, top_p=0.95, method="auto"):
    """Responses sampled from `model` for left-padded prompts, as (input_ids, attention_mask,
    response_mask) of prompt + response; a response ends at its first end id (end_ids).

    The defaults are the authors' settings: up to 64 new tokens, temperature 0.8 (0: greedy), top-k
    50 (0: all), top-p 0.95, applied in that order (temperature, then top-k, then top-p), as in
    transformers' generate(). `tokenizer` gives eos_token_id and pad_token_id. `method`: "dynamic",
    "static", "graph" (static with CUDA graphs, CUDA only) or "auto" ("graph" on CUDA where the
    model's attention allows it, "dynamic" elsewhere). The static ways cut the result after the
    longest response. If a static way fails at its first use for a model, it warns once and that
    model is sampled the dynamic way from then on.
    """
    with eval_mode(model):
        return _sample(model, prompt_ids, prompt_mask, tokenizer, Settings(
            max_new_tokens, min_new_tokens, temperature, top_k, top_p, end_ids(model, tokenizer),
            tokenizer.pad_token_id), method)


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode inside the block, then back in the mode it had. A policy trained with
    activation checkpointing is in training mode, where transformers 5.17 (not 5.24) drops a
    checkpointed layer's KV cache, even without gradients."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def _sample(model, prompt_ids, prompt_mask, tokenizer, settings, method):
    method = choose_method(model, method, prompt_ids.is_cuda)
    sampler = static_sampler(model) if method != "dynamic" else None
    if sampler is not None and not sampler.failed:
        try:
            # Outside inference mode even when called inside it: a bucket's tensors made there could
            # not be updated in place by a later call under no_grad.
            with torch.inference_mode(False):
                result = sampler.sample(prompt_ids, prompt_mask, settings, graph=method == "graph")
            sampler.used = True
            return result
        except Exception as error:  # any failure at its first use; a later one is a real error
            if sampler.used:
                raise
            sampler.failed = True
            warnings.warn(f"the {method} sampler failed at its first use on this model ({type(error).__name__}: "
                          f"{error}); its responses are sampled the dynamic way from now on")
    return dynamic_sample(model, prompt_ids, prompt_mask, settings)


def end_ids(model, tokenizer):
    """Every id that ends a response: the tokenizer's eos and each eos id of the model's generation
    config (Llama 3 lists <|eot_id|> and <|end_of_text|>, Qwen2.5 <|im_end|> and <|endoftext|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return tuple(sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None}))


def choose_method(model, method, cuda):
    """The sampling method that runs: "auto" resolved, a static way refused (SamplerError) for a
    model it cannot run."""
    if method not in METHODS:
        raise SamplerError(f"unknown sampling method {method!r}: one of {', '.join(METHODS)}")
    refusal = StaticSampler.refusal(model)
    if method == "auto":
        return "graph" if cuda and refusal is None else "dynamic"
    if method != "dynamic" and refusal is not None:
        raise SamplerError(f"the {method} sampler cannot run this model: {refusal}; use the dynamic sampler "
                           "(--sampler dynamic, or auto)")
    if method == "graph" and not cuda:
        raise SamplerError("the graph sampler needs a CUDA device (CUDA graphs); on the CPU use static or dynamic")
    return method


def candidates(logits, settings):
    """The tokens that temperature, top-k and top-p leave, [B, k] ids (likeliest first), and their
    probabilities [B, k], 0 where top-p drops a token (not renormalised: the draws do not need it)."""
    k = logits.shape[-1] if settings.top_k <= 0 else min(settings.top_k, logits.shape[-1])
    top_logits, top_ids = (logits / settings.temperature).topk(k, dim=-1)  # sorted, largest first
    probs = top_logits.softmax(-1)
    # top-p: keep the smallest prefix whose probability reaches top_p (the first token always)
    return probs * ((probs.cumsum(-1) - probs) < settings.top_p), top_ids


def cache_argument(model):
    """The name of model.forward's KV-cache argument: `cache` from transformers 5.2x on,
    `past_key_values` before (still accepted later, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def dynamic_sample(model, prompt_ids, prompt_mask, settings):
    from transformers import DynamicCache

    ends = torch.tensor(settings.end_ids, dtype=torch.long, device=prompt_ids.device)
    cache = {cache_argument(model): DynamicCache(config=model.config)}
    positions = position_ids(prompt_mask)[:, -1:]
    attention_mask = prompt_mask
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=position_ids(prompt_mask),
                use_cache=True, **cache)
    finished = torch.zeros(prompt_ids.shape[0], 1, dtype=torch.bool, device=prompt_ids.device)
    tokens, response = [], []
    for step in range(settings.max_new_tokens):
        logits = out.logits[:, -1].float()
        if step < settings.min_new_tokens:
            logits[:, ends] = float("-inf")
        if settings.temperature <= 0:  # greedy
            token = logits.argmax(-1, keepdim=True)
        else:
            probs, top_ids = candidates(logits, settings)
            token = top_ids.gather(-1, torch.multinomial(probs, 1))
        token = torch.where(finished, torch.full_like(token, settings.pad_id), token)
        tokens.append(token)
        response.append(~finished)
        finished = finished | (token[..., None] == ends).any(-1)
        if step % 8 == 7 and bool(finished.all()):  # an occasional check: each one waits for the device
            break
        attention_mask = torch.cat([attention_mask, (~finished).long()], 1)
        positions = positions + 1
        out = model(input_ids=token, attention_mask=attention_mask, position_ids=positions, use_cache=True, **cache)
    response = torch.cat(response, 1).long()
    return (torch.cat([prompt_ids, torch.cat(tokens, 1)], 1), torch.cat([prompt_mask, response], 1),
            torch.cat([torch.zeros_like(prompt_mask), response], 1))


def linear_weights_in(model, dtype):
    """Store a model's Linear weights and biases in `dtype`, as new frozen parameters (a tied
    output layer gets a copy of its own; embeddings and norms stay as they are, and so does a
    weight already in `dtype`). Returns [(the new parameter, the one it replaced)].

    Exact under autocast to `dtype`: autocast casts a Linear's float32 weight to that dtype before
    each matmul anyway, so the forward computes the same bits, without casting every weight again
    at every forward. Casting the whole model instead would not be exact: the embeddings, norms
    and residual stream, which autocast keeps in float32, would be rounded too.
    """
    replaced = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for name in ("weight", "bias"):
                source = getattr(module, name)
                if source is not None and source.dtype != dtype:
                    copied = torch.nn.Parameter(source.detach().to(dtype), requires_grad=False)
                    setattr(module, name, copied)
                    replaced.append((copied, source))
    return replaced


_samplers = weakref.WeakKeyDictionary()  # model -> its StaticSampler, gone with the model


def static_sampler(model):
    """The model's StaticSampler (made on first use): its caches, buffers and CUDA graphs."""
    if model not in _samplers:
        _samplers[model] = StaticSampler(model)
    return _samplers[model]


def forget(model):
    """Drop the model's StaticSampler: its caches, shadow and CUDA graphs."""
    _samplers.pop(model, None)


def _bucket(n, step):
    return -(-n // step) * step


class StaticSampler:
    """The static way of `sample` for one model.

    Per bucket (batch rounded up to a power of two, prompt length up to a multiple of 64, and the
    sampling settings; the MAX_BUCKETS most recently used) it keeps a StaticCache, the decode
    loop's state as fixed tensors and, on CUDA, the captured decode step. Extra rows repeat the last prompt and are dropped; extra prompt
    columns are left padding, which the padding-independent positions make invisible.

    Under bfloat16 autocast the steps run a shadow of the model whose Linear weights are bfloat16
    copies, refreshed once per call, while every other parameter is the model's own: autocast
    casts a Linear's float32 weight to bfloat16 before the matmul anyway, so the numbers are the
    same bits, without the cast of every weight at every token.
    """

    PROMPT_BUCKET = 64
    MAX_BUCKETS = 8  # a long run meets many prompt lengths: the least recently used bucket goes first

    def __init__(self, model):
        self.model = weakref.ref(model)
        self.shadows = {}  # autocast dtype -> (shadow, [(its Linear copy, the model's parameter)])
        self.buckets = collections.OrderedDict()  # least recently used first
        self.capture_seconds = {}  # bucket -> seconds its CUDA graph took to warm up and capture
        self.used, self.failed = False, False  # ran once; failed at its first use (then: dynamic)

    @staticmethod
    def refusal(model):
        """Why the static way cannot run `model`, or None. Its mask covers every cached position:
        a sliding-window layer would attend beyond its window (and transformers gives such a layer
        a cache of the window's size, which the mask does not fit)."""
        config = model.config
        attention = getattr(config, "_attn_implementation", None)
        if attention not in ("sdpa", "eager"):
            return f"its attention implementation is {attention!r} (the static sampler runs sdpa and eager)"
        window, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
        if window is not None and (layer_types is None or "sliding_attention" in layer_types):
            return f"it has sliding-window attention (window {window})"
        return None

    def runner(self, device):
        """(module, dtype): the module the steps run, the model itself or, under autocast, its
        shadow for the autocast dtype."""
        model = self.model()
        if not torch.is_autocast_enabled(device.type):
            return model, None
        dtype = torch.get_autocast_dtype(device.type)
        if dtype not in self.shadows:
            # share every parameter and buffer with the model, then give the Linear layers copies
            memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
            shadow = copy.deepcopy(model, memo)
            self.shadows[dtype] = shadow, linear_weights_in(shadow, dtype)
        shadow, pairs = self.shadows[dtype]
        for copied, source in pairs:  # the model may have been updated since the last call
            copied.copy_(source)
        return shadow, dtype

    def sample(self, prompt_ids, prompt_mask, settings, graph):
        runner, dtype = self.runner(prompt_ids.device)
        n, length = prompt_ids.shape
        rows, columns = 1 << (n - 1).bit_length(), _bucket(length, self.PROMPT_BUCKET)
        key = (rows, columns, settings, dtype)
        if key not in self.buckets:
            self.buckets[key] = DecodeLoop(runner, rows, columns, settings, prompt_ids.device)
            if len(self.buckets) > self.MAX_BUCKETS:
                self.buckets.popitem(last=False)
        self.buckets.move_to_end(key)
        loop = self.buckets[key]
        ids = torch.full((rows, columns), settings.pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
        mask = torch.zeros((rows, columns), dtype=prompt_mask.dtype, device=prompt_mask.device)
        ids[:n, columns - length:], mask[:n, columns - length:] = prompt_ids, prompt_mask
        ids[n:], mask[n:] = ids[n - 1], mask[n - 1]
        loop.start(runner, ids, mask)
        if graph and loop.graph is None and not loop.capture_failed and settings.max_new_tokens > 1:
            try:
                self.capture_seconds[key] = loop.capture(runner)
            except RuntimeError as error:  # a model whose step a graph cannot hold: decode eagerly
                warnings.warn(f"the decode step could not be captured in a CUDA graph; it runs eagerly: {error}")
                loop.capture_failed = True
            loop.start(runner, ids, mask)  # warm-up ran the step: start over
        for _ in range(settings.max_new_tokens - 1):
            loop.graph.replay() if graph and loop.graph is not None else loop.step(runner)
        response = loop.response[:n]
        kept = int(response.sum(-1).max())  # the one wait for the device: where the longest response ends
        response = response[:, :kept].to(prompt_mask.dtype)
        return (torch.cat([prompt_ids, loop.tokens[:n, :kept].to(prompt_ids.dtype)], 1),
                torch.cat([prompt_mask, response], 1), torch.cat([torch.zeros_like(prompt_mask), response], 1))


def _values_in_their_own_dtype(layer):
    """A StaticCache layer's lazy_initialization that stores the values in their own dtype.

    Under autocast a Llama's keys come out of the rotary embedding in float32 and its values in
    bfloat16; transformers 5.17 allocates both in the keys' dtype, and the values' in-place copy
    into the cache then fails (5.24 allocates each in its own dtype: there this changes nothing).
    """
    allocate = layer.lazy_initialization

    def lazy_initialization(key_states, value_states):
        allocate(key_states, value_states)
        if layer.values.dtype != value_states.dtype:
            layer.values = torch.zeros_like(layer.values, dtype=value_states.dtype)

    return lazy_initialization


class DecodeLoop:
    """One bucket's static cache and decode state: `start` runs the prompt and draws the first
    token; each `step` (or replay of `graph`) feeds the last token and draws the next."""

    def __init__(self, runner, rows, columns, settings, device):
        from transformers import StaticCache

        self.settings, self.columns = settings, columns
        self.ends = torch.tensor(settings.end_ids, dtype=torch.long, device=device)
        self.cache = StaticCache(config=runner.config, max_cache_len=columns + settings.max_new_tokens)
        for layer in self.cache.layers:
            layer.lazy_initialization = _values_in_their_own_dtype(layer)
        self.cache_argument = cache_argument(runner)
        self.eager_mask = runner.config._attn_implementation == "eager"  # wants an additive mask
        self.keep_one = "logits_to_keep" in inspect.signature(runner.forward).parameters
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, 1, dtype=torch.bool, device=device)
        self.step_index = torch.zeros((), dtype=torch.long, device=device)
        self.key_mask = torch.zeros(rows, 1, 1, columns + settings.max_new_tokens, dtype=torch.bool, device=device)
        self.tokens = torch.zeros(rows, settings.max_new_tokens, dtype=torch.long, device=device)
        self.response = torch.zeros(rows, settings.max_new_tokens, dtype=torch.bool, device=device)
        self.graph, self.capture_failed = None, False

    def forward(self, runner, input_ids, mask, positions):
        if self.eager_mask:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        extra = {"logits_to_keep": 1} if self.keep_one else {}
        out = runner(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{self.cache_argument: self.cache}, **extra)
        return out.logits[:, -1].float()

    def start(self, runner, ids, mask):
        self.cache.reset()
        for state in (self.finished, self.step_index, self.tokens, self.response, self.key_mask):
            state.zero_()
        self.key_mask[:, 0, 0, :self.columns] = mask.bool()
        self.position.copy_(position_ids(mask)[:, -1:])
        # the prompt attends causally to its own real tokens (each position to itself too, so that
        # padding positions stay finite; no real token attends to them)
        causal = torch.ones(self.columns, self.key_mask.shape[-1], dtype=torch.bool, device=ids.device).tril()
        diagonal = torch.eye(self.columns, self.key_mask.shape[-1], dtype=torch.bool, device=ids.device)
        prompt_mask = (self.key_mask & causal) | diagonal
        self.draw(self.forward(runner, ids, prompt_mask, position_ids(mask)))

    def step(self, runner):
        self.draw(self.forward(runner, self.token, self.key_mask, self.position))

    def draw(self, logits):
        """The next token from [B, V] logits, written into the state (no host synchronisation)."""
        settings = self.settings
        # no end of a response before min_new_tokens
        ends = logits.index_select(1, self.ends)
        logits.index_copy_(1, self.ends, torch.where(self.step_index < settings.min_new_tokens, float("-inf"), ends))
        if settings.temperature <= 0:  # greedy
            token = logits.argmax(-1, keepdim=True)
        else:
            probs, top_ids = candidates(logits, settings)
            # the exponential race: token i wins with probability p_i / sum(p); a token that top-p
            # dropped (p = 0) never does, even against a noise of exactly 0
            race = torch.where(probs > 0, probs / torch.empty_like(probs).exponential_(), -1.0)
            token = top_ids.gather(-1, race.argmax(-1, keepdim=True))
        token = torch.where(self.finished, torch.full_like(token, settings.pad_id), token)
        at = self.step_index.reshape(1)
        self.tokens.index_copy_(1, at, token)
        self.response.index_copy_(1, at, ~self.finished)
        self.finished.logical_or_((token[..., None] == self.ends).any(-1))
        # the new token's key: attended to unless its row has ended (as the dynamic way's mask)
        self.key_mask.index_copy_(3, at + self.columns, (~self.finished)[:, :, None, None])
        self.token.copy_(token)
        self.position.add_(1)
        self.step_index.add_(1)

    def capture(self, runner):
        """Warm up the decode step on a side stream, then capture it; returns the seconds taken."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        autocast = dict(device_type="cuda", enabled=torch.is_autocast_enabled("cuda"),
                        dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.autocast(**autocast):
            for _ in range(2):
                self.step(runner)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.autocast(**autocast):
            self.step(runner)
        torch.cuda.synchronize()
        return time.perf_counter() - start
