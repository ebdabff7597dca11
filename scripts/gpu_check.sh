#!/usr/bin/env bash
# GPU check of the training engine and of serving, a few minutes on one machine with CUDA GPUs. Prints one table:
#   - LoRA on CoNLL-2003 in float32, bf16 and fp16 (loss scaling), and full fine-tuning in float32 and bf16: real
#     tokens/s, peak torch.cuda.max_memory_allocated, test entity F1 after a short run (STEPS optimizer steps);
#   - the same LoRA through `accelerate launch` with configs/accelerate/single_gpu.yaml, and with fsdp.yaml on one
#     process (FSDP2's code path, nothing to shard with one GPU), and with deepspeed_zero3.yaml on one process;
#   - LoRA on an 8-bit base (bitsandbytes, the [cuda] extra), when installed;
#   - DDP over every GPU present (configs/accelerate/multi_gpu_ddp.yaml), when there are 2 or more;
#   - serving (issue 25's goal): bench/loadtest.py --compare, 4 LoRA adapters mixed in one forward vs one adapter vs
#     switching (--no-mix); its table goes to OUT/loadtest.txt;
#   - bench/scaling.py on a BERT-base/BERT-large corner (LoRA vs full peak memory), to OUT/scaling.md (SCALING=0 skips).
# Usage: scripts/gpu_check.sh [OUT_DIR]
#   env: PYTHON (default .venv/bin/python), PEFT_FT_DATA_DIR, STEPS (300), ONLY (names of the rows to run, e.g.
#        "int8-base"), LIMIT (seconds per step, 300), DEVICE=cpu with STEPS=2 for a dry run of this script itself.
# Status: run on one H200 on 2026-11-30 and 2026-12-04 (every row but ddp: one GPU); bench/RESULTS.md, "GPU check".
set -uo pipefail

usage() {
  cat <<'TXT'
usage: scripts/gpu_check.sh [OUT_DIR]

GPU check of training (LoRA fp32/bf16/fp16, full fp32/bf16, accelerate launch single GPU / FSDP / ZeRO-3,
an 8-bit base, DDP on 2+ GPUs) and serving (bench/loadtest.py --compare, bench/scaling.py): one table at the
end; logs and run folders in OUT_DIR (default gpu_check_runs). Minutes on one machine with a CUDA GPU.
env: PYTHON (default .venv/bin/python), PEFT_FT_DATA_DIR, STEPS (300), ONLY (names of the rows to run, e.g.
     "int8-base"), LIMIT (seconds per step, 300), DEVICE=cpu with STEPS=2 for a dry run of this script itself.
TXT
}

# Arguments first, before anything starts: --help is not a folder name.
case "${1:-}" in -h|--help) usage; exit 0 ;; -*) echo "gpu_check.sh: OUT_DIR '$1' starts with '-'; write ./$1 to mean a folder of that name" >&2; usage >&2; exit 2 ;; esac
if [ $# -gt 1 ]; then echo "gpu_check.sh: one OUT_DIR at most, got $#: $*" >&2; usage >&2; exit 2; fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu_check_runs}
STEPS=${STEPS:-300}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-300}
ONLY=${ONLY:-}
mkdir -p -- "$OUT" 2>/dev/null || { echo "gpu_check.sh: cannot create OUT_DIR $OUT; give a folder you can write" >&2; exit 2; }
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" = cuda ] && [ "$GPUS" -lt 1 ]; then echo "no CUDA GPU visible to torch: nothing to check" >&2; exit 2; fi
COMMON=(--set train.device="$DEVICE" --set train.max_steps="$STEPS" --set train.epochs=1 --set data.max_eval_samples=1000
        --set eval.predictions=false --set output.dir="$OUT")
RECIPE=recipes/conll_lora.toml
FULL=recipes/conll_full.toml

wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

run() {  # name, then the command; a failure or a step over LIMIT seconds is recorded and the check goes on
  local name=$1; shift
  wanted "$name" || return 0
  echo "== $name" >&2
  if timeout "$LIMIT" "$@" "${COMMON[@]}" --set output.name="$name" >"$OUT/$name.log" 2>&1; then echo "$name ok" >&2
  else echo "$name FAILED (see $OUT/$name.log)" >&2; fi
}

skip() { wanted "$1" && echo "$2" >"$OUT/$1.skipped"; }

