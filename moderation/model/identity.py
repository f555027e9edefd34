"""What a model's weights are, not where they lie: the identity that verdicts carry and the cache keys on.

- A snapshot of the Hugging Face hub cache (`.../models--org--name/snapshots/<commit>`), or a hub id found
  in that cache: `hf:org/name@<commit>`, since the commit names the content of every file.
- Any other directory (`hf download --local-dir`, a volume, the tiny test checkpoint): `sha256:<hex>` over
  every file's relative path, size and sha256, computed once when the model loads. Dot-files and
  dot-directories (`hf download`'s `.cache/`) are left out: they record downloads, not weights.

A path or "latest" is never an identity: the same path holds other weights after the next download.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from moderation.errors import ModelError

_SNAPSHOT = re.compile(r"/models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})$")


def weights_identity(checkpoint: str | Path) -> str:
    """The identity of the weights a checkpoint (a directory or a hub id) loads; ModelError when unknown."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        if snapshot := _SNAPSHOT.search(resolved.as_posix()):
            return f"hf:{snapshot['repo'].replace('--', '/', 1)}@{snapshot['commit']}"
        return directory_digest(resolved)
    return _hub_identity(str(checkpoint))


def combined_identity(parts: list[str | Path]) -> str:
    """One identity for weights in several places (the GPU layout: tokenizer, vision engine, LLM engine)."""
    return "sha256:" + hashlib.sha256("\n".join(weights_identity(p) for p in parts).encode()).hexdigest()


def directory_digest(directory: Path) -> str:
    """sha256 over (relative path, size, sha256 of the content) of every file, in path order."""
    outer = hashlib.sha256()
    for file in sorted(_files(directory)):
        with file.open("rb") as stream:
            inner = hashlib.file_digest(stream, "sha256").hexdigest()
        outer.update(f"{file.relative_to(directory).as_posix()}\0{file.stat().st_size}\0{inner}\n".encode())
    return f"sha256:{outer.hexdigest()}"


def _files(directory: Path) -> list[Path]:
    return [
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]


def _hub_identity(repo_id: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise ModelError(f"{repo_id} is neither a directory nor in the Hugging Face hub cache: its weights are unknown")
    return weights_identity(Path(found).parent)
