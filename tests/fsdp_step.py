"""One TI-DPO step sharded with FSDP2 against the same step in one process (run by test_fsdp.py
under torchrun). Prints one JSON line on rank 0: for every parameter of the policy, whether its
sharded gradient exists and how far it is from the one-process gradient; the bytes rank 0 holds
of the weights, gradients, AdamW moments and reference after an optimizer step; and the sampling
method that training.sampling chooses for the sharded model as if on CUDA.

    torchrun --nproc_per_node=2 tests/fsdp_step.py tied|untied [--gradient-checkpointing]

With "accumulation", steps of 2 micro-batches as train_loop runs them (--grad-accum 2): the
gradient elements each process holds after each micro-batch, with the loop's gradient sync and
with FSDP2's sync off until the last micro-batch; with --measure, each step's peak resident
memory against a step of one micro-batch, in the same process (Linux).

    torchrun --nproc_per_node=2 tests/fsdp_step.py accumulation HIDDEN LAYERS [--measure]
"""

import contextlib
import copy
import json
import resource
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from training import distributed  # noqa: E402
from training import memory  # noqa: E402
from training import sampling  # noqa: E402
import train  # noqa: E402
from training import setup  # noqa: E402


def main(kind, checkpointing):
    flags = ["--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", "--fsdp", "--batch-size", "4"]
    args = train.parse_args(flags)
    rank, world_size, device = distributed.setup(torch.device("cpu"), fsdp=True)
    tokenizer = setup.load_tokenizer(args)
    pairs = setup.load_pairs(args, tokenizer)[0][:4]
    batch = data.collate(pairs, tokenizer.pad_token_id)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=kind == "tied",
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a reference apart from the policy, so that the log-ratios are not 0
        ref_weights = {name: value + 0.01 * torch.randn_like(value) for name, value in policy.state_dict().items()}

    # one process, the whole batch
    alone = copy.deepcopy(policy)
    alone_ref = copy.deepcopy(policy).requires_grad_(False)
    alone_ref.load_state_dict(ref_weights)
    undo = memory.checkpoint_activations(alone) if checkpointing else None
    loss, _ = train.tidpo_step(alone, alone_ref, batch, tokenizer, args, device, contextlib.nullcontext())
    loss.backward()
    expected = {name: p.grad for name, p in alone.named_parameters()}

    # sharded, each process its share of the batch (as train_loop weights it)
    sharded, ref = distributed.fsdp(policy, device, bf16=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(ref, dict(ref_weights), options=StateDictOptions(full_state_dict=True))
    if checkpointing:
        memory.checkpoint_activations(sharded)
    part, share = distributed.shard(batch, rank, world_size)
    loss, _ = train.tidpo_step(sharded, ref, part, tokenizer, args, device, contextlib.nullcontext())
    (loss * share * world_size).backward()
    report = {}
    for name, p in sharded.named_parameters():
        grad = None if p.grad is None else p.grad.full_tensor()
        report[name] = {"has_grad": grad is not None,
                        "expected_norm": expected[name].norm().item(),
                        "max_diff": None if grad is None else (grad - expected[name]).abs().max().item()}
    # what this process holds: its shards of the weights, gradients, AdamW's moments, the reference
    optimizer = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    optimizer.step()

    def local_bytes(tensors):  # a parameter left gathered counts whole
        return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)

    held = {"weights": local_bytes(sharded.parameters()),
            "gradients": local_bytes(p.grad for p in sharded.parameters()),
            "adamw": local_bytes(v for state in optimizer.state.values() for v in state.values() if v.dim() > 0),
            "reference": local_bytes(ref.parameters())}
    # the sampler of a sharded model, as the run would choose it on CUDA
    choices = {"auto": sampling.choose_method(sharded, "auto", cuda=True)}
    for method in ("static", "graph"):
        try:
            choices[method] = sampling.choose_method(sharded, method, cuda=True)
        except sampling.SamplerError as error:
            choices[method] = f"refused: {error}"
    if rank == 0:
        print(json.dumps({"loss": loss.item(), "params": report, "held": held, "config": shape_of(config),
                          "sampler": choices}))
    del undo


def shape_of(config):
    return {name: getattr(config, name) for name in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_hidden_layers", "num_attention_heads",
                                                     "num_key_value_heads", "tie_word_embeddings")}