run fp32 "$PY" -m peft_ft run $RECIPE --set train.mixed_precision=no
run bf16 "$PY" -m peft_ft run $RECIPE --set train.mixed_precision=bf16
if [ "$DEVICE" = cuda ]; then run fp16 "$PY" -m peft_ft run $RECIPE --set train.mixed_precision=fp16
else skip fp16 "fp16 is refused on CPU (loss scaling is CUDA's)"; fi
run full-fp32 "$PY" -m peft_ft run $FULL --set train.mixed_precision=no
run full-bf16 "$PY" -m peft_ft run $FULL --set train.mixed_precision=bf16
if [ "$DEVICE" = cuda ]; then
  run launch-1gpu "$PY" -m accelerate.commands.launch --config_file configs/accelerate/single_gpu.yaml -m peft_ft run $RECIPE
  run fsdp-1proc "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
      -m peft_ft run $RECIPE
fi
if "$PY" -c "import deepspeed" 2>/dev/null; then  # one process: DeepSpeed's ZeRO-3 path, on CPU in a dry run too
  run zero3-1proc "$PY" -m accelerate.commands.launch --config_file configs/accelerate/deepspeed_zero3.yaml \
      --num_processes 1 -m peft_ft run $RECIPE
else
  skip zero3-1proc "skipped: deepspeed not installed (pip install 'peft-ft[deepspeed]')"
fi
if [ "$DEVICE" = cuda ] && "$PY" -c "import bitsandbytes" 2>/dev/null; then
  run int8-base "$PY" -m peft_ft run $RECIPE --set model.load_in_8bit=true
else
  skip int8-base "skipped: bitsandbytes not installed or no CUDA (pip install 'peft-ft[cuda]')"
fi
if [ "$GPUS" -ge 2 ]; then
  run "ddp-$GPUS" "$PY" -m accelerate.commands.launch --config_file configs/accelerate/multi_gpu_ddp.yaml \
      --num_processes "$GPUS" -m peft_ft run $RECIPE
else
  skip ddp "skipped: $GPUS GPU present"
fi

if wanted loadtest; then
  echo "== loadtest (serve on $DEVICE)" >&2
  timeout "$LIMIT" "$PY" bench/loadtest.py --compare --device "$DEVICE" --seconds "${LOAD_SECONDS:-20}" \
      --adapter a=adapters/grading_lora --adapter b=adapters/grading_lora \
      --adapter c=adapters/grading_lora --adapter d=adapters/grading_lora >"$OUT/loadtest.txt" 2>&1 \
    || echo "loadtest FAILED (see $OUT/loadtest.txt)" >&2
fi
if wanted scaling && [ "${SCALING:-1}" = 1 ]; then
  echo "== scaling (LoRA vs full on $DEVICE)" >&2
  timeout "$LIMIT" "$PY" bench/scaling.py --device "$DEVICE" --models ${SCALING_MODELS:-bert-base bert-large} \
      --seq-lens ${SCALING_SEQ:-128 512} --batch-sizes ${SCALING_BATCH:-32} --variants bf16 --steps 5 --warmup 2 \
      --out "$OUT/scaling.md" >"$OUT/scaling.log" 2>&1 || echo "scaling FAILED (see $OUT/scaling.log)" >&2
fi

"$PY" - "$OUT" "$GPUS" "$DEVICE" <<'PYEOF'
import json, sys
from pathlib import Path

out, gpus, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
import torch
name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
print(f"\n{name} x {gpus}, torch {torch.__version__}")
print(f"{'run':<12} {'steps':>6} {'real tok/s':>11} {'peak CUDA MiB':>14} {'test F1':>8}  note")
rows = ["fp32", "bf16", "fp16", "full-fp32", "full-bf16", "launch-1gpu", "fsdp-1proc", "zero3-1proc", "int8-base", "ddp",
        *[p.stem for p in sorted(out.glob("ddp-*.log"))]]
for row in rows:
    skipped = out / f"{row}.skipped"
    runs = sorted((out / row).glob("*/metrics.json")) if (out / row).is_dir() else []
    if runs:
        m = json.loads(runs[-1].read_text())
        t = m["train"]
        f1 = m.get("test", {}).get("f1")  # entity F1 on the first data.max_eval_samples test sentences
        print(f"{row:<12} {t['steps']:>6} {t['tokens_per_second']:>11.0f} {t.get('peak_cuda_mib', 0):>14.0f} "
              f"{f1 if f1 is None else round(f1, 4)!s:>8}  {runs[-1].parent}")
    elif skipped.is_file():
        print(f"{row:<12} {'-':>6} {'-':>11} {'-':>14} {'-':>8}  {skipped.read_text().strip()}")
    elif (out / f"{row}.log").is_file():
        print(f"{row:<12} {'-':>6} {'-':>11} {'-':>14} {'-':>8}  FAILED: see {out / (row + '.log')}")
PYEOF
echo
[ -f "$OUT/loadtest.txt" ] && grep -E "^\||mixed /" "$OUT/loadtest.txt"
[ -f "$OUT/scaling.md" ] && cat "$OUT/scaling.md"
true
