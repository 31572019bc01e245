"""fewstep-rl compare: methods side by side on one shared config (see runner.py)."""
