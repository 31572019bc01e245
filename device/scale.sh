#!/usr/bin/env bash
# bench-scale on the GPU window: every method at SD3.5-Medium's real size (random bf16 weights, 512 px) with LoRA
# roles, plus full-copy roles for one method, then `fewstep-rl plan` for the same configurations, compared with the
# measured peaks. Writes $OUT/scale/summary.txt and $OUT/scale/logs.tar.gz. Wall budget: 7 min (DEADLINE seconds).
#   OUT=/tmp/dev NCORES=2 DEVICE=cpu QUICK=1 bash device/scale.sh      # the CPU rehearsal at tiny width
#   WORLDS=sd3,flux,flux2,zimage,qwen_image bash device/scale.sh        # + FLUX.1-dev, FLUX.2-klein-4B, Z-Image-Turbo,
#                                                                       #   Qwen-Image: FAMILY_ROWS (dmd2) each
# Every other world gets FAMILY_S seconds (hard: scale.py --deadline) taken from the sd3 rows' share of DEADLINE,
# so the GPU part never passes DEADLINE; the CPU plan part runs beside it and is cut at DEADLINE + 20 s.
set -u
OUT=${OUT:-/tmp/dev}; DEVICE=${DEVICE:-cuda}; QUICK=${QUICK:-0}; NCORES=${NCORES:-2}
DEADLINE=${DEADLINE:-370}
WORLDS=${WORLDS:-sd3}; FAMILY_ROWS=${FAMILY_ROWS:-dmd2}; FAMILY_S=${FAMILY_S:-55}
OTHERS=$(echo "$WORLDS" | tr ',' '\n' | grep -v '^sd3$' | tr '\n' ' ')
N_OTHERS=$(echo $OTHERS | wc -w)
SD3_S=$(( DEADLINE - N_OTHERS * FAMILY_S ))
arch_of() {  # the world's real architecture (its tiny twin with QUICK=1): fewstep_rl.perf.arch
  [ "$QUICK" = 1 ] && { echo "tiny-$1"; return; }
  case $1 in flux) echo flux.1-dev;; flux2) echo flux.2-klein-4b;; zimage) echo z-image-turbo;; qwen_image) echo qwen-image;; esac
}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
D="$OUT/scale"; W=$(mktemp -d); mkdir -p "$D"
PY=${PY:-python3}
FEW="$PY -m fewstep_rl.cli"
start=$(date +%s)
# priority order (rows left when the deadline comes are reported as skipped)
ROWS=${ROWS:-rtdmd,dmd2,flow_grpo,refl,rtdmd@rl,crd,nft,tdm,tdm_r1,didr,di_star}
echo "[scale] start $(date -u +%H:%M:%S) device=$DEVICE quick=$QUICK worlds=$WORLDS"
if [ "$QUICK" = 1 ]; then
  ARGS=(--arch tiny --device "$DEVICE" --max-batch 2 --max-group 2 --time-cap 8 --row-timeout 90 --methods "$ROWS")
  ARCH=tiny
