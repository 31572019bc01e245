import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PYTHONHASHSEED", "0")
# Tiny models: extra intra-op threads only add OpenMP overhead here (and subprocesses inherit OMP_NUM_THREADS).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

_DIST_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE",
              "FEWSTEP_RUN_DIR")


@pytest.fixture(autouse=True)
def _clean_env():
    """Lightning leaves distributed variables behind after a DDP run; a later subprocess would hang on them."""
    for k in _DIST_VARS:
        os.environ.pop(k, None)
    yield
    for k in _DIST_VARS:
        os.environ.pop(k, None)


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    """The conformance suite of a backbone case by name (fewstep_rl.testing.cases), built once per test module."""
    from fewstep_rl.testing.cases import CASES
    from fewstep_rl.testing.conformance import Conformance

    made: dict = {}

    def get(name: str):
        if name not in made:
            made[name] = Conformance(CASES[name], tmp_path_factory.mktemp(name))
        return made[name]

    return get
