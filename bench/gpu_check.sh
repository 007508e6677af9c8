#!/usr/bin/env bash
# Everything that needs CUDA, in one go (about 8 minutes on one GPU); JSON into bench/results/gpu_check/.
#
#   bash bench/gpu_check.sh            # on a machine with one CUDA GPU, from the repository root
#
# 1. the no-host-sync test of the CDB step path (tests/test_core.py, skipped without CUDA);
# 2. bench/overhead.py --device cuda at the paper's batch (128);
# 3. bench/throughput.py at 224 px with a ViT-B/16-shaped model: fp32 and --bf16, map-style and --streaming,
#    both faces (a generated folder of 2,000 256-px JPEGs);
# 4. a 1-GPU `accelerate launch` run of 6 steps, and the same run resumed from its step-3 checkpoint in a fresh
#    process: the final weights must be bitwise equal.
# Without CUDA it stops at once with one line and exit 2, before writing anything. GPU_CHECK_CPU_SMOKE=1 runs
# steps 3-4 on the CPU at toy sizes (into a scratch folder): a check of this script, not of the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "gpu_check.sh: $PYTHON cannot import torch; set PYTHON to the environment's python" >&2
    exit 2
fi
if [ "$SMOKE" != 1 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU" >&2
    exit 2
fi
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
OUT=bench/results/gpu_check
SIZE=224 MODEL_KIND=vit-b16 STEPS=30 BATCH=64 CPU_FLAG=()
if [ "$SMOKE" = 1 ]; then
    OUT="$SCRATCH/results" SIZE=32 MODEL_KIND=vit STEPS=2 BATCH=4 CPU_FLAG=(--use_cpu true)
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PYTHON" -c 'import json, torch; print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
    else "none (CPU smoke run)", "torch": torch.__version__}))' > "$OUT/device.json"
sync=skipped_on_cpu
if [ "$SMOKE" != 1 ]; then

echo "== 1/4 no host sync in the CDB step path"
if timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider "tests/test_core.py::test_step_path_never_synchronises_on_cuda" \
        -rs > "$SCRATCH/sync.txt" 2>&1; then sync=passed; else sync=failed; fi
cat "$SCRATCH/sync.txt" | tail -3
grep -q "1 passed" "$SCRATCH/sync.txt" || sync=failed   # a skip is not a pass
echo "{\"test_step_path_never_synchronises_on_cuda\": \"$sync\"}" > "$OUT/no_host_sync.json"

echo "== 2/4 overhead at batch 128"
timeout 150 "$PYTHON" bench/overhead.py --device cuda --batch_size 128 --json "$OUT/overhead_cuda_batch128.json" \
    || echo "overhead.py failed or ran out of time" >&2

fi

echo "== 3/4 throughput, ViT-B/16 shape at 224 px"
"$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from scale import write_folder; \
write_folder(Path('$SCRATCH/train'), 2000, 0, size=256); write_folder(Path('$SCRATCH/validation'), 64, 1, size=256)"
timeout 240 "$PYTHON" bench/throughput.py --model "$MODEL_KIND" --image_size "$SIZE" --batch_size "$BATCH" \
    --max_steps "$STEPS" --rounds 1 \
    --train_dir "$SCRATCH/train" --validation_dir "$SCRATCH/validation" --variants limit,hf,accelerate \
    --ours_args "--bf16 true" --ours_args "--bf16 true --streaming true --dataloader_num_workers 0" \
    --json "$OUT/throughput_224px_vitb16.json" || echo "throughput.py failed or ran out of time" >&2

echo "== 4/4 accelerate launch on 1 GPU, interrupted at step 3 and resumed"
MODEL="$("$PYTHON" -c "import sys; sys.path.insert(0, 'bench'); from throughput import prepare_checkpoint; \
print(prepare_checkpoint('vit', $SIZE))")"
run() {  # run OUTPUT_DIR [extra flags]
    local out=$1; shift
    timeout 120 "$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
        --dynamo_backend no run_finetune.py --trainer accelerate --model_name_or_path "$MODEL" \
        --train_dir "$SCRATCH/train" --validation_dir "$SCRATCH/validation" --max_steps 6 --save_steps 3 \
        --per_device_train_batch_size 16 --report_to none --disable_tqdm true --output_dir "$out" "${CPU_FLAG[@]}" "$@"
}
resume=failed
if run "$SCRATCH/straight" > "$SCRATCH/launch.txt" 2>&1; then
    mkdir -p "$SCRATCH/resumed" && cp -r "$SCRATCH/straight/checkpoint-3" "$SCRATCH/resumed/"
    if run "$SCRATCH/resumed" --resume_from_checkpoint true >> "$SCRATCH/launch.txt" 2>&1 \
            && cmp -s "$SCRATCH/straight/model.safetensors" "$SCRATCH/resumed/model.safetensors"; then
        resume=bitwise_equal
    else
        resume=differs_or_failed
    fi
fi
tail -3 "$SCRATCH/launch.txt"
echo "{\"accelerate_launch_1gpu_resume\": \"$resume\"}" > "$OUT/launch_resume.json"
echo "gpu_check.sh: done; results in $OUT/"
[ "$sync" != failed ] && [ "$resume" = bitwise_equal ]
