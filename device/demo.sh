#!/usr/bin/env bash
# Issue 13 item 4 (the default run beats its teacher): check configs/demo.yaml across seeds and on CPU numerics.
#   OUT=<dir> NCORES=<n> DEVICE=cuda bash device/demo.sh        (QUICK=1: a few iterations, for a CPU smoke test)
# Four lanes (one process each, 1 thread):
#   cpu0, cpu1: the demo preset trained on the CPU (seeds 0, 1; checkpoint every 100) until the time budget ends:
#               CPU numerics and the CPU seconds per iteration on a quiet core;
#   gpuA, gpuB: the demo preset on $DEVICE at seeds 1..4 (600 it.) and the render-only proxy (no gold labels in
#               the training reward) at seeds 1, 2, as far as the time allows.
# Every run's checkpoints 400/500/600 (CPU runs: the last two reached) are paired-evaluated on $DEVICE against the
# teacher's 4-step Euler + CFG chain on 2048 samples (docs/results/paired_gold.py --device).
# Writes $OUT/demo/summary.txt and $OUT/demo/logs.tar.gz; fails soft (each lane independent).
set -u
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
: "${OUT:?set OUT}" "${NCORES:=4}" "${DEVICE:=cuda}" "${QUICK:=0}" "${WALL:=430}"
D=$OUT/demo; W=$(mktemp -d); mkdir -p "$D"; S=$D/summary.txt; T0=$(date +%s)
left() { echo $((WALL - ($(date +%s) - T0))); }
if [ "$QUICK" = 1 ]; then IT=4; CK=2; N=64; EV="2 4"; CPU_STOP=60; else IT=600; CK=100; N=2048; EV="400 500 600"; CPU_STOP=90; fi
echo "demo device check: DEVICE=$DEVICE NCORES=$NCORES IT=$IT N=$N $(date -u +%T)" | tee "$S"
say() { echo "$*" | tee -a "$S"; }
fit() {  # name, accelerator, timeout, extra args...
  local n=$1 acc=$2 lim=$3; shift 3
  [ "$lim" -gt 20 ] || { say "fit $n skipped (no time left)"; return 1; }
  timeout -k 15 "$lim" fewstep-rl fit --config configs/demo.yaml --trainer.accelerator "$acc" \
    --trainer.max_steps $IT --trainer.ckpt_every $CK --trainer.progress_bar false --trainer.num_threads 1 \
    --trainer.run_dir "$W/$n" "$@" > "$W/$n.fit.log" 2>&1
  local rc=$?
  say "fit $n ($acc) rc=$rc t=$(( $(date +%s) - T0 ))s checkpoints: $(cd "$W/$n/checkpoints" 2>/dev/null && ls -l --time-style=+%T iter=*.ckpt 2>/dev/null | awk '{print $7"@"$6}' | tr '\n' ' ')"
}
pair() {  # name, checkpoint files...
  local n=$1; shift
  [ $# -gt 0 ] || { say "pair $n: no checkpoints"; return; }
  local lim=$(( $(left) - 5 ))
  [ "$lim" -gt 10 ] || { say "pair $n skipped (no time left)"; return; }
  timeout -k 5 "$lim" python3 docs/results/paired_gold.py "$@" --teacher --n $N --device "$DEVICE" \
    > "$W/$n.pair.log" 2>&1
  local rc=$?
  { echo "== $n (rc=$rc)"; grep '^{' "$W/$n.pair.log" | sed "s#$W/##g"; } > "$W/$n.sum"
  cat "$W/$n.sum" >> "$S"  # one write: lanes append concurrently
}
cks() {  # name, iterations... -> existing checkpoint paths
  local n=$1; shift
  for i in "$@"; do f=$(printf "%s/%s/checkpoints/iter=%06d.ckpt" "$W" "$n" "$i"); [ -f "$f" ] && echo "$f"; done
}
gpu_lane() {  # "name|args" ...
  for spec in "$@"; do
    local n=${spec%%|*} a=${spec#*|}
    fit "$n" "$DEVICE" $(( $(left) - 60 )) $a || continue
    [ "$(left)" -gt 30 ] && pair "$n" $(cks "$n" $EV)
  done
}
cpu_lane() {  # name, args...
  local n=$1; shift
  fit "$n" cpu $(( $(left) - CPU_STOP )) "$@"
  pair "$n" $(ls "$W/$n"/checkpoints/iter=*.ckpt 2>/dev/null | tail -n 2)
}
cpu_lane cpu0 --trainer.seed 0 &
[ "$NCORES" -ge 2 ] && cpu_lane cpu1 --trainer.seed 1 &
R="--config configs/shapes/proxy_renders.yaml"
if [ "$NCORES" -ge 4 ]; then
  gpu_lane "seed1|--trainer.seed 1" "seed2|--trainer.seed 2" "renders_s1|$R --trainer.seed 1" &
  gpu_lane "seed3|--trainer.seed 3" "renders_s2|$R --trainer.seed 2" "seed4|--trainer.seed 4" &
else
  gpu_lane "seed1|--trainer.seed 1" "renders_s1|$R --trainer.seed 1" &
fi
wait
say "end t=$(( $(date +%s) - T0 ))s"
(cd "$W" && tar -czf "$D/logs.tar.gz" ./*.log ./*/eval.jsonl ./*/metrics.csv 2>/dev/null)
cat "$S"
