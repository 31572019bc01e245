#!/usr/bin/env bash
# The reference environment of `make reward-parity` (tests/test_reward_parity.py): a separate venv holding the
# reference reward packages, which need torchvision — no torchvision wheel imports beside this project's CPU torch
# 2.13.0. torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB) are what pip takes from this machine's disk on
# x86_64 (uv does not look there). Every reference package is pinned below the torch constraint, installed and then
# imported; one that cannot be installed or imported is left out with a printed reason. Writes VENV/packages: the
# comma list of the usable ones (PARITY_PACKAGES of the test). open_clip_torch is required.
set -u
V=${1:-.venv-parity}
PY="$V/bin/python"
C="$V/constraints.txt"
t0=$(date +%s)
test -x "$PY" || python3 -m venv "$V" || { echo "reward-parity: cannot create $V" >&2; exit 2; }
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$C"
"$PY" -c "import torch, torchvision" 2>/dev/null \
  || "$PY" -m pip install -q -c "$C" torch torchvision 2>&1 | grep -v "^WARNING: Location" \
  || true
"$PY" -c "import torch, torchvision" || { echo "reward-parity: torch 2.14.1 + torchvision 0.29.1 did not install in $V" >&2; exit 2; }

pipi() { "$PY" -m pip install -q -c "$C" "$@" 2>&1 | grep -v "^WARNING: Location"; return 0; }

pipi open_clip_torch
# hpsv2 1.2.0 bundles an old open_clip copy whose wheel lacks the BPE table (its tokenizer then fails to import):
# the same file from open_clip_torch is copied in.
pipi hpsv2
SP=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -d "$SP/hpsv2/src/open_clip" ] && [ ! -f "$SP/hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz" ]; then
  cp "$SP/open_clip/bpe_simple_vocab_16e6.txt.gz" "$SP/hpsv2/src/open_clip/"
fi
# image-reward 1.5 pins timm==0.6.13 and fairscale==0.4.13 (open_clip_torch 3.3 asks timm>=1.0.17: pip warns; its
# ViT CLIP does not use timm) and imports transformers.modeling_utils.apply_chunking_to_forward (gone in
# transformers 5), diffusers and datasets (which then need the huggingface_hub < 1 of transformers 4), and OpenAI's
# `clip` (PyPI openai-clip, which imports pkg_resources: setuptools < 81).
pipi image-reward openai-clip "setuptools<81" "transformers>=4.27.4,<4.46" "diffusers<0.32" "datasets<3.2" \
  "accelerate<1.2"

ok=()
check() {  # name, import statement, reason if it fails
  if "$PY" -W ignore -c "$2" >/dev/null 2>&1; then ok+=("$1"); else echo "reward-parity: skipping $1: $3" >&2; fi
}
check open_clip "import open_clip, open_clip.tokenizer" "open_clip_torch did not install or import"
check hpsv2 "import hpsv2.src.open_clip.tokenizer" "hpsv2 did not install or its bundled open_clip does not import"
check image_reward "import ImageReward" "image-reward did not install or import with the pins above"
check clip "import clip.model" "openai-clip did not install or import"
"$PY" -c "import torch; assert torch.__version__.startswith('2.14.1')" \
  || { echo "reward-parity: a reference package replaced torch 2.14.1" >&2; exit 2; }
[[ " ${ok[*]} " == *" open_clip "* ]] || { echo "reward-parity: open_clip_torch is required" >&2; exit 2; }
(IFS=,; echo "${ok[*]}") > "$V/packages"
echo "reward-parity: $V ready in $(( $(date +%s) - t0 )) s, $(du -sh "$V" | cut -f1), reference packages: $(cat "$V/packages")"
