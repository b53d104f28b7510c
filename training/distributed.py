"""Several processes under torchrun: the process group, each process's share of a batch, DDP or FSDP2.

    setup(device, fsdp)               join torchrun's process group (NCCL on CUDA, else gloo)
    shard(batch, rank, world_size)    this process's rows of a collated batch, and their share
    wrap(policy, device, world_size)  the policy in DistributedDataParallel (or as it is)
    fsdp(policy, device, bf16)        the policy and a frozen reference sharded with FSDP2
    unwrap(policy)                    the module inside a DDP wrapper
    gathered(model)                   a sharded model's weights gathered for a whole sampling call
    sync_unless(...)                  DDP: gradients reduced at a step's last micro-batch; FSDP2: at each
    all_reduce_sum(values, ...)       add a tensor up over the processes
    gather_lists(lists)               Python lists joined over the processes (the evaluation's samples)
    clip_grad_norm(policy, max_norm)  the gradients' total norm, clipped to max_norm unless it is 0

train.py calls one line of each; a plain `python train.py` is one process and none of them does
anything. docs/training.md says how a run is split and what was tested.

In a step (train.tidpo_step) only the forward of chosen and rejected, with the attribution, goes
through the DDP wrapper, so that DDP's hooks average the gradients in the backward; sampling and
the anchors' forward use the module inside, since DDP expects one forward per backward. The
anchors' gradients are not lost: autograd adds up all of a parameter's gradient in the backward
before DDP's hook for that parameter fires. FSDP2 shards the module itself (no wrapper): every
forward gathers each layer's weights, and the backward reduces the gradients layer by layer.
"""

import atexit
import contextlib
import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


# How long a collective call waits for the other processes before the run stops with an error.
# NCCL's default is 10 minutes; rank 0 alone loads --model (on a first run, downloads it) while the
# others wait at the first broadcast, and 16 GB of an 8B checkpoint can take longer than that.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=1)


def setup(device, fsdp=False):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1, or one process with --fsdp) this
    process joins the group that torchrun's environment variables describe: NCCL on CUDA, one GPU
    per process, else gloo. A plain `python train.py` is one process, with no group."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and not fsdp:
        return 0, 1, device
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit("error: --fsdp runs under torchrun (torchrun --nproc_per_node=N train.py --fsdp ...), "
                         "which starts the processes and tells each its rank")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=PROCESS_GROUP_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    atexit.register(leave_process_group)
    sys.excepthook = _noting_a_crash(sys.excepthook)
    return dist.get_rank(), world_size, device


# How long a process at exit waits for the others to get there too: rank 0 may still be writing
# the policy (minutes for an 8B model on a slow file system) while the others have finished.
EXIT_WAIT = datetime.timedelta(minutes=30)
_crashed = False  # an exception no one caught is ending this process (its peers may be elsewhere)


def _noting_a_crash(excepthook):
    def hook(*exc_info):
        global _crashed
        _crashed = True
        excepthook(*exc_info)
    return hook


def leave_process_group():
    """At exit: the process group taken down, unless the program has done so itself.

    Every process first waits at a barrier for the others. A process that tears its connections
    down while a peer is still finishing with them (writing the policy, or in the last
    collective's tail) can abort in gloo's C++ teardown ("terminate called without an active
    exception", SIGABRT), and torchrun then reports a finished run as failed. Every way out of
    train.py (its end, a usage error, a stop by a signal, a non-finite stop) is taken by all the
    processes together, so the barrier is met. Not after an uncaught exception: that one may be
    this process's alone, and torchrun stops the others when it exits."""
    if not dist.is_initialized():
        return
    if not _crashed:
        try:
            dist.barrier(async_op=True).wait(timeout=EXIT_WAIT)
        except Exception:  # a peer that is gone or late: leave anyway  # noqa: BLE001
            pass
    dist.destroy_process_group()


def shard(batch, rank, world_size, step=None):
    """This process's rows of a collated batch, and their share of the batch's pairs, or of all the
    pairs of `step` (the step's micro-batches, `batch` among them). The rows are cut from the whole
    collated batch, so they keep the padding they would have in one process."""
    n = len(batch["chosen_input_ids"])
    start, end = n * rank // world_size, n * (rank + 1) // world_size
    total = sum(len(micro_batch["chosen_input_ids"]) for micro_batch in step) if step else n
    return {name: value[start:end] for name, value in batch.items()}, (end - start) / total


def wrap(policy, device, world_size):
    """The policy to train through: DistributedDataParallel with several processes (its constructor
    also gives every process rank 0's weights); the policy itself with one, or sharded by fsdp()."""
    if is_sharded(policy):
        return reshard(policy)  # the optimizer is to hold the sharded parameters
    if world_size == 1:
        return policy
    wrapped = DistributedDataParallel(policy, device_ids=[device] if device.type == "cuda" else None)
    # gradient_attribution takes the embedding layers from the model it runs: lend it the module's
    wrapped.get_input_embeddings = policy.get_input_embeddings
    wrapped.get_output_embeddings = policy.get_output_embeddings  # and memory.gradient_attribution its output layer
    return wrapped


