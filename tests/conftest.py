import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("PYTHONHASHSEED", "0")

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
