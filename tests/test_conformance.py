"""The backbone conformance suite (fewstep_rl.testing.conformance) for every case: sd3, flux and flux2 (tiny random
pipelines in their real diffusers layouts, loaded through the real code), the shapes world's shipped teacher, and toy2d where a check
applies. A new backbone gets every check by adding one entry to ``fewstep_rl.testing.cases.CASES``; the 2-iteration CLI fit of
every method on each case's world is in test_conformance_fit.py."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from fewstep_rl.testing.cases import CASES
from fewstep_rl.testing.conformance import checks_for

PARAMS = [
    pytest.param(name, check, arg, id=f"{name}-{check}" + (f"[{arg}]" if arg else ""))
    for name, case in CASES.items() for check, arg in checks_for(case)
]


@pytest.mark.parametrize(("name", "check", "arg"), PARAMS)
def test_backbone_conforms(suites, name, check, arg):
    getattr(suites(name), f"check_{check}")(*(() if arg is None else (arg,)))
