"""Write the manifest of a weights or engine directory, once, where it is made (the identity reads it at start).

    python -m moderation.model.manifest /models/engines --tokenizer /models/fakevlm-hf --dtype float16
    python -m moderation.model.manifest /weights/fakevlm --gpu none       # deploy/weights/job.yaml

The manifest records every file's size and sha256 (the one slow step: it reads every byte), the versions of
the builders installed here, the dtype, the GPU the engines were built on (an engine only runs on its SKU) and
the sha256 of the tokenizer and config files the engines were built with. It holds no time stamp: the same
build writes the same manifest, so the same weights keep the same identity (`moderation.model.identity`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess  # nosec B404: nvidia-smi, a fixed argument list
from importlib import metadata
from pathlib import Path
from typing import Any

from moderation.errors import ModelError
from moderation.model.identity import MANIFEST, SMALL_FILE_BYTES, file_sha256, manifest_identity

BUILDERS = ("tensorrt", "tensorrt_llm", "torch", "transformers", "onnx", "onnxscript", "tokenizers")
# What the LLM's tokenizer and the checkpoint's shape are (the engines were built for these, nothing else).
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def build_manifest(directory: Path, *, dtype: str, gpu: str, tokenizer: Path | None = None) -> dict[str, Any]:
    """The manifest of `directory` (every file hashed), with the facts of the build that made it."""
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not any(s.startswith(".") for s in p.relative_to(directory).parts)
    }
    return {
        "format": 1,
        "dtype": dtype,
        "gpu": gpu,
        "builders": builder_versions(),
        "tokenizer": tokenizer_hashes(tokenizer) if tokenizer is not None else {},
        "files": files,
    }


def write_manifest(directory: Path, *, dtype: str, gpu: str, tokenizer: Path | None = None) -> str:
    """Write `directory/manifest.json` and return the identity it gives the directory."""
    manifest = build_manifest(directory, dtype=dtype, gpu=gpu, tokenizer=tokenizer)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest_identity(directory)


def verify_tokenizer(directory: Path, tokenizer: Path) -> None:
    """ModelError unless `tokenizer` holds the tokenizer and config files the manifest of `directory` records
    (engines answer in the token ids they were built with: another tokenizer would decode them wrongly)."""
    manifest = json.loads((directory / MANIFEST).read_text())
    recorded: dict[str, str] = manifest.get("tokenizer", {})
    if not recorded:
        raise ModelError(f"{directory / MANIFEST} records no tokenizer: write it with --tokenizer")
    found = tokenizer_hashes(tokenizer)
    differ = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
    if differ:
        raise ModelError(f"{tokenizer}: {', '.join(differ)} differ from what {directory / MANIFEST} was built with")


def tokenizer_hashes(directory: Path) -> dict[str, str]:
    return {
        name: file_sha256(directory / name)
        for name in TOKENIZER_FILES
        if (directory / name).is_file() and (directory / name).stat().st_size <= SMALL_FILE_BYTES
    }


def builder_versions() -> dict[str, str]:
    found = {}
    for name in BUILDERS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def stored_dtype(directory: Path) -> str:
    """The dtype a Hugging Face checkpoint's config.json says its weights are stored in; "unknown" without."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return "unknown"
    return str(config.get("dtype") or config.get("torch_dtype") or "unknown")


def gpu_name() -> str:
    """The GPU SKU as nvidia-smi names it ("NVIDIA H100 80GB HBM3"); "none" without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none"
    done = subprocess.run(  # nosec B603: fixed arguments
        [smi, "--query-gpu=name", "--format=csv,noheader", "--id=0"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "none"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="the weights or engines directory")
    parser.add_argument("--dtype", help="what the weights are built as (default: config.json's, as stored)")
    parser.add_argument("--tokenizer", type=Path, help="the checkpoint whose tokenizer and config the build used")
    parser.add_argument("--gpu", help="the GPU SKU (default: nvidia-smi's name of GPU 0, or none)")
    args = parser.parse_args(argv)
    dtype = args.dtype or stored_dtype(args.directory)
    identity = write_manifest(args.directory, dtype=dtype, gpu=args.gpu or gpu_name(), tokenizer=args.tokenizer)
    print(f"{args.directory / MANIFEST}: {identity}")


if __name__ == "__main__":
    main()
