"""Checkpoints of a train.py run: writing them safely, finding them, resuming from them, and the
message of a run that stopped on a non-finite step.

A checkpoint (<output-dir>/checkpoints/step-N.pt) holds the policy, the optimizer, the scheduler,
every process's random states and the data position, so that a resumed run continues as the
uninterrupted run would have. The frozen reference is written once per run, beside them
(reference.pt). A sharded run (--fsdp) writes folders instead, step-N/ and reference/: each process
its shards of the weights and of the optimizer with torch.distributed.checkpoint, and rank 0 the
rest in step-N/train.pt. The policy/ folder of every run is a whole Hugging Face folder.

With --lora-r a checkpoint holds the adapters alone: the base weights are the reference, read again
from --model on --resume; only the built-in model's base, which exists nowhere else, is written
once as reference.pt.
"""

import math
import os
import re
import shutil
from datetime import datetime

import torch
import torch.distributed as dist

from training import lora

# A checkpoint continues the run that wrote it: these flags may differ on --resume, the rest may not.
MAY_CHANGE_ON_RESUME = ("steps", "lr", "fp32", "device", "log_every", "save_every", "output_dir",
                        "resume", "gradient_checkpointing", "eval_every", "report_to")
KEEP_LAST = 2  # checkpoints kept: the newest, and one before it in case a later step went wrong
CHECKPOINT_FORMAT = "tidpo train.py checkpoint, version 1"
CHECKPOINT_NAME = re.compile(r"step-(\d+)(\.pt)?")  # a file, or a sharded run's folder


def saved_checkpoints(run_dir):
    """[(step, path)] of the checkpoints in a run folder, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(m[1]), os.path.join(folder, m[0])) for m in map(CHECKPOINT_NAME.fullmatch, names) if m)


def save_atomically(obj, path):
    """torch.save to a temporary name in the same folder, then rename: a crash while writing leaves
    the previous file whole, never a torn one (os.replace is atomic within a file system)."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())  # on disk before the rename makes it the checkpoint
    os.replace(temporary, path)