def held_gradient_elements(model):
    """The gradient elements this process holds for a sharded model: its shards' gradients and
    every whole (unsharded) gradient FSDP2 keeps between backwards (FSDP2's own fields)."""
    count = 0
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if distributed.is_sharded(module) else None
        for param in group.fsdp_params if group else ():
            if param.sharded_param.grad is not None:
                count += param.sharded_param.grad.to_local().numel()
            if param.unsharded_accumulated_grad is not None:
                count += param.unsharded_accumulated_grad.numel()
            elif hasattr(param, "_unsharded_param") and param._unsharded_param.grad is not None:
                count += param._unsharded_param.grad.numel()
    return count


def resident_bytes(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def step_peak_growth(run):
    """How far this process's resident memory rose above its level before `run()`, at its peak:
    freed memory handed back to the system first (glibc's malloc_trim), the kernel's peak reset
    (writing 5 to /proc/self/clear_refs)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = resident_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    run()
    return resident_bytes("VmHWM") - before


def accumulation(hidden, layers, measure):
    """Steps as train_loop runs them on a tied Llama of `hidden` and `layers`, micro-batches of 4
    pairs: the gradient elements held after each micro-batch of a step of 2, with train_loop's
    gradient sync (distributed.sync_unless, "sync") and with FSDP2's sync off for all but the last
    micro-batch ("nosync"). With `measure`, also each step's peak resident memory above its start
    (step_peak_growth, Linux), for one micro-batch alone (each of the two) and for the two in one
    step, both ways: the two sides compared in one process."""
    flags = ["--temperature", "0", "--max-new-tokens", "4", "--device", "cpu", "--fsdp", "--batch-size", "4"]
    args = train.parse_args(flags)
    rank, world_size, device = distributed.setup(torch.device("cpu"), fsdp=True)
    tokenizer = setup.load_tokenizer(args)
    pairs = setup.load_pairs(args, tokenizer)[0][:8]
    micro_batches = [data.collate(pairs[:4], tokenizer.pad_token_id), data.collate(pairs[4:], tokenizer.pad_token_id)]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    policy, ref = distributed.fsdp(LlamaForCausalLM(config).eval(), device, bf16=False)
    held = {}

    def step(way, batches):
        held[way] = []
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            if way == "sync":
                distributed.sync_unless(policy, world_size, last)
            else:  # what FSDP2 does with gradient sync off until the step's last micro-batch
                policy.set_requires_gradient_sync(last)
            part, share = distributed.shard(batch, rank, world_size)
            loss, _ = train.tidpo_step(policy, ref, part, tokenizer, args, device, contextlib.nullcontext())
            (loss * (share * world_size / len(batches))).backward()
            held[way].append(held_gradient_elements(policy))
        policy.zero_grad(set_to_none=True)

    step("sync", micro_batches)  # also the warm-up: the first step makes what later steps reuse
    step("nosync", micro_batches)
    peaks = {}
    if measure:
        for name, way, batches in (("one micro-batch (first)", "sync", micro_batches[:1]),
                                   ("one micro-batch (second)", "sync", micro_batches[1:]),
                                   ("two micro-batches, sync", "sync", micro_batches),
                                   ("two micro-batches, nosync", "nosync", micro_batches)):
            peaks[name] = step_peak_growth(lambda: step(way, batches))
        step("sync", micro_batches)
        step("nosync", micro_batches)
    everyone = [None] * world_size
    torch.distributed.all_gather_object(everyone, peaks)
    if rank == 0:
        print(json.dumps({"held": held, "parameters": sum(p.numel() for p in policy.parameters()),
                          "weight_bytes": 4 * sum(p.numel() for p in policy.parameters()),
                          "peak_growth": everyone, "config": shape_of(config)}))


if __name__ == "__main__":
    if sys.argv[1] == "accumulation":
        accumulation(int(sys.argv[2]), int(sys.argv[3]), "--measure" in sys.argv)
    else:
        main(sys.argv[1], "--gradient-checkpointing" in sys.argv)
    # Every process done with its collectives before any of them takes the group down: a process that
    # tears gloo down while its peer still talks to it can abort at exit (seen with torch 2.11).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
