"""One TI-DPO step sharded with FSDP2 against the same step in one process (run by test_fsdp.py
under torchrun). Prints one JSON line on rank 0: for every parameter of the policy, whether its
sharded gradient exists and how far it is from the one-process gradient; and the bytes rank 0
holds of the weights, gradients, AdamW moments and reference after an optimizer step.

    torchrun --nproc_per_node=2 tests/fsdp_step.py tied|untied [--gradient-checkpointing]
"""

import contextlib
import copy
import json
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from training import distributed  # noqa: E402
from training import memory  # noqa: E402
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

    def local_bytes(tensors):
        return sum(t.to_local().numel() * t.element_size() for t in tensors)

    distributed.reshard(ref)  # after a forward its own weights stay gathered
    held = {"weights": local_bytes(sharded.parameters()),
            "gradients": local_bytes(p.grad for p in sharded.parameters()),
            "adamw": local_bytes(v for state in optimizer.state.values() for v in state.values() if v.dim() > 0),
            "reference": local_bytes(ref.parameters())}
    if rank == 0:
        shape = {name: getattr(config, name) for name in ("vocab_size", "hidden_size", "intermediate_size",
                                                          "num_hidden_layers", "num_attention_heads",
                                                          "num_key_value_heads", "tie_word_embeddings")}
        print(json.dumps({"loss": loss.item(), "params": report, "held": held, "config": shape}))
    del undo


if __name__ == "__main__":
    main(sys.argv[1], "--gradient-checkpointing" in sys.argv)
