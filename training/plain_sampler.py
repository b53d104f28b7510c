"""The plain ("dynamic") sampler, and the rules every sampler shares.

The responses sampled from a causal LM: the anchors of the triplet loss (Eq. 13) and the
evaluation's samples. Written out rather than calling generate(), because it runs at every TI-DPO
training step and its rules must be the same in every sampler (static_sampler.py builds on these):
temperature, then top-k, then top-p (on the k kept tokens only, which avoids a sort over the whole
vocabulary), at least min_new_tokens, and a response ends at any of the model's end ids. The KV
cache grows by a token per step; this is the CPU's sampler. sampling.py decides which one runs.
"""

import contextlib
import inspect
from typing import NamedTuple

import torch

from tidpo import position_ids



class Settings(NamedTuple):
    """One call's sampling rules (hashable: a static bucket is kept per settings)."""
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    end_ids: tuple  # a response ends at the first of these
    pad_id: int



@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode inside the block, then each of its modules back in the mode it had
    (module by module: train(True) on the whole model would also switch on the dropout of layers
    that were in eval mode inside it). A policy trained with activation checkpointing is in
    training mode, where transformers 5.17 (not 5.24) drops a checkpointed layer's KV cache, even
    without gradients."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training



def end_ids(model, tokenizer):
    """Every id that ends a response: the tokenizer's eos and each eos id of the model's generation
    config (Llama 3 lists <|eot_id|> and <|end_of_text|>, Qwen2.5 <|im_end|> and <|endoftext|>)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return tuple(sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None}))



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
    # a peft model's forward takes **kwargs and hands them to the model inside: that one decides
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def keeps_last_logits(model):
    """Whether model.forward takes logits_to_keep: with 1, the output layer runs on the last position
    alone ([B, 1, V] logits, where a prompt's whole [B, L, V] would be made only to be dropped)."""
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "logits_to_keep" in inspect.signature(forward).parameters


def dynamic_sample(model, prompt_ids, prompt_mask, settings):
    from transformers import DynamicCache

    ends = torch.tensor(settings.end_ids, dtype=torch.long, device=prompt_ids.device)
    cache = {cache_argument(model): DynamicCache(config=model.config)}
    positions = position_ids(prompt_mask)[:, -1:]
    attention_mask = prompt_mask
    last = {"logits_to_keep": 1} if keeps_last_logits(model) else {}  # peft passes it on too
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=position_ids(prompt_mask),
                use_cache=True, **cache, **last)
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


