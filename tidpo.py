"""TI-DPO: Token-Importance Guided Direct Preference Optimization.

Yang et al., ICLR 2026 (arXiv 2505.19653 v3). Equation numbers are that version's.

The file follows the paper's order:
    token_logps            per-token log-probabilities (the causal shift lives here)
    position_ids           positions that ignore padding, and forward_logits, a forward with them
    gradient_attribution   Eq. 5-6   token importance from the top logit's gradient, in two parts:
      target_gradient      Eq. 5     the top logit's gradient to the input embeddings
      importance_scores    Eq. 6     its L1 norm per response token
    gaussian_prior         Eq. 7     a bell over response positions
    hybrid_weights         Eq. 8     importance and prior mixed into per-token weights
    weighted_logratio      Eq. 11    one weighted sum of per-token log-ratios
    triplet_distance       Eq. 13    the squared distance of two responses' log-ratios, per token
    triplet_loss           Eq. 13    the anchor pulled to the chosen, pushed from the rejected
    sequence_kl            (release) TDPO2's sequential KL, optional
    tidpo_loss             Eq. 12-14 the objective; Eq. 3 (DPO) with weights 1 and gamma 0

Conventions. Per-token tensors are [B, L] and aligned with `input_ids`: entry [b, t] concerns
token input_ids[b, t]. `response_mask[b, t]` is 1 exactly on response tokens (prompt and
padding are 0). Every response must be one contiguous run of tokens that follows at least one
prompt token, so that each response token has a position that predicts it.

The loss functions take tensors only: they know nothing about models, tokenizers or devices.
They check what can be checked without waiting for the device (shapes, names, plain numbers) and
raise a ValueError that names the argument (check_shapes, check_logits: other code uses them too).
"""

import torch
import torch.nn.functional as F


def check_shapes(where, sizes, dims, **tensors):
    """A ValueError naming the first of `tensors` whose shape is not `dims` ("B, L": a name per
    dimension); a name already in `sizes` (shared by one call's checks) must keep its size. Sizes
    only: nothing here waits for the device. Arguments left as None are skipped. Returns sizes."""
    names = dims.split(", ")
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        expected = [sizes.get(n, n) for n in names]
        if tensor.dim() != len(names) or any(isinstance(e, int) and e != n
                                             for e, n in zip(expected, tensor.shape)):
            known = f" = [{', '.join(map(str, expected))}]" if expected != names else ""
            raise ValueError(f"{where}: {name} must have shape [{dims}]{known}, "
                             f"got {list(tensor.shape)}")
        sizes.update(zip(names, tensor.shape))
    return sizes


def check_logits(where, name, logits):
    """{"B": .., "L": .., "V": ..} of [B, L, V] float logits, or a ValueError: the logits fix the
    sizes of the other arguments, and a [B, L] tensor in their place would broadcast silently."""
    if not torch.is_tensor(logits) or logits.dim() != 3 or not logits.is_floating_point():
        what = (f"shape {list(logits.shape)}, dtype {logits.dtype}" if torch.is_tensor(logits)
                else type(logits).__name__)
        raise ValueError(f"{where}: {name} must be a [B, L, V] tensor of floats, got {what}")
    return dict(zip(("B", "L", "V"), logits.shape))


