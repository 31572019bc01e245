"""Paired gold comparison of shapes checkpoints (issue 4): now a thin wrapper over ``fewstep-rl eval --paired``.

    python docs/results/paired_gold.py A.ckpt B.ckpt [C.ckpt ...] [--teacher] [--n 2048] [--labels a,b,c] [--seed 0]

is ``fewstep-rl eval --paired A.ckpt B.ckpt ... --rewards gold [--teacher] ...`` (see
:mod:`fewstep_rl.eval.paired`): same prompts and noise for every checkpoint, mean gold ± se and paired differences
to the first and the previous source ± the standard error of the per-sample differences.
"""

from __future__ import annotations

import sys

from fewstep_rl.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    ckpts = [a for a in args if a.endswith(".ckpt")]
    rest = [a for a in args if not a.endswith(".ckpt")]
    if "--n" not in rest:
        rest += ["--n", "2048"]
    sys.exit(main(["eval", "--paired", *ckpts, "--rewards", "gold", *rest]))
