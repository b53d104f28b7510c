#!/usr/bin/env bash
# The project's check on one GPU (H100/H200), under 10 minutes: the sampler's tests with CUDA
# graphs, the hub-shaped checkpoints' tests on CUDA, the 0.5B benchmark (Qwen2.5-0.5B's shapes) at
# batch 16 x (32 + 64) tokens and, with activation checkpointing, 16 x (128 + 384), the wall time
# of a plain `python train.py`, and `--fsdp` in one process on CUDA (bfloat16 mixed precision).
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
grep -h "^bench:\|MFU\|sampler check\|graph capture" "$logs"/bench-*.log | tee "$logs/summary.txt"
grep -h "exit .* after" "$logs"/*.log | tee -a "$logs/summary.txt"
exit $status