def at_least_float32(x):
    """x in float32 if it came in a 16-bit float (or as it is: float32, float64). bfloat16 sums over
    hundreds of tokens lose digits that decide the sign of a margin."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_logps(logits, input_ids, response_mask):
    """[B, L] log p(input_ids[b, t] | input_ids[b, <t]) where response_mask is 1, else 0, from a
    model's [B, L, V] logits on the [B, L] input_ids.

    A causal LM's logits at position t predict token t + 1, so token t is scored by the logits at
    t - 1. Shifting here, once, lets every other tensor in this file stay aligned with input_ids.
    Token 0 has no predicting position and always gets 0 (it is never a response token).
    The plain formula keeps float32 copies of the whole [B, L, V] for its backward;
    training/memory.py computes the same numbers in bounded memory (train.py uses that).
    """
    sizes = check_logits("token_logps", "logits", logits)
    check_shapes("token_logps", sizes, "B, L", input_ids=input_ids, response_mask=response_mask)
    # log p(token t) = log_softmax(logits at t - 1)[token t], in float32 at least
    logps = torch.log_softmax(at_least_float32(logits[:, :-1]), dim=-1)
    logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    logps = F.pad(logps, (1, 0))  # token t's score at index t; token 0 has no predicting position
    return torch.where(response_mask.bool(), logps, torch.zeros_like(logps))


def position_ids(attention_mask):
    """[B, L] positions that count real tokens only (0, 1, 2, ... from each row's first token),
    so that a left-padded row's numbers do not depend on how much padding sits in front of it."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_logits(model, input_ids, attention_mask):
    """[B, L, V] logits of a plain forward, with the padding-independent positions above."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask)).logits


def gradient_attribution(model, input_ids, attention_mask, response_mask):
    """Token importance by gradient attribution (Eq. 5-6), from ONE forward pass of `model`.

    model: a causal LM with `get_input_embeddings()` whose forward takes `input_ids`,
    `attention_mask` and `position_ids` (any transformers AutoModelForCausalLM); input_ids,
    attention_mask, response_mask: [B, L], padding left or right. Returns (logits, importance):
    the [B, L, V] logits, still in the autograd graph (when the model has trainable parameters), so
    the caller builds its loss from them without a second forward, and the [B, L] detached scores
    I_i >= 0 on response tokens, 0 elsewhere.
    """
    logits, grad, _ = target_gradient(model, input_ids, attention_mask, response_mask)
    return logits, importance_scores(grad, response_mask)


def target_gradient(model, input_ids, attention_mask, response_mask):
    """Eq. 5's target and its gradient with respect to the input embeddings, from one forward.

    Returns:
        logits: [B, L, V] as in gradient_attribution.
        grad: [B, L, E] dL_target / de_i for every position.
        embeddings: [B, L, E] the input embeddings e_i (detached; for variants beyond the paper).

    Rows are independent: the rows of a batch do not interact in a transformer, so the gradient of
    the sum of the rows' targets gives each row the gradient of its own target.
    """
    check_shapes("target_gradient", {}, "B, L", input_ids=input_ids,
                 attention_mask=attention_mask, response_mask=response_mask)
    # The embeddings e_i are taken as the embedding layer hands them on, inside the model's own
    # forward (a hook), not by calling the layer outside it: a sharded model (FSDP) gathers its
    # weights only inside its forward.
    captured = []

    def keep(layer, inputs, embeddings):
        if not embeddings.requires_grad:  # a frozen model: attribute anyway, to its inputs
            embeddings = embeddings.detach().requires_grad_(True)
        captured.append(embeddings)
        return embeddings

    hook = model.get_input_embeddings().register_forward_hook(keep)
    try:
        logits = forward_logits(model, input_ids, attention_mask)
    finally:
        hook.remove()
    embeddings = captured[0]  # the input embeddings, [B, L, E]

    # The logits at the last response token predict what follows the whole response.
    last = last_response_position(response_mask)
    final_logits = logits[torch.arange(input_ids.shape[0], device=input_ids.device), last]
    # Eq. 5: L_target = max_v logits[last response position, v]
    target = final_logits.max(dim=-1).values.sum()
    # Backward to the embeddings only (not to the weights); keep the graph for the training loss.
    (grad,) = torch.autograd.grad(target, embeddings, retain_graph=logits.requires_grad)
    return logits, grad, embeddings.detach()


def importance_scores(grad, response_mask):
    """[B, L] detached scores I_i (Eq. 6) from target_gradient's gradient [B, L, E]; only
    response tokens keep a score, prompt and padding positions are 0."""
    sizes = check_shapes("importance_scores", {}, "B, L, E", grad=grad)
    check_shapes("importance_scores", sizes, "B, L", response_mask=response_mask)
    # Eq. 6: I_i = || dL_target / de_i ||_1, over the embedding dimension
    importance = at_least_float32(grad).abs().sum(dim=-1)
    return torch.where(response_mask.bool(), importance, torch.zeros_like(importance)).detach()


def last_response_position(response_mask):
    """[B] index of each row's last response token (the response is one contiguous run)."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device)
    return (response_mask * positions).argmax(dim=-1)


def _gaussian(position, length):
    # Eq. 7: P_prior(t) = exp(-0.5 * ((t - mu) / sigma)^2), mu = (T - 1) / 2, sigma = T / 4
    # (the paper's sigma; the authors' release uses max(1, n / 8) over prompt and response)
    mu = (length - 1) / 2
    sigma = length / 4
    return torch.exp(-0.5 * ((position - mu) / sigma) ** 2)


def gaussian_prior(length, dtype=torch.float32, device=None):
    """Gaussian position prior (Eq. 7), unnormalized: [length], peak 1 in the middle, against the
    U-shaped position bias of LMs ("lost in the middle"). T = 5: [0.278, 0.726, 1, 0.726, 0.278]."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"gaussian_prior: length must be a whole number >= 1, got {length!r}")
    positions = torch.arange(length, dtype=dtype, device=device)
    return _gaussian(positions, torch.tensor(float(length), dtype=dtype, device=device))


def hybrid_weights(importance, response_mask, lam=0.7, scale="mean"):
    """Hybrid token weights (Eq. 8), one row's response at a time.

    Args:
        importance: [B, L] attribution scores I_i (from gradient_attribution), >= 0.
        response_mask: [B, L] 1 on each row's response (one contiguous run per row).
        lam: lambda of Eq. 8 in [0, 1], the share of the attribution; 1 - lam goes to the prior.
        scale: "mean" -> weights average 1 over the response (uniform weights reproduce DPO, and
            beta keeps its usual meaning); "sum" -> Eq. 8 as written, weights sum to 1.

    Returns [B, L] weights, 0 off the response; the prior alone where a row's importance sums to
    0 (no usable attribution); all 0 for a row without response tokens (not checked: that would
    wait for the device).
    """
    if scale not in ("mean", "sum"):
        raise ValueError(f"hybrid_weights: scale must be 'mean' or 'sum', got {scale!r}")
    if not 0 <= lam <= 1:  # outside [0, 1] one of the two shares is negative, and so are weights
        raise ValueError(f"hybrid_weights: lam must be in [0, 1], got {lam!r}")
    check_shapes("hybrid_weights", {}, "B, L", importance=importance, response_mask=response_mask)
    mask = response_mask.to(at_least_float32(importance).dtype)
    importance = importance.to(mask.dtype) * mask
    length = mask.sum(dim=-1, keepdim=True)  # T of each row
    position = (mask.cumsum(dim=-1) - 1) * mask  # t = 0 .. T-1 along the response
    prior = _gaussian(position, length.clamp(min=1)) * mask  # Eq. 7, per row

    # Eq. 8: I_norm = I / sum(I),  P_norm = P_prior / sum(P_prior)
    importance_total = importance.sum(dim=-1, keepdim=True)
    importance_norm = importance / importance_total.clamp(min=torch.finfo(mask.dtype).tiny)
    prior_norm = prior / prior.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(mask.dtype).tiny)
    # Eq. 8: W = lambda * I_norm + (1 - lambda) * P_norm
    weights = lam * importance_norm + (1 - lam) * prior_norm
    weights = torch.where(importance_total > 0, weights, prior_norm)
    return weights * length if scale == "mean" else weights


def weighted_logratio(policy_logps, ref_logps, weights):
    """[B] one of the two sums of Eq. 11, sum_t w_t * (log pi_theta(y_t) - log pi_ref(y_t)), from
    [B, L] token_logps of both models and [B, L] weights (all ones: the plain DPO sum)."""
    check_shapes("weighted_logratio", {}, "B, L", policy_logps=policy_logps,
                 ref_logps=ref_logps, weights=weights)
    policy_logps, ref_logps = at_least_float32(policy_logps), at_least_float32(ref_logps)
    # Eq. 11 (one side): sum_t w_t * lr_t,  lr_t = log pi_theta(y_t | x, y_<t) - log pi_ref(...)
    return (weights.to(policy_logps.dtype) * (policy_logps - ref_logps)).sum(dim=-1)


def _left_aligned(logratios, mask, width):
    # [B, width] each row's response entries moved to the front, in order (t = 0, 1, ...), with a
    # matching mask; padding may sit on either side of the response, and L may be below `width`.
    order = torch.argsort((mask == 0).to(torch.int8), dim=-1, stable=True)  # response tokens first
    values = torch.where(mask.bool(), logratios, torch.zeros_like(logratios)).gather(-1, order)
    on = mask.gather(-1, order).to(values.dtype)
    return F.pad(values, (0, width - values.shape[-1])), F.pad(on, (0, width - on.shape[-1]))


def triplet_distance(anchor_logratios, anchor_mask, other_logratios, other_mask):
    """[B] the squared distance of Eq. 13 between an anchor and another response, token by token,
    from [B, L_a] and [B, L_o] unweighted per-token log-ratios (any value off the response) and
    their masks (1 on each row's response tokens). The two responses are aligned by position from
    each one's first token, and only the positions both have count: the longer response's tail
    adds nothing (as the authors' code does).
    """
    width = max(anchor_logratios.shape[-1], other_logratios.shape[-1])
    anchor, anchor_on = _left_aligned(at_least_float32(anchor_logratios), anchor_mask, width)
    other, other_on = _left_aligned(at_least_float32(other_logratios), other_mask, width)
    # Eq. 13's distance (token by token, as the gradient appendix's Eq. 34 writes it):
    # D(y, y') = sum_{t < min(T_y, T_y')} (a_t - o_t)^2
    return ((anchor - other) ** 2 * anchor_on * other_on).sum(dim=-1)


def triplet_loss(anchor_logratios, anchor_mask, chosen_logratios, chosen_mask,
                 rejected_logratios, rejected_mask, margin):
    """[B] the triplet loss (Eq. 13), max(0, D(y, y_w) - D(y, y_l) + alpha), with the per-token
    distances D of triplet_distance (as the paper's gradient, Eq. 34, writes them). The anchor y,
    sampled from the current policy for the same prompt, is pulled towards the chosen response and
    pushed from the rejected one, by at least `margin` (alpha); all three carry gradient. The
    unweighted log-ratios are [B, L_a], [B, L_w], [B, L_l], each with its mask (1 on the response).
    """
    sizes = {}  # one row per pair in each; each response's own length
    check_shapes("triplet_loss", sizes, "B, L_a", anchor_logratios=anchor_logratios,
                 anchor_mask=anchor_mask)
    check_shapes("triplet_loss", sizes, "B, L_w", chosen_logratios=chosen_logratios,
                 chosen_mask=chosen_mask)
    check_shapes("triplet_loss", sizes, "B, L_l", rejected_logratios=rejected_logratios,
                 rejected_mask=rejected_mask)
    to_chosen = triplet_distance(anchor_logratios, anchor_mask, chosen_logratios, chosen_mask)
    to_rejected = triplet_distance(anchor_logratios, anchor_mask, rejected_logratios, rejected_mask)
    # Eq. 13: L_triplet = max(0, D(y, y_w) - D(y, y_l) + alpha)
    return torch.clamp(to_chosen - to_rejected + margin, min=0)


def sequence_kl(policy_logits, ref_logits, response_mask):
    """TDPO2's sequential KL, from the authors' release (not in Eq. 14; off unless kl_alpha != 0),
    which builds on TDPO (Zeng et al., 2024) and adds it to the preference margin: Delta_r_token
    - a_kl * (KL(y_l) - stopgrad(KL(y_w))). With a_kl = 0 the loss is Eq. 12.

    Returns [B]: over the response tokens t, the sum of KL(pi_ref(. | x, y_<t) || pi_theta(. | x,
    y_<t)), from the [B, L, V] logits of both models on the same input_ids (those at t - 1
    predict token t). training/memory.py has the same in bounded memory.
    """
    sizes = check_logits("sequence_kl", "policy_logits", policy_logits)
    check_shapes("sequence_kl", sizes, "B, L, V", ref_logits=ref_logits)
    check_shapes("sequence_kl", sizes, "B, L", response_mask=response_mask)
    dtype = torch.promote_types(at_least_float32(policy_logits).dtype, ref_logits.dtype)
    policy_logps = torch.log_softmax(policy_logits.to(dtype), dim=-1)
    ref_logps = torch.log_softmax(ref_logits.to(dtype), dim=-1)
    # KL(p_ref || p_theta) = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)), at each position t; the
    # distributions at t predict token t + 1, so they count where token t + 1 is a response token
    kl = (ref_logps.exp() * (ref_logps - policy_logps)).sum(dim=-1)
    return (kl[:, :-1] * response_mask[:, 1:].to(kl.dtype)).sum(dim=-1)


def tidpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               chosen_weights, rejected_weights, beta=0.1, anchor_logratios=None, anchor_mask=None,
               chosen_mask=None, rejected_mask=None, gamma=0.1, margin=0.01, kl_chosen=None,
               kl_rejected=None, kl_alpha=0.0, triplet=triplet_loss):
    """The TI-DPO objective (Eq. 14 = Eq. 12 + gamma * Eq. 13), averaged over the batch.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B, L] token_logps of pi_theta on y_w, y_l.
        ref_chosen_logps, ref_rejected_logps: [B, L] the same for pi_ref (no gradient needed).
        chosen_weights, rejected_weights: [B, L] hybrid_weights w^w_t and w^l_t (constants).
        beta: inverse temperature of the preference margin; gamma: weight of the triplet term.
        anchor_logratios, anchor_mask: [B, L_a] per-token log-ratios of a response sampled from
            pi_theta for the same prompt (with gradient) and its mask, or None: no triplet term.
            With an anchor, chosen_mask and rejected_mask ([B, L], 1 on response tokens) too.
        margin: alpha of Eq. 13 (0.01 as in the authors' release; the paper gives no value).
        kl_chosen, kl_rejected: [B] sequence_kl of y_w and y_l, used only when kl_alpha != 0,
            the weight of TDPO2's sequential KL (the paper's reported runs: 0.5; Eq. 14: 0).
        triplet: the function of Eq. 13 (triplet_loss); a hook for variants beyond the paper.

    Returns:
        loss: scalar.
        metrics: detached 0-dim tensors (no host sync), batch means, named as in TRL where TRL
            has them: rewards/chosen, rewards/rejected (beta times Eq. 11's weighted log-ratios),
            rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (summed policy
            log-probs), loss/dpo_w (Eq. 12), loss/triplet (Eq. 13), loss/kl (with kl_alpha), and
            with an anchor those of triplet_metrics.

    With all weights 1, no anchor (or gamma 0) and kl_alpha 0, this is DPO (Eq. 3). The chosen and
    rejected tensors may have different lengths L; each side's weights and mask match its log-probs.
    """
    with_triplet = anchor_logratios is not None and gamma != 0
    _check_loss_inputs(locals(), with_triplet)  # every argument's shape, by its name
    chosen_weighted = weighted_logratio(policy_chosen_logps, ref_chosen_logps, chosen_weights)
    rejected_weighted = weighted_logratio(policy_rejected_logps, ref_rejected_logps,
                                          rejected_weights)
    # Eq. 11: Delta_r_token = sum_t w^w_t lr_t(y_w) - sum_t w^l_t lr_t(y_l)
    delta = chosen_weighted - rejected_weighted
    if kl_alpha != 0:
        # The authors' release: Delta - a_kl * (KL_{y_l} - stopgrad(KL_{y_w}))
        delta = delta - kl_alpha * (kl_rejected - kl_chosen.detach())
    # Eq. 12: L_DPO-w = -log sigmoid(beta * Delta_r_token)
    dpo_w = -F.logsigmoid(beta * delta)

    metrics = {}
    triplet_term = torch.zeros_like(dpo_w)
    if with_triplet:
        # The triplet compares the UNWEIGHTED per-token log-ratios of the three responses.
        chosen = at_least_float32(policy_chosen_logps) - ref_chosen_logps, chosen_mask
        rejected = at_least_float32(policy_rejected_logps) - ref_rejected_logps, rejected_mask
        triplet_term = triplet(anchor_logratios, anchor_mask, *chosen, *rejected, margin)
        metrics = triplet_metrics((anchor_logratios, anchor_mask), chosen, rejected, triplet_term)
    # Eq. 14: L_TI-DPO = L_DPO-w + gamma * L_triplet, batch mean
    loss = (dpo_w + gamma * triplet_term).mean()

    with torch.no_grad():
        chosen_rewards, rejected_rewards = beta * chosen_weighted, beta * rejected_weighted
        metrics.update({
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": at_least_float32(policy_chosen_logps).sum(dim=-1).mean(),
            "logps/rejected": at_least_float32(policy_rejected_logps).sum(dim=-1).mean(),
            "loss/dpo_w": dpo_w.mean(),
            "loss/triplet": triplet_term.mean(),
        })
        if kl_alpha != 0:  # in loss/dpo_w; apart, so that a bad KL can be told from a bad margin
            metrics["loss/kl"] = (kl_alpha * (kl_rejected - kl_chosen)).mean()
    return loss, {name: value.detach() for name, value in metrics.items()}


def _check_loss_inputs(args, with_triplet):
    # tidpo_loss's arguments by name: one row per pair in each (a [B, L] KL would broadcast into a
    # [B, L] loss), each side's tensors of one length, and what the triplet and the KL term need.
    needed = ["anchor_mask", "chosen_mask", "rejected_mask"] * with_triplet
    needed += ["kl_chosen", "kl_rejected"] * (args["kl_alpha"] != 0)
    for name in needed:
        if args[name] is None:
            raise ValueError(f"tidpo_loss: {name} is needed (the triplet: an anchor and gamma "
                             "!= 0; the KL term: kl_alpha != 0)")
    sizes, groups = {}, [
        ("B, L_w", "policy_chosen_logps ref_chosen_logps chosen_weights chosen_mask"),
        ("B, L_l", "policy_rejected_logps ref_rejected_logps rejected_weights rejected_mask"),
        ("B", "kl_chosen kl_rejected"), ("B, L_a", "anchor_logratios anchor_mask" * with_triplet)]
    for dims, names in groups:
        check_shapes("tidpo_loss", sizes, dims, **{name: args[name] for name in names.split()})


def triplet_metrics(anchor, chosen, rejected, triplet_term):
    """tidpo_loss's triplet diagnostics, from (log-ratios, mask) of the three responses and the
    [B] triplet term: triplet/distance_chosen and _rejected (D(y, y_w), D(y, y_l)), triplet/active
    (the share of pairs with an anchor whose hinge is active), and where the anchor sits, each
    response's summed unweighted log-ratio (triplet/logratio_anchor, _chosen, _rejected)."""
    with torch.no_grad():
        metrics = {"triplet/distance_chosen": triplet_distance(*anchor, *chosen).mean(),
                   "triplet/distance_rejected": triplet_distance(*anchor, *rejected).mean(),
                   # an empty anchor (no tokens) leaves only the margin: no hinge acts on it
                   "triplet/active": ((triplet_term > 0) & anchor[1].bool().any(-1)).float().mean()}
        for name, (logratios, mask) in zip(("anchor", "chosen", "rejected"),
                                           (anchor, chosen, rejected)):
            summed = torch.where(mask.bool(), at_least_float32(logratios), 0.0).sum(dim=-1)
            metrics[f"triplet/logratio_{name}"] = summed.mean()
    return metrics
