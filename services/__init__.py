"""The gateway's workers: each a thin bus shell (`shell.py`) around a pure decider (`decider.py`)."""
