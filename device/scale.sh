#!/usr/bin/env bash
# bench-scale on the GPU window: every method at SD3.5-Medium's real size (random bf16 weights, 512 px) with LoRA
# roles, plus full-copy roles for one method, then `fewstep-rl plan` for the same configurations, compared with the
# measured peaks. Writes $OUT/scale/summary.txt and $OUT/scale/logs.tar.gz. Wall budget: 7 min (DEADLINE seconds).
#   OUT=/tmp/dev NCORES=2 DEVICE=cpu QUICK=1 bash device/scale.sh      # the CPU rehearsal at tiny width
set -u
OUT=${OUT:-/tmp/dev}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; NCORES=${NCORES:-2}
DEADLINE=${DEADLINE:-370}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
D="$OUT/scale"; W=$(mktemp -d); mkdir -p "$D"
PY=${PY:-python3}
FEW="$PY -m fewstep_rl.cli"
start=$(date +%s)
echo "[scale] start $(date -u +%H:%M:%S) device=$DEVICE quick=$QUICK"
if [ "$QUICK" = 1 ]; then
  ARGS=(--arch tiny --device "$DEVICE" --max-batch 2 --max-group 2 --time-cap 10 --row-timeout 90)
  ARCH=tiny
else
  ARGS=(--arch sd3.5-medium --device "$DEVICE" --max-batch 2 --max-group 2 --time-cap 22 --row-timeout 75)
  ARCH=sd3.5-medium
fi
{
  echo "# bench-scale: $(date -u)  device=$DEVICE arch=$ARCH"
  $PY - <<'PYEOF' 2>&1
import torch, platform
print("torch", torch.__version__, "python", platform.python_version(), "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
} > "$W/head.txt"
echo "[scale] rows (LoRA roles for every method, full copies for refl)"
$PY benchmarks/scale.py "${ARGS[@]}" --roles lora --full-methods refl --deadline "$DEADLINE" \
    --plan-check --out "$W/rows.json" > "$W/table.md" 2> "$W/bench.log"
echo "[scale] bench rc=$? after $(( $(date +%s) - start )) s"
echo "[scale] plan"
for m in rtdmd flow_grpo dmd2; do
  for roles in lora full; do
    timeout 60 $FEW plan --method "$m" --world sd3 --arch "$ARCH" --roles "$roles" --precision bf16 \
        --memory 141 >> "$W/plan.txt" 2>&1 || echo "plan $m $roles failed" >> "$W/plan.txt"
  done
done
timeout 60 $FEW plan --method rtdmd --world sd3 --arch "$ARCH" --roles full --devices 8 --strategy fsdp2 \
    --memory 80 >> "$W/plan.txt" 2>&1 || echo "plan fsdp2 failed" >> "$W/plan.txt"
{
  cat "$W/head.txt"; echo; echo "## measured"; cat "$W/table.md"; echo
  echo "## bench log (tail)"; tail -n 40 "$W/bench.log"; echo
  echo "## plan"; cat "$W/plan.txt"
  echo; echo "# total wall $(( $(date +%s) - start )) s"
} > "$D/summary.txt"
tar -czf "$D/logs.tar.gz" -C "$W" . 2>/dev/null
echo "[scale] done in $(( $(date +%s) - start )) s -> $D/summary.txt"
