"""What a model's weights are, not where they lie: the identity that verdicts carry and the cache keys on.

- A snapshot of the Hugging Face hub cache (`.../models--org--name/snapshots/<commit>`), or a hub id found
  in that cache: `hf:org/name@<commit>`, since the commit names the content of every file.
- A directory with a manifest (`manifest.json`, written once where the weights are made: the engine build,
  the weights Job, `python -m moderation.model.manifest`): `sha256:<hex>` over the manifest and the content of
  every small file beside it (config, tokenizer, processor). The large files (weights, engines) are never read
  at start: the manifest holds their sha256, and only their sizes are checked against it.
- Any other directory of small files only (the tiny test checkpoints): `sha256:<hex>` over every file's
  relative path, size and sha256. A directory with a large file and no manifest has no known identity
  (ModelError): hashing 14 GB at every start is what the manifest exists to avoid.

Dot-files and dot-directories (`hf download`'s `.cache/`) are left out: they record downloads, not weights.
A path or "latest" is never an identity: the same path holds other weights after the next download.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from moderation.errors import ModelError

MANIFEST = "manifest.json"
# Config, tokenizer and processor files are kilobytes to a few MB (tokenizer.json: 1.8 MB); weight shards and
# engines are hundreds of MB to GB. A file above this is read at start only through its manifest entry.
SMALL_FILE_BYTES = 64 * 1024 * 1024

_SNAPSHOT = re.compile(r"/models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})$")


def weights_identity(checkpoint: str | Path) -> str:
    """The identity of the weights a checkpoint (a directory or a hub id) loads; ModelError when unknown."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        if snapshot := _SNAPSHOT.search(resolved.as_posix()):
            return f"hf:{snapshot['repo'].replace('--', '/', 1)}@{snapshot['commit']}"
        if (resolved / MANIFEST).is_file():
            return manifest_identity(resolved)
        return directory_digest(resolved)
    return _hub_identity(str(checkpoint))


def combined_identity(parts: list[str | Path]) -> str:
    """One identity for weights in several places."""
    return "sha256:" + hashlib.sha256("\n".join(weights_identity(p) for p in parts).encode()).hexdigest()


def manifest_identity(directory: Path) -> str:
    """sha256 over the manifest's bytes and every small file beside it; the large files only by their size.

    ModelError when a large file is missing from the manifest or its size differs from the recorded one
    (a rebuilt engine whose manifest was not rewritten)."""
    raw = (directory / MANIFEST).read_bytes()
    recorded = read_manifest_files(raw, directory / MANIFEST)
    outer = hashlib.sha256(raw)
    for file in sorted(_files(directory)):
        relative = file.relative_to(directory).as_posix()
        if relative == MANIFEST:
            continue
        size = file.stat().st_size
        if size <= SMALL_FILE_BYTES:
            outer.update(f"{relative}\0{size}\0{file_sha256(file)}\n".encode())
        elif recorded.get(relative, {}).get("size") != size:
            raise ModelError(
                f"{file} ({size} bytes) is not as {directory / MANIFEST} records it: rewrite the manifest where "
                "the weights were made (python -m moderation.model.manifest)"
            )
    return f"sha256:{outer.hexdigest()}"


def read_manifest_files(raw: bytes, where: Path) -> dict[str, dict[str, object]]:
    """The `files` table of a manifest: relative path -> {size, sha256}."""
    try:
        files = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{where} is not a weights manifest: {exc}") from exc
    if not isinstance(files, dict):
        raise ModelError(f"{where}: `files` is not a table")
    return files


def directory_digest(directory: Path) -> str:
    """sha256 over (relative path, size, sha256 of the content) of every file, in path order; small files only."""
    outer = hashlib.sha256()
    for file in sorted(_files(directory)):
        size = file.stat().st_size
        if size > SMALL_FILE_BYTES:
            raise ModelError(
                f"{directory} has no {MANIFEST} and {file.name} is {size} bytes: write the manifest once "
                f"(python -m moderation.model.manifest {directory}) instead of hashing the weights at every start"
            )
        outer.update(f"{file.relative_to(directory).as_posix()}\0{size}\0{file_sha256(file)}\n".encode())
    return f"sha256:{outer.hexdigest()}"


def file_sha256(file: Path) -> str:
    with file.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


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
