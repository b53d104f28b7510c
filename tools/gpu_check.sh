#!/usr/bin/env bash
# The project's check on one GPU (H100/H200), under 10 minutes: the sampler's tests with CUDA
# graphs, the hub-shaped checkpoints' tests on CUDA, the 0.5B benchmark (Qwen2.5-0.5B's shapes) at
# batch 16 x (32 + 64) tokens and, with activation checkpointing, 16 x (128 + 384), the wall time
# of a plain `python train.py`, and `--fsdp` in one process on CUDA (bfloat16 mixed precision): a
# whole run, and one sharded step with `--sampler auto` that reports the sampler it chose (dynamic
# for a sharded model) and the step's peak memory against training.memory.step_peak_bytes.
# Logs go to $OUT when it is set, else to gpu-check-logs/.
# Exits non-zero when a part fails or runs past its time limit; later parts still run.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${OUT:-gpu-check-logs}
mkdir -p "$logs"
status=0

part() {  # part NAME SECONDS COMMAND...: run COMMAND with a time limit, its output to NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$logs/$name.log"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$logs/$name.log"
    local code=${PIPESTATUS[0]}
    echo "== $name: exit $code after $((SECONDS - start)) s" | tee -a "$logs/$name.log"
    [ "$code" -eq 0 ] || status=1
}

nvidia-smi > "$logs/nvidia-smi.txt" 2>&1
python -c "import sys, torch, transformers, tokenizers; print('python', sys.version.split()[0], 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, \
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" | tee "$logs/versions.txt"

if python -c "import pytest" 2>/dev/null; then
    part test_sampling 60 python -m pytest -q tests/test_sampling.py
    part test_real_models 80 python -m pytest -q tests/test_real_models.py
else  # bench.py's own sampler check (graph vs eager static step) still runs below
    echo "pytest is not installed: the tests are skipped" | tee "$logs/test_sampling.log"
fi
part bench-16x96 150 python -m tools.bench --preset 0.5b --batch-size 16 --bench-prompt-length 32 \
    --bench-response-length 64 --bench-steps 10 --bench-profile
part bench-16x512-checkpointing 150 python -m tools.bench --preset 0.5b --batch-size 16 --bench-prompt-length 128 \
    --bench-response-length 384 --bench-steps 5 --gradient-checkpointing
run_dir=$(mktemp -d)
part train 60 python train.py --output-dir "$run_dir/run"
part fsdp-1-process 60 python -m torch.distributed.run --standalone --nproc_per_node=1 train.py --fsdp \
    --output-dir "$run_dir/fsdp"
rm -rf "$run_dir"
# One sharded step (FSDP2 over one process, bfloat16 mixed precision under autocast, as train.py
# --fsdp runs it) of full TI-DPO on a 8-layer Llama of hidden size 1024, anchors sampled to their
# full length: the sampler `--sampler auto` chose, and the second step's peak allocated memory
# (the first allocates AdamW's moments) against the formula's total.
fsdp_step='
import contextlib, torch
from transformers import LlamaConfig, LlamaForCausalLM
import data, train
from training import distributed, memory, sampling, setup
args = train.parse_args(["--fsdp", "--batch-size", "4", "--max-new-tokens", "64", "--temperature", "0"])
args.min_new_tokens = args.max_new_tokens
rank, world_size, device = distributed.setup(setup.pick_device(args), fsdp=True)
autocast = setup.autocast_for(device, args)
tokenizer = setup.load_tokenizer(args)
batch = data.collate(setup.load_pairs(args, tokenizer)[0][:4], tokenizer.pad_token_id)
config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
policy, ref = distributed.fsdp(LlamaForCausalLM(config).eval(), device, isinstance(autocast, torch.autocast))
print("fsdp sampler: --sampler", args.sampler, "chose", sampling.choose_method(policy, args.sampler,
      device.type == "cuda"), "for the sharded model on", device.type)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
for step in (1, 2):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss, _ = train.tidpo_step(policy, ref, batch, tokenizer, args, device, autocast)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
length = data.stack_pair(batch, tokenizer.pad_token_id)[0].shape[1]
anchor = batch["prompt_input_ids"].shape[1] + args.max_new_tokens
terms = memory.step_peak_bytes(config, 4, length, anchor, True, False, gpu=device.type == "cuda", sharded=True)
print("fsdp formula (GiB):", ", ".join(f"{name} {value / 2**30:.3f}" for name, value in terms.items()))
measured = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
total = terms["total"] / 2**30
print(f"fsdp peak: measured {measured:.3f} GiB (max_memory_allocated, step 2), formula {total:.3f} GiB, "
      f"measured / formula {measured / total:.2f}")
'
part fsdp-step-1-process 40 env WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 \
    python -c "$fsdp_step"
grep -h "^bench:\|MFU\|sampler check\|graph capture" "$logs"/bench-*.log | tee "$logs/summary.txt"
grep -h "^fsdp " "$logs/fsdp-step-1-process.log" | tee -a "$logs/summary.txt"
grep -h "exit .* after" "$logs"/*.log | tee -a "$logs/summary.txt"
exit $status
