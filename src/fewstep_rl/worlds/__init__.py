"""Built-in worlds: ``toy2d`` (analytic correctness lab) and ``shapes`` (the embedded default)."""
