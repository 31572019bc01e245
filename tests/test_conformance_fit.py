"""Conformance, part 2: ``fewstep-rl fit`` of every registered method for 2 iterations through the real CLI on each
conformance case's world (sd3, flux, flux2, zimage and qwen_image on tiny random pipeline directories, shapes, toy2d); see
fewstep_rl.testing.conformance."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from fewstep_rl import registry
from fewstep_rl.testing.cases import CASES
from fewstep_rl.testing.conformance import checks_for

METHODS = registry.names("methods")
PARAMS = [
    pytest.param(name, method, id=f"{name}-{method}")
    for name, case in CASES.items() for check, method in checks_for(case, METHODS) if check == "cli_fit"
]


def test_every_case_with_a_world_fits_every_method():
    with_world = [n for n, c in CASES.items() if c.world is not None]
    assert {"sd3", "shapes", "toy2d", "flux", "flux2", "zimage", "qwen_image"} <= {p.values[0] for p in PARAMS}
    assert len(PARAMS) == len(with_world) * len(METHODS)


@pytest.mark.parametrize(("name", "method"), PARAMS)
def test_fit_through_the_cli(suites, name, method, tmp_path):
    suites(name).check_cli_fit(method, tmp_path / "run")
