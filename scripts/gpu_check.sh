#!/usr/bin/env bash
# GPU check of the training engine, a few minutes on one machine with CUDA GPUs. Prints one table:
#   - LoRA on CoNLL-2003 in float32 and in bf16: real tokens/s, peak torch.cuda.max_memory_allocated, test entity F1
#     after a short run (STEPS optimizer steps);
#   - the same LoRA on an 8-bit base (bitsandbytes, the [cuda] extra), when installed;
#   - DDP over every GPU present (accelerate launch, configs/accelerate/multi_gpu_ddp.yaml), when there are 2 or more;
#   - serving (issue 25's goal): bench/loadtest.py --compare on the GPU, 4 LoRA adapters mixed in one forward vs one
#     adapter vs switching (--no-mix); its table is written to OUT/loadtest.txt.
# Usage: scripts/gpu_check.sh [OUT_DIR]      env: PYTHON (default .venv/bin/python), PEFT_FT_DATA_DIR, STEPS (300)
# Status: written without a GPU; it has not run yet.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu_check_runs}
STEPS=${STEPS:-300}
mkdir -p "$OUT"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then echo "no CUDA GPU visible to torch: nothing to check" >&2; exit 2; fi
COMMON=(--set train.device=cuda --set train.max_steps="$STEPS" --set train.epochs=1 --set data.max_eval_samples=1000
        --set eval.predictions=false --set output.dir="$OUT")

run() {  # name, then extra arguments for `peft-ft run`; a failure is recorded, the check goes on
  local name=$1; shift
  echo "== $name" >&2
  if "$@" "${COMMON[@]}" --set output.name="$name" >"$OUT/$name.log" 2>&1; then echo "$name ok" >&2
  else echo "$name FAILED (see $OUT/$name.log)" >&2; fi
}

run fp32 "$PY" -m peft_ft run recipes/conll_lora.toml --set train.mixed_precision=no
run bf16 "$PY" -m peft_ft run recipes/conll_lora.toml --set train.mixed_precision=bf16
if "$PY" -c "import bitsandbytes" 2>/dev/null; then
  run int8-base "$PY" -m peft_ft run recipes/conll_lora.toml --set model.load_in_8bit=true
else
  echo "int8-base skipped: bitsandbytes not installed (pip install 'peft-ft[cuda]')" >"$OUT/int8-base.skipped"
fi
if [ "$GPUS" -ge 2 ]; then
  run "ddp-$GPUS" "$PY" -m accelerate.commands.launch --config_file configs/accelerate/multi_gpu_ddp.yaml \
      --num_processes "$GPUS" -m peft_ft run recipes/conll_lora.toml
else
  echo "ddp skipped: 1 GPU present" >"$OUT/ddp.skipped"
fi

echo "== loadtest (serve on cuda)" >&2
"$PY" bench/loadtest.py --compare --device cuda --seconds 20 --adapter a=adapters/grading_lora --adapter b=adapters/grading_lora \
    --adapter c=adapters/grading_lora --adapter d=adapters/grading_lora >"$OUT/loadtest.txt" 2>&1 \
  || echo "loadtest FAILED (see $OUT/loadtest.txt)" >&2

"$PY" - "$OUT" "$GPUS" <<'PYEOF'
import json, sys
from pathlib import Path

out, gpus = Path(sys.argv[1]), sys.argv[2]
import torch
print(f"\n{torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}")
print(f"{'run':<12} {'steps':>6} {'real tok/s':>11} {'peak CUDA MiB':>14} {'test F1':>8}  note")
for name in ["fp32", "bf16", "int8-base", "ddp", *[p.stem for p in sorted(out.glob("ddp-*.log"))]]:
    skipped = out / f"{name}.skipped"
    runs = sorted((out / name).glob("*/metrics.json")) if (out / name).is_dir() else []
    if skipped.is_file():
        print(f"{name:<12} {'-':>6} {'-':>11} {'-':>14} {'-':>8}  {skipped.read_text().strip()}")
    elif runs:
        m = json.loads(runs[-1].read_text())
        t, f1 = m["train"], m.get("test", {}).get("f1")
        print(f"{name:<12} {t['steps']:>6} {t['tokens_per_second']:>11.0f} {t.get('peak_cuda_mib', 0):>14.0f} "
              f"{f1 if f1 is None else round(f1, 4)!s:>8}  {runs[-1].parent}")
    elif (out / f"{name}.log").is_file():
        print(f"{name:<12} {'-':>6} {'-':>11} {'-':>14} {'-':>8}  FAILED: see {out / (name + '.log')}")
PYEOF
echo; grep -E "^\||mixed /" "$OUT/loadtest.txt" || true
