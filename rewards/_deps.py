"""Optional-dependency guard shared by the reward zoo: a missing extra is one line naming the ``pip install`` to run.

The error is a :class:`fewstep_rl.config.ConfigError`, so the CLI prints it on one line and exits with code 2.
"""

from __future__ import annotations

import importlib
from typing import Any

from fewstep_rl.config import ConfigError


class MissingExtra(ConfigError):
    """A reward needs a package that is not installed."""


def require(module: str, extra: str, reward: str) -> Any:
    """Import ``module`` or raise :class:`MissingExtra` naming ``pip install 'fewstep-rl[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(
            f"reward {reward!r} needs the '{extra}' extra ({module} is not importable: {e}); "
            f"run: pip install 'fewstep-rl[{extra}]'"
        ) from None
