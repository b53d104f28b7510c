"""The fast sampler: a static KV cache and, on CUDA, a decode step captured in a CUDA graph.

Built on plain_sampler.py's rules (candidates, the end ids), with the same results in distribution
as its plain way (tests/test_sampling.py compares the two); sampling.py runs it for --sampler
static|graph, and for "auto" on CUDA.

A KV cache of fixed size, one fixed-shape decode step, and a wait for the device only every 8
steps (to stop once every response has ended). On CUDA ("graph", the default there) that step is captured once in a
CUDA graph per (batch, prompt length) bucket and replayed: a decode step of a 24-layer model is
hundreds of small kernels, and launching them one by one from Python takes longer than running
them. Runs on the CPU too, without the graph ("static"). Not for models with sliding-window
attention (Mistral, Gemma 2 and 3) nor sharded ones (--fsdp): "auto" samples those the dynamic
way, and "static" or "graph" refuse them (refusal).

The static way draws a token by the exponential race, argmax(p / E) with E ~ Exp(1) per token,
which picks token i with probability p_i / sum(p) exactly (the smallest of independent
exponentials with rates p_i is the i-th with that probability). torch.multinomial draws one
sample the same way, but first checks its input with two host synchronisations (.item()), which
a CUDA graph cannot hold. The dynamic way keeps torch.multinomial, so the CPU's random draws are
those of earlier versions.
"""

import collections
import copy
import time
import warnings
import weakref

import torch

from tidpo import position_ids
from training.memory import linear_weights_in
from training.plain_sampler import cache_argument, candidates, keeps_last_logits


def refusal(model):
    """Why the static way cannot run `model`, or None. Its mask covers every cached position:
    a sliding-window layer would attend beyond its window (and transformers gives such a layer
    a cache of the window's size, which the mask does not fit). A sharded model (--fsdp): FSDP2
    frees its gathered weights at every reshard and gathers them into new storage, so a CUDA graph
    captured over them would read freed memory, and the bfloat16 shadow needs whole weights."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return "its weights are sharded (--fsdp): a CUDA graph would keep pointers to storage FSDP frees"
    config = model.config
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"its attention implementation is {attention!r} (the static sampler runs sdpa and eager)"
    window, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if window is not None and (layer_types is None or "sliding_attention" in layer_types):
        return f"it has sliding-window attention (window {window})"
    return None


_samplers = weakref.WeakKeyDictionary()  # model -> its StaticSampler, gone with the model


def sample(model, prompt_ids, prompt_mask, settings, graph):
    """sampling.sample's result the static way, or None if the static way failed at its first use
    for this model (it warns once, and `model` is sampled the dynamic way from then on)."""
    sampler = static_sampler(model)
    if sampler.failed:
        return None
    try:
        # Outside inference mode even when called inside it: a bucket's tensors made there could
        # not be updated in place by a later call under no_grad.
        with torch.inference_mode(False):
            result = sampler.sample(prompt_ids, prompt_mask, settings, graph=graph)
        sampler.used = True
        return result
    except Exception as error:  # any failure at its first use; a later one is a real error
        if sampler.used:
            raise
        sampler.failed = True
        warnings.warn(f"the {'graph' if graph else 'static'} sampler failed at its first use on this model "
                      f"({type(error).__name__}: {error}); its responses are sampled the dynamic way from now on")
        return None


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
    loop's state as fixed tensors and, on CUDA, the captured decode step. Extra rows repeat the last
    prompt and are dropped; extra prompt columns are left padding, which the padding-independent
    positions make invisible.

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
        if graph and loop.graph is None and not loop.capture_failed and settings.max_new_tokens > 1:
            # The warm-up draws tokens too. The random stream is left as it was found, so that a
            # bucket's first call draws what a later one draws: a resumed run (no buckets yet) the
            # anchors of the run it continues, and a cold model the evaluation's common numbers.
            state = random_state(prompt_ids.device)
            loop.start(runner, ids, mask)
            try:
                self.capture_seconds[key] = loop.capture(runner)
            except RuntimeError as error:  # a model whose step a graph cannot hold: decode eagerly
                warnings.warn(f"the decode step could not be captured in a CUDA graph; it runs eagerly: {error}")
                loop.capture_failed = True
            set_random_state(prompt_ids.device, state)
        loop.start(runner, ids, mask)
        for step in range(settings.max_new_tokens - 1):
            loop.graph.replay() if graph and loop.graph is not None else loop.step(runner)
            # every 8 steps, one wait for the device: stop once every response has ended
            if step % 8 == 7 and bool(loop.finished[:n].all()):
                break
        response = loop.response[:n]
        kept = int(response.sum(-1).max())  # the one wait for the device: where the longest response ends
        response = response[:, :kept].to(prompt_mask.dtype)
        return (torch.cat([prompt_ids, loop.tokens[:n, :kept].to(prompt_ids.dtype)], 1),
                torch.cat([prompt_mask, response], 1), torch.cat([torch.zeros_like(prompt_mask), response], 1))


def random_state(device):
    """The state of the generator that sampling on `device` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_random_state(device, state):
    torch.cuda.set_rng_state(state, device) if device.type == "cuda" else torch.set_rng_state(state)


def _values_in_their_own_dtype(layer):
    """A StaticCache layer's lazy_initialization that stores the values in their own dtype.

    Under autocast a Llama's keys come out of the rotary embedding in float32 and its values in
    bfloat16; transformers 5.17 allocates both in the keys' dtype, and the values' in-place copy
    into the cache then fails (5.24 allocates each in its own dtype: there this changes nothing).
    The function holds the layer by a weak reference: set as the layer's own attribute, a strong
    one would make a cycle, and an evicted bucket's cache would wait for the garbage collector.
    """
    allocate = type(layer).lazy_initialization  # the class's function: no reference to the layer
    owner = weakref.ref(layer)

    def lazy_initialization(key_states, value_states):
        layer = owner()
        allocate(layer, key_states, value_states)
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
        self.keep_one = keeps_last_logits(runner)
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
