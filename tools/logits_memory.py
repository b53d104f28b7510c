"""Extra peak memory of training/memory.py's token_logps and sequence_kl on large-vocabulary logits (CPU).

    python -m tools.logits_memory                             # bf16 logits [8, 256, 151936], Qwen2.5's vocabulary
    python -m tools.logits_memory --batch 2 --length 128 --vocab 32000

Each case runs in a fresh process: the inputs are made, the process's peak resident memory is read
(resource.getrusage), the computation runs (forward + backward of a weighted sum of the outputs,
or the no-grad forward that the frozen reference makes), and the peak is read again. The table gives
the growth of the peak in MiB and as a multiple of the size of one logits tensor. The gradient of
the logits is itself 1x and unavoidable while the logits exist.

"plain" is the formula written with plain autograd, as tidpo.py computed it before its backward
was written out: a float32 copy of the whole [B, L, V] and its temporaries. The last lines compare
the values and gradients of training/memory.py with the plain formula's on a slice of the same logits.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from training import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder that holds tools/
CASES = ["token_logps", "token_logps plain", "token_logps no-grad", "token_logps no-grad plain",
         "sequence_kl", "sequence_kl plain"]


def plain_token_logps(logits, input_ids, response_mask):
    logits = logits.float()
    next_ids = F.pad(input_ids[:, 1:], (0, 1)).unsqueeze(-1)
    next_logps = torch.gather(logits, -1, next_ids).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    logps = F.pad(next_logps[:, :-1], (1, 0))
    return torch.where(response_mask.bool(), logps, torch.zeros_like(logps))


def plain_sequence_kl(policy_logits, ref_logits, response_mask):
    policy_logps = torch.log_softmax(policy_logits.float(), dim=-1)
    ref_logps = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (ref_logps.exp() * (ref_logps - policy_logps)).sum(dim=-1)
    return (kl[:, :-1] * response_mask[:, 1:].to(kl.dtype)).sum(dim=-1)


def inputs(batch, length, vocab, seed=0):
    """bf16 policy and reference logits, made in place (no float32 copy raises the peak), token
    ids and a response mask (the first quarter of each row is prompt)."""
    generator = torch.Generator().manual_seed(seed)
    policy = torch.empty(batch, length, vocab, dtype=torch.bfloat16).normal_(0, 3, generator=generator)
    ref = torch.empty(batch, length, vocab, dtype=torch.bfloat16).normal_(0, 3, generator=generator)
    input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
    response_mask = torch.ones(batch, length, dtype=torch.long)
    response_mask[:, : length // 4] = 0
    weights = torch.randn(batch, length, generator=generator)  # a loss that uses every output
    return policy, ref, input_ids, response_mask, weights


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_case(case, batch, length, vocab):
    """One case in this process: {"extra_mib": growth of the peak, "logits_mib": one logits tensor}."""
    policy, ref, input_ids, response_mask, weights = inputs(batch, length, vocab)
    plain = case.endswith("plain")
    before = peak_mib()
    if case.startswith("token_logps no-grad"):
        with torch.inference_mode():
            (plain_token_logps if plain else memory.token_logps)(policy, input_ids, response_mask)
    elif case.startswith("token_logps"):
        policy.requires_grad_(True)
        logps = (plain_token_logps if plain else memory.token_logps)(policy, input_ids, response_mask)
        (logps * weights).sum().backward()
    else:
        policy.requires_grad_(True)
        kl = (plain_sequence_kl if plain else memory.sequence_kl)(policy, ref, response_mask)
        (kl * weights[:, 0]).sum().backward()
    return {"extra_mib": peak_mib() - before, "logits_mib": policy.numel() * policy.element_size() / 2**20}


def compare(batch, length, vocab):
    """Largest differences of training/memory.py from the plain formula: values and gradients, bf16 logits."""
    policy, ref, input_ids, response_mask, weights = inputs(batch, length, vocab, seed=1)
    result = {}
    for name, new, old, args, loss in [
            ("token_logps", memory.token_logps, plain_token_logps, (input_ids, response_mask), weights),
            ("sequence_kl", memory.sequence_kl, plain_sequence_kl, (ref, response_mask), weights[:, 0])]:
        outputs, grads = [], []
        for function in (new, old):
            logits = policy.detach().requires_grad_(True)
            out = function(logits, *args)
            (out * loss).sum().backward()
            outputs.append(out.detach())
            grads.append(logits.grad.float())
        result[name] = {"value": (outputs[0] - outputs[1]).abs().max().item(),
                        "value_scale": outputs[1].abs().max().item(),
                        "grad": (grads[0] - grads[1]).abs().max().item()}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--compare-batch", type=int, default=1, help="rows of the logits compared with the plain formula")
    p.add_argument("--case", choices=CASES, default=None, help=argparse.SUPPRESS)  # one case, in a child process
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.batch, args.length, args.vocab)))
        return
    size = f"--batch {args.batch} --length {args.length} --vocab {args.vocab}"
    print(f"bf16 logits [{args.batch}, {args.length}, {args.vocab}]; extra peak resident memory, each case in a fresh "
          f"process; {torch.get_num_threads()} threads")
    print(f"{'case':<28}{'extra MiB':>10}{'x logits':>10}")
    for case in CASES:
        child = subprocess.run([sys.executable, "-m", "tools.logits_memory", *size.split(), "--case", case],
                               capture_output=True, text=True, check=True, cwd=ROOT)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{case:<28}{result['extra_mib']:>10.0f}{result['extra_mib'] / result['logits_mib']:>10.2f}", flush=True)
    print(f"logits: {result['logits_mib']:.0f} MiB; forward + backward unless no-grad (inference_mode)")
    for name, diff in compare(args.compare_batch, args.length, args.vocab).items():
        print(f"{name} vs plain, bf16 logits [{args.compare_batch}, {args.length}, {args.vocab}]: values differ by at "
              f"most {diff['value']:.2e} (largest value {diff['value_scale']:.1f}), gradients by {diff['grad']:.2e}")


if __name__ == "__main__":
    main()
