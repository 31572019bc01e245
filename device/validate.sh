#!/usr/bin/env bash
# Issue 13 item 2: `fewstep-rl validate` of crd, didr (exact DRS) and rtdmd on 10 random toy2d worlds (seed 0),
# CPU only, 1 thread per world, one pool of NCORES worker processes (interleaved by world index, so a run cut by the
# wall limit still has the first worlds of every method). Writes $OUT/validate/{summary.txt,logs.tar.gz}.
#   OUT=/tmp/dev NCORES=2 DEVICE=cpu QUICK=1 bash device/validate.sh      # smoke test (1 world, few steps)
set -u
OUT=${OUT:?set OUT}; NCORES=${NCORES:-10}; QUICK=${QUICK:-0}; WALL=${WALL:-400}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
R=$OUT/validate; W=$(mktemp -d); mkdir -p "$R"
FR=${FEWSTEP_RL:-fewstep-rl}
METHODS=${METHODS:-rtdmd,didr,crd}
if [ "$QUICK" = 1 ]; then ARGS="--worlds 1 --steps 6 --eval_samples 200"; WALL=300; else ARGS="--worlds 10 --seed 0"; fi
echo "validate: $METHODS NCORES=$NCORES wall=${WALL}s start $(date -u +%T)"
start=$(date +%s)
# own process group, so the wall limit stops the worker processes too
SETSID=$(command -v setsid || true)
$SETSID $FR validate --method $METHODS $ARGS --jobs "$NCORES" --out "$W/v" > "$W/validate.log" 2>&1 &
pid=$!
( sleep "$WALL"; echo "wall limit ${WALL}s reached: stopping" >> "$W/validate.log"
  kill -TERM -- -$pid 2>/dev/null || kill -TERM $pid 2>/dev/null; sleep 5
  kill -KILL -- -$pid 2>/dev/null || kill -KILL $pid 2>/dev/null ) &
watcher=$!
wait $pid; rc=$?
kill $watcher 2>/dev/null
echo "exit $rc after $(( $(date +%s) - start )) s" >> "$W/validate.log"
{
  echo "# fewstep-rl validate on the big machine ($(date -u +%F' '%T) UTC), NCORES=$NCORES QUICK=$QUICK"
  echo "# command: fewstep-rl validate --method $METHODS $ARGS --jobs $NCORES (timeout ${WALL}s)"
  grep -v '^\s*$' "$W/validate.log" | grep -iv 'warn\|available:\|Tip:'
  echo; echo "# per-method summaries over the worlds that finished (from results.json)"
  for m in ${METHODS//,/ }; do
    python3 - "$W/v/$m/results.json" "$m" <<'PY' 2>&1
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except OSError:
    print(sys.argv[2], "no results"); sys.exit(0)
s = d["summary"]
print(sys.argv[2], json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}))
PY
  done
} > "$R/summary.txt" 2>&1
( cd "$W" && tar czf "$R/logs.tar.gz" validate.log $(find v -name results.json -o -name results.csv -o -name metrics.json -o -name config.yaml -o -name metrics.csv) 2>/dev/null )
ls -la "$R"; cat "$R/summary.txt"
