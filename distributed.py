"""Several processes under torchrun: the process group, each process's share of a batch, DDP.

    setup(device)                     join torchrun's process group (NCCL on CUDA, else gloo)
    shard(batch, rank, world_size)    this process's rows of a collated batch, and their share
    wrap(policy, device, world_size)  the policy in DistributedDataParallel (or as it is, alone)
    unwrap(policy)                    the module inside a wrapper
    sync_unless(...)                  DDP's no_sync for every micro-batch of a step but the last
    all_reduce_sum(values, ...)       add a tensor up over the processes
    clip_grad_norm(policy, max_norm)  the gradients' total norm, clipped to max_norm unless it is 0

train.py calls one line of each; a plain `python train.py` is one process and none of them does
anything. docs/training.md says how a run is split and what was tested.

In a step (train.tidpo_step) only the forward of chosen and rejected, with the attribution, goes
through the DDP wrapper, so that DDP's hooks average the gradients in the backward; sampling and
the anchors' forward use the module inside, since DDP expects one forward per backward. The
anchors' gradients are not lost: autograd adds up all of a parameter's gradient in the backward
before DDP's hook for that parameter fires.
"""

import atexit
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup(device):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) this process joins the group that
    torchrun's environment variables describe: NCCL on CUDA, one GPU per process, else gloo. A plain
    `python train.py` is one process, with no group."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(dist.destroy_process_group)
    return dist.get_rank(), world_size, device


def shard(batch, rank, world_size):
    """This process's rows of a collated batch, and their share of the batch's pairs. The rows are
    cut from the whole collated batch, so they keep the padding they would have in one process."""
    n = len(batch["chosen_input_ids"])
    start, end = n * rank // world_size, n * (rank + 1) // world_size
    return {name: value[start:end] for name, value in batch.items()}, (end - start) / n


def wrap(policy, device, world_size):
    """The policy to train through: DistributedDataParallel with several processes (its constructor
    also gives every process rank 0's weights), the policy itself with one."""
    if world_size == 1:
        return policy
    wrapped = DistributedDataParallel(policy, device_ids=[device] if device.type == "cuda" else None)
    # gradient_attribution takes the embedding layer from the model it runs: lend it the module's
    wrapped.get_input_embeddings = policy.get_input_embeddings
    return wrapped


def unwrap(policy):
    return policy.module if isinstance(policy, DistributedDataParallel) else policy


def sync_unless(policy, world_size, last):
    """DDP reduces the gradients only at the last micro-batch of a step: no_sync for the others."""
    return policy.no_sync() if world_size > 1 and not last else nullcontext()


def all_reduce_sum(values, world_size):
    """`values` added up over the processes (in place), or as they are in one process."""
    if world_size > 1:
        dist.all_reduce(values)
    return values


def clip_grad_norm(policy, max_norm):
    """The total norm of the policy's gradients (a tensor: no wait for the device), after clipping
    them to `max_norm` (0: no clipping)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in policy.parameters() if p.grad is not None])
