"""Memory: activation checkpointing for the policy, and the formula for a step's peak memory.

    checkpoint_activations   the policy recomputes each layer's activations in the backward
    eval_mode                the policy out of training mode for a block (the sampler's cache)
    step_peak_bytes          what a step of DPO or full TI-DPO needs on a GPU, term by term

docs/training.md's "will it fit?" table comes from step_peak_bytes; bench.py prints it next to
the peak it measures.
"""

from contextlib import contextmanager

import torch


def checkpoint_activations(model):
    """Turn on transformers' activation checkpointing, non-reentrant, and put `model` in training
    mode (transformers checkpoints only there) with every dropout probability set to 0.

    Dropout at 0 keeps a training-mode forward exactly the eval-mode forward, so the attribution
    (Eq. 5-6) and the log-probs stay deterministic. Non-reentrant checkpointing lets the
    attribution's autograd.grad to the input embeddings and the loss's backward each recompute the
    layers they need from the same forward; the reentrant kind cannot run that first backward.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):  # attention dropout kept as a number
                setattr(module, name, 0.0)
    # transformers 5.24 renamed gradient_checkpointing_enable (deprecated there) to
    # activation_checkpointing_enable; both take the torch.utils.checkpoint arguments first.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.train()


@contextmanager
def eval_mode(model):
    """`model` in eval mode inside the block, then back in the mode it had.

    For the sampler: up to transformers 5.2x, a checkpointed layer in training mode drops the KV
    cache, even without gradients.
    """
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)
