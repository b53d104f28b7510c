"""Which sampler runs, and the one call every caller makes: sample().

Two samplers draw the same responses in distribution: plain_sampler.py's plain way ("dynamic": the
KV cache grows by a token per step), the CPU's default, and static_sampler.py's fast way for CUDA
(a fixed-size cache and a decode step captured in a CUDA graph), chosen with method "static" or
"graph" (--sampler), and by "auto" on CUDA where the model allows it.
"""

import torch

from training import static_sampler
from training.plain_sampler import Settings, dynamic_sample, end_ids, eval_mode

METHODS = ("auto", "dynamic", "static", "graph")


class SamplerError(ValueError):
    """A sampling method that cannot run this model; the message says why and what to use instead."""


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
    settings = Settings(max_new_tokens, min_new_tokens, temperature, top_k, top_p, end_ids(model, tokenizer),
                        tokenizer.pad_token_id)
    with eval_mode(model):
        method = choose_method(model, method, prompt_ids.is_cuda)
        if method != "dynamic":
            result = static_sampler.sample(model, prompt_ids, prompt_mask, settings, graph=method == "graph")
            if result is not None:  # None: it failed at its first use on this model, and warned
                return result
        return dynamic_sample(model, prompt_ids, prompt_mask, settings)


def options(args):
    """sample()'s keyword arguments from train.py's flags (and a minimum length where the caller
    set one: tools/bench.py samples full-length anchors)."""
    return dict(max_new_tokens=args.max_new_tokens, min_new_tokens=getattr(args, "min_new_tokens", 0),
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, method=args.sampler)


def choose_method(model, method, cuda):
    """The sampling method that runs: "auto" resolved, a static way refused (SamplerError) for a
    model it cannot run."""
    if method not in METHODS:
        raise SamplerError(f"unknown sampling method {method!r}: one of {', '.join(METHODS)}")
    refusal = static_sampler.refusal(model)
    if method == "auto":
        return "graph" if cuda and refusal is None else "dynamic"
    if method != "dynamic" and refusal is not None:
        raise SamplerError(f"the {method} sampler cannot run this model: {refusal}; use the dynamic sampler "
                           "(--sampler dynamic, or auto)")
    if method == "graph" and not cuda:
        raise SamplerError("the graph sampler needs a CUDA device (CUDA graphs); on the CPU use static or dynamic")
    return method
