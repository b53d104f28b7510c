"""--lora-r R: the policy trains LoRA adapters of rank R (Hugging Face peft), and the reference is the
same model with its adapters switched off, so that one copy of the weights serves both.

    wrap(policy, args)             the policy with adapters, and its Reference
    Reference(policy)              the policy's forward under no_grad with the adapters disabled
    is_lora(model)                 whether `model` carries adapters
    adapter_state, load_adapters   the adapters' weights alone (what a checkpoint holds)
    save(policy, tokenizer, ...)   policy/ as the merged model, adapter/ as the adapter alone

peft is imported only here and only when --lora-r is given: a plain run needs only torch,
transformers and tokenizers.

The adapters sit on every Linear layer of the decoder layers (peft's "all-linear": attention q, k,
v, o and the MLP's gate, up, down in Llama and Qwen2), not on the embeddings or the output layer.
lora_B starts at 0, so before the first update the policy is the reference exactly. Dropout is 0:
the attribution (Eq. 5-6) and the log-probs must be deterministic forwards, as without LoRA.
"""

import sys
import warnings

import torch

ALPHA_PER_RANK = 2  # lora_alpha = 2 R: the adapter's product is scaled by alpha / R = 2 at any rank
TARGETS = "all-linear"
ADAPTER = "default"  # peft's name for the one adapter


def is_lora(model):
    """Whether `model` is a peft model (without importing peft, which a plain run may lack)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def peft_installed():
    """Whether peft can be imported (setup.check_args asks before anything is loaded)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def wrap(policy, args):
    """(policy with LoRA adapters of rank args.lora_r, its Reference). Only the adapters train."""
    import peft

    config = peft.LoraConfig(r=args.lora_r, lora_alpha=ALPHA_PER_RANK * args.lora_r, lora_dropout=0.0,
                             target_modules=TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft 0.21 asks the model is_gradient_checkpointing, which transformers 5.2x deprecates in
        # favour of is_activation_checkpointing: peft's call, not one this project makes
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = peft.get_peft_model(policy, config)
    # A new PeftModel is in training mode around a base in eval mode; train.py keeps the policy in
    # eval mode (no dropout: the attribution and the log-probs are deterministic forwards), and a
    # sampler's eval_mode() must not find a training flag to restore onto every layer.
    wrapped.eval()
    # the built-in model has no folder that holds its base: a checkpoint keeps the base then
    return wrapped, Reference(wrapped, base_on_disk=args.model is not None)


class Reference:
    """pi_ref under LoRA: the policy's own weights with the adapters disabled (peft's
    disable_adapter), under no_grad. Called like the model (input_ids, attention_mask,
    position_ids, a KV cache) it returns the base model's output; every other attribute (config,
    generation_config, parameters, train/eval) is the policy's. modules() leaves the adapters
    out: memory.linear_weights_in(reference, bfloat16) then stores the frozen base's Linear weights
    in bfloat16 on CUDA and leaves the trained adapters in float32.

    `base_on_disk`: the base is --model's folder, read again on --resume, so no checkpoint holds it.
    """

    def __init__(self, policy, base_on_disk=False):
        self.policy, self.base_on_disk = policy, base_on_disk

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or name == "policy":  # copy and pickle look these up before __init__
            raise AttributeError(name)
        return getattr(self.policy, name)

    def modules(self):
        return (module for name, module in self.policy.named_modules() if ".lora_" not in name)

    def _base_tensors(self):
        """{name in the plain model: its tensor} of the base's weights and buffers."""
        base = self.policy.get_base_model()
        return {name.replace(".base_layer.", "."): tensor for name, tensor in base.state_dict(keep_vars=True).items()
                if ".lora_" not in name}

    def state_dict(self):
        """The base's weights under the plain model's names (what a checkpoint's reference.pt holds)."""
        return {name: tensor.detach() for name, tensor in self._base_tensors().items()}

    def load_state_dict(self, state_dict):
        own = self._base_tensors()
        check_names("the base model", own, state_dict)
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state_dict[name])


def check_names(what, own, given):
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def adapter_state(policy):
    """The adapters' weights (the trainable parameters), by name: what a checkpoint keeps of a LoRA
    policy, whose base weights are --model's (or, for the built-in model, reference.pt's)."""
    return {name: p.detach() for name, p in policy.named_parameters() if p.requires_grad}


def load_adapters(policy, state_dict):
    own = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    check_names("the adapters", own, state_dict)
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(state_dict[name])


def merged_state_dict(policy):
    """The plain model's state dict, float32 on the CPU, with each adapted weight W replaced by
    W + (alpha / R) B A: the model that computes what the policy computes, without peft."""
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    merged = {name: tensor.float().cpu() for name, tensor in Reference(policy).state_dict().items()}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                merged[f"{name}.weight"] = (weight.float() + module.get_delta_weight(ADAPTER).float()).cpu()
    if base.config.tie_word_embeddings:  # saved once, as the input embeddings (tied again on load)
        output = base.get_output_embeddings()
        merged.pop(next(name for name, module in base.named_modules() if module is output) + ".weight")
    return merged


def save(policy, tokenizer, folder, adapter_folder):
    """policy/ (`folder`): the merged model with its tokenizer, which AutoModelForCausalLM loads
    without peft; `adapter_folder`: the adapter alone, for peft.PeftModel.from_pretrained(base,
    adapter_folder) over --model."""
    base = policy.get_base_model()
    base.save_pretrained(folder, state_dict=merged_state_dict(policy))
    tokenizer.save_pretrained(folder)
    policy.save_pretrained(adapter_folder)
