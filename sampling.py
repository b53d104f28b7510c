"""Sampling responses from a causal LM: the anchors of the triplet loss (Eq. 13) and the
evaluation's samples.

Written out rather than calling generate(), because it runs at every TI-DPO training step: with
the KV cache, and top-p applied to the k kept tokens only, it avoids a sort over the whole
vocabulary and generate()'s per-token machinery.
"""

import torch

from tidpo import position_ids


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, tokenizer, args):
    """Responses sampled from `model` for left-padded prompts, as (input_ids, attention_mask,
    response_mask) of prompt + response; a response ends at its first end-of-sequence token.

    `args` carries the sampling settings: max_new_tokens, min_new_tokens, temperature (0: greedy),
    top_k (0: all) and top_p, applied in that order (temperature, then top-k, then top-p), as in
    transformers' generate(). `tokenizer` gives eos_token_id and pad_token_id.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    positions = position_ids(prompt_mask)[:, -1:]
    attention_mask = prompt_mask
    out = model(input_ids=prompt_ids, attention_mask=attention_mask, position_ids=position_ids(prompt_mask),
                use_cache=True)
    finished = torch.zeros(prompt_ids.shape[0], 1, dtype=torch.bool, device=prompt_ids.device)
    tokens, response = [], []
    for step in range(args.max_new_tokens):
        logits = out.logits[:, -1].float()
        if step < args.min_new_tokens:
            logits[:, eos] = float("-inf")
        if args.temperature <= 0:  # greedy
            token = logits.argmax(-1, keepdim=True)
        else:
            k = logits.shape[-1] if args.top_k <= 0 else min(args.top_k, logits.shape[-1])
            top_logits, top_ids = (logits / args.temperature).topk(k, dim=-1)  # sorted, largest first
            probs = top_logits.softmax(-1)
            # top-p: keep the smallest prefix whose probability reaches top_p (the first token always)
            probs = probs * ((probs.cumsum(-1) - probs) < args.top_p)
            token = top_ids.gather(-1, torch.multinomial(probs, 1))
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(token)
        response.append(~finished)
        finished = finished | (token == eos)
        if step % 8 == 7 and bool(finished.all()):  # an occasional check: each one waits for the device
            break
        attention_mask = torch.cat([attention_mask, (~finished).long()], 1)
        positions = positions + 1
        out = model(input_ids=token, attention_mask=attention_mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    response = torch.cat(response, 1).long()
    return (torch.cat([prompt_ids, torch.cat(tokens, 1)], 1), torch.cat([prompt_mask, response], 1),
            torch.cat([torch.zeros_like(prompt_mask), response], 1))