def save_sharded(state, folder, train_state=None):
    """torch.distributed.checkpoint's save of `state` (each process writes its shards) into a new
    name, with rank 0's `train_state` as train.pt beside them, renamed to `folder` once every
    process is done: a crash leaves no torn checkpoint, and none without its train.pt."""
    import torch.distributed.checkpoint as dcp

    temporary = folder + ".tmp"
    if dist.get_rank() == 0 and os.path.isdir(temporary):
        shutil.rmtree(temporary)  # the remains of a run stopped while writing
    dist.barrier()
    dcp.save(state, checkpoint_id=temporary)
    if dist.get_rank() == 0 and train_state is not None:
        save_atomically(train_state, os.path.join(temporary, "train.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        os.replace(temporary, folder)
    dist.barrier()


def model_state(model, sharded):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from training import distributed

    return get_model_state_dict(distributed.reshard(model)) if sharded else model.state_dict()


def save_reference(ref, run_dir, rank, sharded=False):
    """Write the frozen reference to checkpoints/reference.pt (sharded: the folder reference/),
    unless a resumed run already did, or the reference is --model's base under LoRA (its folder)."""
    path = os.path.join(run_dir, "checkpoints", "reference" if sharded else "reference.pt")
    if os.path.exists(path) or getattr(ref, "base_on_disk", False):
        return
    if rank == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if sharded:
        save_sharded({"model": model_state(ref, True)}, path)
    elif rank == 0:
        save_atomically(ref.state_dict(), path)


def save_checkpoint(args, step, policy, optimizer, scheduler, device, rank, world_size, **loop):
    """Write checkpoints/step-N.pt (on rank 0: the state is every process's; sharded, the folder
    step-N/) and delete all but the newest KEEP_LAST; returns its path (None on the other
    ranks). `loop`: the data position, the log window, the history and the held-out numbers before
    training."""
    sharded = args.fsdp
    state = {"format": CHECKPOINT_FORMAT, "step": step, "args": vars(args), "world_size": world_size,
             "scheduler": scheduler.state_dict(),
             "random": random_states(device, world_size), **loop}  # random_states: a collective call
    folder = os.path.join(args.output_dir, "checkpoints")
    path = os.path.join(folder, f"step-{step:06d}" + ("" if sharded else ".pt"))
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        save_sharded({"policy": model_state(policy, True),
                      "optimizer": get_optimizer_state_dict(policy, optimizer)}, path, {**state, "sharded": True})
    elif rank == 0:
        weights = lora.adapter_state(policy) if lora.is_lora(policy) else policy.state_dict()
        save_atomically({**state, "policy": weights, "optimizer": optimizer.state_dict()}, path)
    if rank != 0:
        return None
    for _, old in saved_checkpoints(args.output_dir)[:-KEEP_LAST]:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    return path


def random_states(device, world_size):
    """Every process's random-number states (a collective call under torchrun): anchors are sampled
    from them, so a resumed run draws what the uninterrupted run would have drawn."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


def find_resume_checkpoint(args):
    """The checkpoint file that --resume names. Without --output-dir, the run continues in the folder
    of the run that wrote it."""
    if args.resume == "latest":
        if args.output_dir is None:
            raise SystemExit("error: --resume latest needs --output-dir, the folder of the run to continue")
        saved = saved_checkpoints(args.output_dir)
        if not saved:
            raise SystemExit(f"error: --resume latest: {args.output_dir} holds no checkpoints "
                             f"({os.path.join(args.output_dir, 'checkpoints', 'step-N.pt')}); a run writes them "
                             f"with --save-every N")
        return saved[-1][1]
    if not os.path.exists(args.resume):
        raise SystemExit(f"error: --resume {args.resume}: no such file")
    if os.path.isdir(args.resume) and not os.path.isfile(os.path.join(args.resume, "train.pt")):
        raise SystemExit(f"error: --resume {args.resume}: is a folder; name a checkpoint file "
                         f"(<run>/checkpoints/step-N.pt, or a sharded run's step-N folder), or use "
                         f"--resume latest --output-dir <run>")
    if args.output_dir is None:
        args.output_dir = run_dir_of(args.resume)
    return args.resume


def run_dir_of(checkpoint_path):
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path)))  # <run>/checkpoints/step-N.pt


def load_checkpoint(path, args, world_size):
    """The checkpoint's state, with the frozen reference's weights under "reference", after checking
    that it continues this run."""
    try:
        sharded = os.path.isdir(path)
        state = torch.load(os.path.join(path, "train.pt") if sharded else path, map_location="cpu",
                           weights_only=True)
    except Exception as error:  # not a torch file, a truncated one, a pickle of something else
        raise SystemExit(f"error: --resume {path}: cannot be read as a checkpoint "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: --resume {path}: not a checkpoint written by train.py")
    saved, now = state["args"], vars(args)
    changed = [f"--{name.replace('_', '-')} {saved[name]} (now {now[name]})" for name in saved
               if name in now and name not in MAY_CHANGE_ON_RESUME and not name.startswith("bench")
               and saved[name] != now[name]]
    if changed:
        raise SystemExit(f"error: --resume {path}: that run had {', '.join(changed)}; resume with the run's "
                         f"own flags, or start a new run in another --output-dir")
    if state["world_size"] != world_size:
        raise SystemExit(f"error: --resume {path}: it was written by a run of world size {state['world_size']}, "
                         f"this one has world size {world_size}; resume with torchrun "
                         f"--nproc_per_node={state['world_size']} (each process continues its own random stream)")
    reference = os.path.join(os.path.dirname(os.path.abspath(path)), "reference" if sharded else "reference.pt")
    if getattr(args, "lora_r", 0) and args.model:  # the reference is --model's base, loaded again
        reference = None
    elif not os.path.exists(reference):
        raise SystemExit(f"error: --resume {path}: {reference}, the frozen reference of that run, is missing")
    if sharded:  # the weights are read once the models are sharded (load_models)
        state["reference_path"] = reference
    elif reference:
        state["reference"] = torch.load(reference, map_location="cpu", weights_only=True)
    state["path"] = path
    return state


def load_models(policy, ref, resume):
    """The policy's and the reference's weights of the run that wrote the checkpoint (sharded: read
    into the sharded models, each process its shards)."""
    if not resume.get("sharded"):
        load_weights(policy, resume["policy"], resume["path"])
        if "reference" in resume:
            load_weights(ref, tied_from_own_dtype(ref, resume["reference"]), resume["path"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    for model, path, key in ((policy, resume["path"], "policy"), (ref, resume["reference_path"], "model")):
        state = {key: model_state(model, True)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state[key])


def tied_from_own_dtype(model, state_dict):
    """`state_dict` with each tied weight (one tensor under several names: an output layer that
    shares the input embeddings) given, under all its names, the value saved in the model's dtype.

    On CUDA a run gives the reference's output layer a bfloat16 copy of its own
    (memory.linear_weights_in) before a stop writes reference.pt: the file then holds the float32
    embeddings and their bfloat16 rounding as the output layer, and loading both names into the one
    shared tensor would leave it rounded. The resumed run casts the output layer again itself."""
    names = {}
    for name, tensor in model.state_dict().items():  # detached tensors: the same storage
        names.setdefault((tensor.data_ptr(), tensor.shape, tensor.dtype), []).append(name)
    state_dict = dict(state_dict)
    for (_, _, dtype), tied in names.items():
        if len(tied) > 1 and all(name in state_dict for name in tied):
            own = [state_dict[name] for name in tied if state_dict[name].dtype == dtype]
            for name in tied:
                state_dict[name] = own[0] if own else state_dict[name]
    return state_dict


def load_weights(model, state_dict, checkpoint_path):
    try:
        if lora.is_lora(model):  # a LoRA checkpoint's policy: the adapters alone
            lora.load_adapters(model, state_dict)
        else:
            model.load_state_dict(state_dict)
    except RuntimeError as error:  # missing or extra tensors, other shapes: the model is not the run's
        raise SystemExit(f"error: --resume {checkpoint_path}: its weights do not fit this model "
                         f"({str(error).splitlines()[0]})") from None


def restore_loop(resume, policy, optimizer, scheduler, epochs, warmup, lr, device, rank):
    """Put a resumed run's loop where the checkpoint left it: the optimizer and schedule (with a new
    learning rate from here on, if `lr` differs from the run's, say after a non-finite loss), the
    data position (data.Epochs), this process's random streams. Returns (sums, count, history,
    first_step, checkpoint path): the log window and where the loop goes on."""
    if resume.get("sharded"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(policy, optimizer)}  # the layout to read into
        dcp.load(state, checkpoint_id=resume["path"])
        set_optimizer_state_dict(policy, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    if lr != resume["args"]["lr"]:
        scheduler.base_lrs = [lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * warmup(scheduler.last_epoch)
    epochs.restore(resume["data"])
    torch.set_rng_state(resume["random"][rank]["cpu"])
    if device.type == "cuda" and resume["random"][rank]["cuda"] is not None:
        torch.cuda.set_rng_state(resume["random"][rank]["cuda"], device)
    return (resume["window"]["sums"], resume["window"]["count"], resume["history"], resume["step"] + 1,
            resume["path"])


def make_output_dir(args, resume_path=None, rank=0, world_size=1):
    """Create --output-dir. It must be new or empty, unless --resume continues the run that lives there;
    one that holds only the metrics.jsonl of a run that stopped early (no checkpoint, no policy) is
    started over, and the note that says so returned."""
    if args.output_dir is None:
        args.output_dir = os.path.join("runs", f"{args.loss}-{datetime.now():%Y%m%d-%H%M%S}")
        if world_size > 1:  # rank 0's clock names the folder of every process
            name = [args.output_dir]
            dist.broadcast_object_list(name)
            args.output_dir = name[0]
    held = sorted(os.listdir(args.output_dir)) if os.path.isdir(args.output_dir) else []
    note = None
    own_run = bool(held and resume_path) and os.path.samefile(run_dir_of(resume_path), args.output_dir)
    if held == ["metrics.jsonl"] and not own_run:
        # a run that stopped before its first checkpoint and its save: nothing to continue or keep
        if world_size > 1:
            dist.barrier()  # every process has looked at the folder before rank 0 empties it
        if rank == 0:
            os.remove(os.path.join(args.output_dir, "metrics.jsonl"))
        held, note = [], (f"started over in {args.output_dir}: it held only the metrics.jsonl of a run that "
                          "stopped before its first checkpoint")
    if held and not own_run:
        saved = saved_checkpoints(args.output_dir)
        if saved:
            how = (f"to continue that run from its checkpoint of step {saved[-1][0]}, add --resume latest; to "
                   f"start a new one, choose another --output-dir")
        else:
            how = "it has no checkpoints to continue from; choose another --output-dir (or remove that folder)"
        raise SystemExit(f"error: --output-dir {args.output_dir} already holds an earlier run "
                         f"({', '.join(held)}); {how}")
    if world_size > 1:
        dist.barrier()  # every process has looked at the folder before rank 0 writes to it
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    return note


def non_finite_message(step, values, args, device, checkpoint):
    """The message of a run stopped by a non-finite loss or gradient: which term, and how to go on
    from the last checkpoint."""
    terms = {"dpo_w": "loss/dpo_w", "triplet": "loss/triplet", "kl": "loss/kl"}
    bad = [term for term, name in terms.items() if name in values and not math.isfinite(values[name])]
    if bad:
        what = f"the loss is {values['loss']} (not finite in: {', '.join(bad)})"
    else:
        what = f"the gradient norm is {values['grad_norm']} while the loss is finite ({values['loss']:.4g})"
    terms_now = ", ".join(f"{term} {values[name]:.4g}" for term, name in terms.items() if name in values)
    advice = [f"a lower --lr (now {args.lr:g})", "a check of the training data (very long or degenerate "
              "responses, the same text as chosen and rejected)"]
    if device.type == "cuda" and not args.fp32:
        advice.append("--fp32 (bfloat16 overflows sooner)")
    if checkpoint:
        where = (f"the last checkpoint, {checkpoint}, is intact: continue from it with --resume latest "
                 f"--output-dir {args.output_dir} (a new --lr is allowed)")
    else:
        where = "no checkpoint was written (--save-every N writes them)"
    return (f"error: step {step}: {what}; loss terms: {terms_now}; grad_norm {values['grad_norm']:.4g}. The run "
            f"stopped before applying this update; {where}. Try {'; '.join(advice)}.")


def save_policy(policy, tokenizer, folder, rank, sharded=False):
    """The trained policy and its tokenizer as a Hugging Face folder (from_pretrained loads it);
    sharded, its weights gathered whole on rank 0's CPU first (a collective call). With LoRA the
    folder holds the merged model, and adapter/ beside it the adapter alone. Returns what was saved
    where, for the log."""
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # the save's progress bar would interleave with the log lines
    if lora.is_lora(policy):
        adapter = os.path.join(os.path.dirname(folder), "adapter")
        if rank == 0:
            lora.save(policy, tokenizer, folder, adapter)
        return f"{folder} (merged; the adapter alone in {adapter})"
    state_dict = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from training import distributed

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        # whole on rank 0, empty elsewhere
        state_dict = get_model_state_dict(distributed.reshard(policy), options=options)
        seen = set()  # a tied weight (output layer = embeddings) is saved once, as without sharding
        for name, parameter in policy.named_parameters(remove_duplicate=False):
            if id(parameter) in seen:
                state_dict.pop(name, None)
            seen.add(id(parameter))
    if rank == 0:
        policy.save_pretrained(folder, state_dict=dict(state_dict) if sharded else None)  # it empties the dict
        tokenizer.save_pretrained(folder)
    return folder
