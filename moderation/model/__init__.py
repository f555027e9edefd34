"""FakeVLM: preprocessing, scoring, weights identity, Triton I/O and the detector backends. What the Triton
model image installs (with `moderation.errors`); never imports the worker, the devkit or the offline tools."""

from __future__ import annotations

import importlib.util

from moderation.errors import ModelError

MODEL_EXTRA = "pip install 'moderation[model]'"
EVAL_MAX_NEW_TOKENS = 256  # free answers' length in FakeVLM's scripts/eval.py


def require_model_extra(purpose: str, modules: tuple[str, ...] = ("torch", "transformers")) -> None:
    """A clear ModelError at start when a slim install (no `model` extra) is asked to run FakeVLM here."""
    missing = [name for name in modules if not _importable(name)]
    if missing:
        raise ModelError(f"{purpose} needs {' and '.join(missing)}, which this install lacks: {MODEL_EXTRA}")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a meta path finder that refuses it
        return False
