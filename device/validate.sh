#!/usr/bin/env bash
# Issue 13 item 2: `fewstep-rl validate` of crd, didr (exact DRS) and rtdmd on 10 random toy2d worlds (seed 0),
# CPU only, 1 thread per world, NCORES processes in all. Writes $OUT/validate/{summary.txt,logs.tar.gz}.
#   OUT=/tmp/dev NCORES=2 DEVICE=cpu QUICK=1 bash device/validate.sh      # smoke test (1 world, few steps)
set -u
OUT=${OUT:?set OUT}; NCORES=${NCORES:-10}; QUICK=${QUICK:-0}; WALL=${WALL:-400}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
R=$OUT/validate; W=$(mktemp -d); mkdir -p "$R"
FR=${FEWSTEP_RL:-fewstep-rl}
if [ "$QUICK" = 1 ]; then EXTRA="--worlds 1 --steps 6 --eval_samples 200"; JR=1; JD=1; JC=1; WALL=120
else
  EXTRA="--worlds 10 --seed 0"
  # rtdmd worlds are the longest: cores split about 5 / 3 / 2 for NCORES = 10
  JR=$(( NCORES / 2 )); JD=$(( (NCORES - JR) * 3 / 5 )); [ "$JD" -lt 1 ] && JD=1; JC=$(( NCORES - JR - JD )); [ "$JC" -lt 1 ] && JC=1
fi
echo "validate: NCORES=$NCORES jobs rtdmd=$JR didr=$JD crd=$JC wall=${WALL}s $(date -u +%T)"
start=$(date +%s)
for m in rtdmd didr crd; do
  case $m in rtdmd) j=$JR;; didr) j=$JD;; crd) j=$JC;; esac
  ( timeout "$WALL" $FR validate --method $m $EXTRA --jobs $j --out "$W/$m" > "$W/$m.log" 2>&1; echo "$m exit $? after $(( $(date +%s) - start )) s" >> "$W/status" ) &
done
wait
{
  echo "# fewstep-rl validate on the big machine ($(date -u +%F' '%T) UTC), NCORES=$NCORES QUICK=$QUICK"
  cat "$W/status"
  for m in rtdmd didr crd; do
    echo; echo "## $m: fewstep-rl validate --method $m $EXTRA --jobs (rows as they finished; partial on timeout)"
    grep -v '^\s*$' "$W/$m.log" | grep -v Warning | tail -n 40
  done
} > "$R/summary.txt" 2>&1
( cd "$W" && tar czf "$R/logs.tar.gz" --exclude='*.ckpt' */results.json */results.csv *.log */worlds/*/metrics.json */worlds/*/config.yaml 2>/dev/null )
ls -la "$R"; cat "$R/summary.txt"