else
  ARGS=(--arch sd3.5-medium --device "$DEVICE" --max-batch 2 --max-group 2 --time-cap 12 --row-timeout 90 \
        --methods "$ROWS")
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
write_summary() {
{
  cat "$W/head.txt"; echo; echo "## measured"; cat "$W/table.md" 2>/dev/null; echo
  echo "## measured peak vs fewstep-rl plan"; cat "$W/compare.md" 2>/dev/null || echo "(pending)"; echo
  for w in $OTHERS; do
    echo "## $w: measured"; cat "$W/table_$w.md" 2>/dev/null || echo "(pending)"; echo
    echo "## $w: measured peak vs fewstep-rl plan"; cat "$W/compare_$w.md" 2>/dev/null || echo "(pending)"; echo
  done
  echo "## plan rows log"; grep -v "available:\|Tip:" "$W/plan_rows.log" 2>/dev/null | tail -n 20; echo
  echo "## bench log (tail)"; tail -n 40 "$W/bench.log" 2>/dev/null; echo
  echo "## plan"; cat "$W/plan.txt" 2>/dev/null
  echo; echo "# total wall $(( $(date +%s) - start )) s"
} > "$D/summary.txt"
}
echo "[scale] plan estimates of the same rows + fewstep-rl plan lines, in the background (CPU, meta device)"
(
  timeout "$DEADLINE" $PY benchmarks/scale.py "${ARGS[@]}" --device cpu --dtype bfloat16 --roles lora \
      --full-methods refl --plan-only --out "$W/plans.json" > /dev/null 2> "$W/plan_rows.log"
  for w in $OTHERS; do  # the other worlds' rows, estimated (their tiny twin's passes on the CPU)
    left=$(( DEADLINE - ($(date +%s) - start) ))
    [ "$left" -lt 20 ] && continue
    timeout "$left" $PY benchmarks/scale.py --world "$w" --arch "$(arch_of "$w")" --device cpu --dtype bfloat16 --roles lora \
        --max-batch 2 --max-group 2 --methods "$FAMILY_ROWS" --plan-only --out "$W/plans_$w.json" \
        > /dev/null 2>> "$W/plan_rows.log"
  done
  for spec in "rtdmd lora 1" "rtdmd full 1" "dmd2 full 1" "rtdmd full 8"; do
    set -- $spec
    extra=(); [ "$3" -gt 1 ] && extra=(--devices "$3" --strategy fsdp2)
    left=$(( DEADLINE - ($(date +%s) - start) ))
    [ "$left" -lt 20 ] && { echo "plan $spec: skipped (time)" >> "$W/plan.txt"; continue; }
    timeout "$left" $FEW plan --method "$1" --world sd3 --arch "$ARCH" --roles "$2" --precision bf16 \
        --memory 141 "${extra[@]}" >> "$W/plan.txt" 2>&1 || echo "plan $spec failed" >> "$W/plan.txt"
  done
) &
PLAN_PID=$!
echo "[scale] rows (LoRA roles for every method, full copies for refl)"
$PY benchmarks/scale.py "${ARGS[@]}" --roles lora --full-methods refl \
    --deadline "$(( SD3_S - ($(date +%s) - start) ))" --out "$W/rows.json" > "$W/table.md" 2> "$W/bench.log"
echo "[scale] bench rc=$? after $(( $(date +%s) - start )) s"
for w in $OTHERS; do  # one world at a time, FAMILY_S seconds each (rows left over are reported as skipped)
  $PY benchmarks/scale.py --world "$w" --arch "$(arch_of "$w")" --device "$DEVICE" --max-batch 2 --max-group 2 \
      --time-cap 12 --row-timeout "$FAMILY_S" --methods "$FAMILY_ROWS" --roles lora --deadline "$FAMILY_S" \
      --out "$W/rows_$w.json" > "$W/table_$w.md" 2>> "$W/bench.log"
  echo "[scale] $w rc=$? after $(( $(date +%s) - start )) s"
done
write_summary  # a first version now, in case the plan part is cut short
left=$(( DEADLINE + 20 - ($(date +%s) - start) ))
for _ in $(seq 1 $(( left > 0 ? left : 1 ))); do kill -0 $PLAN_PID 2>/dev/null || break; sleep 1; done
pkill -P $PLAN_PID 2>/dev/null; kill $PLAN_PID 2>/dev/null  # (by id: only if the plan part overran)
echo "[scale] plan part done after $(( $(date +%s) - start )) s"
$PY benchmarks/scale.py --compare "$W/rows.json" "$W/plans.json" > "$W/compare.md" 2>&1
for w in $OTHERS; do
  $PY benchmarks/scale.py --compare "$W/rows_$w.json" "$W/plans_$w.json" > "$W/compare_$w.md" 2>&1
done
write_summary
tar -czf "$D/logs.tar.gz" -C "$W" . 2>/dev/null
echo "[scale] done in $(( $(date +%s) - start )) s -> $D/summary.txt"
