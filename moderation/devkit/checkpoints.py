"""Which tiny checkpoint the devkit serves when the user names none: the only place that picks a test model."""

from __future__ import annotations

from pathlib import Path

from moderation.errors import ModelError


def default_checkpoint(home: Path) -> tuple[Path, bool]:
    """The trained tiny checkpoint when the repository has one (True), else the random tiny one under
    `home`/models/fakevlm-tiny, built on first use (False: its verdicts mean nothing)."""
    trained = _trained_checkpoint()
    if trained is not None:
        return trained, True
    from moderation.devkit.tinymodel import build_tiny_checkpoint

    return build_tiny_checkpoint(Path(home) / "models" / "fakevlm-tiny"), False


def _trained_checkpoint() -> Path | None:
    from moderation.devkit.training import trained_checkpoint

    try:
        return trained_checkpoint()
    except ModelError:  # not built (yet): `moderation model train-tiny`
        return None