def unwrap(policy):
    return policy.module if isinstance(policy, DistributedDataParallel) else policy


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def fsdp(policy, device, bf16):
    """(policy, reference): two sharded models (FSDP2: every decoder layer, then the whole model)
    with rank 0's weights of `policy`, the reference frozen.

    Both are built on the meta device (no memory) and sharded there; rank 0's weights are then
    sent to each process shard by shard, once: each process copies its shards of the policy into
    the reference, whose shards are the same slices. Only rank 0 ever holds a whole copy
    (`policy`, which the caller drops), and the other processes may pass `policy` on the meta
    device. Both keep `policy`'s generation config (a checkpoint's end ids and sampling
    defaults), which a model built from its config alone would replace by the config's.
    `bf16` (CUDA): the weights are gathered and the forward and backward computed in bfloat16,
    from float32 master weights, with the gradients reduced in float32.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    rank = dist.get_rank()
    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # the decoder layers: the classes transformers keeps whole when it splits a model
    layer_names = set(getattr(policy, "_no_split_modules", None) or ())

    def sharded(trainable):
        with torch.device("meta"):
            model = type(policy)(policy.config).requires_grad_(trainable).eval()
        for layer in [m for m in model.modules() if type(m).__name__ in layer_names]:
            fully_shard(layer, mp_policy=precision)
        fully_shard(model, mp_policy=precision)
        model.to_empty(device=device)
        model.generation_config = copy.deepcopy(policy.generation_config)
        return model

    model = sharded(True)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, policy.state_dict() if rank == 0 else {}, options=options)
    # non-persistent buffers (rotary tables) are in no state dict: they are broadcast apart
    buffers = dict(policy.named_buffers())
    for name, buffer in model.named_buffers():
        if rank == 0:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    ref = sharded(False)
    with torch.no_grad():
        for (name, source), (ref_name, target) in zip(
                [*model.named_parameters(), *model.named_buffers()],
                [*ref.named_parameters(), *ref.named_buffers()], strict=True):
            assert name == ref_name, (name, ref_name)  # the same modules, sharded the same way
            local = target.to_local() if hasattr(target, "to_local") else target
            local.copy_(source.to_local() if hasattr(source, "to_local") else source)
    # FSDP2 keeps the root's own weights (embeddings, final norm, output layer) gathered after a
    # forward, for the backward that follows at once; the reference has no backward, and would
    # hold them whole for the rest of the run (~2 GiB per GPU for an 8B model): reshard at once.
    ref.register_forward_hook(lambda module, inputs, output: module.reshard())
    return model, ref


@contextlib.contextmanager
def gathered(model):
    """A sharded model's weights gathered once for the whole block (a sampling call), then sharded
    again. Each forward of a sharded model is a collective call, and sampling stops at a number
    of steps that differs between processes (their responses end apart): with the weights
    gathered, the decode steps need no collective. Nothing for a model that is not sharded."""
    if not is_sharded(model):
        yield model
        return
    model.set_reshard_after_forward(False)  # every sharded layer keeps its weights after a forward
    try:
        yield model
    finally:
        for module in model.modules():
            if is_sharded(module) and module is not model:  # the whole model's own weights stay
                module.set_reshard_after_forward(True, recurse=False)  # gathered, as in FSDP2
        reshard(model)


def reshard(model):
    """Every sharded part of `model` back to its shards. After a forward FSDP2 keeps the whole
    model's own weights (embeddings, final norm, output layer) gathered, and then the model's
    parameters are those gathered tensors: the optimizer, a checkpoint and the final save need
    the sharded ones."""
    for module in model.modules():
        if is_sharded(module):
            module.reshard()
    return model


def sync_unless(policy, world_size, last):
    """DDP: gradients are reduced only at the last micro-batch of a step (no_sync for the others).
    FSDP2: reduced at every micro-batch. With its sync off, FSDP2 would keep each parameter's
    whole, unsharded gradient in float32 between micro-batches: a whole model's gradient on every
    process. With it on, each micro-batch's gradients are reduce-scattered layer by layer and
    added to this process's shard, so no process ever holds more than its shard and one layer's.
    The cost: one reduce-scatter per micro-batch instead of per step."""
    if is_sharded(policy):
        policy.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    return policy.no_sync() if world_size > 1 and not last else contextlib.nullcontext()


def all_reduce_sum(values, world_size):
    """`values` added up over the processes (in place), or as they are in one process."""
    if world_size > 1:
        dist.all_reduce(values)
    return values


def rank_and_size():
    """(rank, world_size) of this process: (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_lists(lists):
    """Each of `lists` (Python lists) concatenated over the processes in rank order; as they are
    in one process."""
    rank, world_size = rank_and_size()
    if world_size == 1:
        return lists
    everyone = [None] * world_size
    dist.all_gather_object(everyone, lists)
    return [[item for theirs in everyone for item in theirs[index]] for index in range(len(lists))]


def clip_grad_norm(policy, max_norm):
    """The total norm of the policy's gradients (a tensor: no wait for the device), after clipping
    them to `max_norm` (0: no clipping). Sharded, the norm over every process's shards."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in policy.parameters() if p.grad is not None])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
