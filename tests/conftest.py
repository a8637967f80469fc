"""Test-session setup shared by every test file."""

import os
from pathlib import Path

# One cache for the whole test session (the builtin tokenizer and corpus are prepared once, as a user's
# $MIMO_TRAIN_CACHE would keep them), instead of one per run directory, which is the default for a training run.
os.environ.setdefault("MIMO_TRAIN_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "mimo-train"))
