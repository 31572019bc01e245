#!/usr/bin/env bash
# Issue 13 item 4 (the default run beats its teacher): rank the demo preset's robustness across seeds on a GPU.
#   OUT=<dir> NCORES=<n> DEVICE=cuda bash device/demo.sh        (QUICK=1: a few iterations, for a CPU smoke test)
# Round 1: configs/demo.yaml at seeds 1..NCORES (checkpoints every 100), each checkpoint 400/500/600 paired-evaluated
# against the teacher's 4-step Euler + CFG chain on 2048 samples (docs/results/paired_gold.py --device).
# Round 2 (if time is left): the render-only proxy (no gold labels in the training reward) at two seeds, and
# neighbours of the preset (beta 0.002, lr 5e-4), final checkpoint only.
# Writes $OUT/demo/summary.txt and $OUT/demo/logs.tar.gz; fails soft (each part independent).
set -u
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
: "${OUT:?set OUT}" "${NCORES:=4}" "${DEVICE:=cuda}" "${QUICK:=0}" "${WALL:=420}"
D=$OUT/demo; W=$(mktemp -d); mkdir -p "$D"; S=$D/summary.txt; T0=$(date +%s)
left() { echo $((WALL - ($(date +%s) - T0))); }
if [ "$QUICK" = 1 ]; then IT=4; CK=2; N=64; EV="2 4"; else IT=600; CK=100; N=2048; EV="400 500 600"; fi
echo "demo device sweep: DEVICE=$DEVICE NCORES=$NCORES IT=$IT N=$N $(date -u +%T)" | tee "$S"
fit() {  # name, extra args...
  local n=$1; shift
  timeout $(( $(left) - 60 )) fewstep-rl fit --config configs/demo.yaml --trainer.accelerator "$DEVICE" \
    --trainer.max_steps $IT --trainer.ckpt_every $CK --trainer.progress_bar false --trainer.num_threads 1 \
    --trainer.run_dir "$W/$n" "$@" > "$W/$n.fit.log" 2>&1
  echo "fit $n rc=$? t=$(( $(date +%s) - T0 ))s" | tee -a "$S"
}
pair() {  # name, iterations...
  local n=$1; shift; local ck=()
  for i in "$@"; do f=$(printf "%s/%s/checkpoints/iter=%06d.ckpt" "$W" "$n" "$i"); [ -f "$f" ] && ck+=("$f"); done
  [ ${#ck[@]} -gt 0 ] || { echo "pair $n: no checkpoints" | tee -a "$S"; return; }
  timeout $(( $(left) - 10 )) python3 docs/results/paired_gold.py "${ck[@]}" --teacher --n $N --device "$DEVICE" \
    > "$W/$n.pair.log" 2>&1
  echo "== $n (rc=$?)" >> "$S"; grep '^{' "$W/$n.pair.log" | sed "s#$W/##g" >> "$S"
}
run_round() {  # "name|args" ...
  local specs=("$@") i=0
  for spec in "${specs[@]}"; do
    n=${spec%%|*}; a=${spec#*|}; fit "$n" $a &
    i=$((i + 1)); [ $((i % NCORES)) = 0 ] && wait
  done; wait
}
R1=(); for s in $(seq 1 "$NCORES"); do R1+=("seed$s|--trainer.seed $s"); done
run_round "${R1[@]}"
for s in $(seq 1 "$NCORES"); do pair "seed$s" $EV & [ $((s % NCORES)) = 0 ] && wait; done; wait
echo "round 1 done t=$(( $(date +%s) - T0 ))s, left $(left)s" | tee -a "$S"
if [ "$(left)" -gt 200 ]; then
  R2=("renders_s1|--config configs/shapes/proxy_renders.yaml --trainer.seed 1"
      "renders_s2|--config configs/shapes/proxy_renders.yaml --trainer.seed 2"
      "b2s1|--method.beta 0.002 --trainer.seed 1" "lr5s1|--method.lr 5e-4 --trainer.seed 1")
  run_round "${R2[@]:0:$NCORES}"
  for spec in "${R2[@]:0:$NCORES}"; do pair "${spec%%|*}" $IT & done; wait
fi
echo "end t=$(( $(date +%s) - T0 ))s" | tee -a "$S"
tar -czf "$D/logs.tar.gz" -C "$W" $(cd "$W" && ls *.log 2>/dev/null) $(cd "$W" && ls */eval.jsonl 2>/dev/null) 2>/dev/null
cat "$S"
