"""Weights identity from manifests: a rebuilt engine changes it, and starting reads only small files."""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from moderation.errors import ModelError
from moderation.model import identity
from moderation.model.identity import MANIFEST, SMALL_FILE_BYTES, weights_identity
from moderation.model.manifest import build_manifest, main, write_manifest

HUGE = 20 * 1024**3  # a 7B checkpoint's size, as a sparse file: no disk, but reading it would take minutes


def engines(directory: Path, engine: bytes = b"engine-1") -> Path:
    """An engines directory as build_engines.sh leaves it (small stand-ins for the engine files)."""
    for sub in ("llm", "vision"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
        (directory / sub / "config.json").write_text(json.dumps({"vocab_size": 32064, "part": sub}))
    (directory / "llm" / "rank0.engine").write_bytes(engine)
    (directory / "vision" / "model.engine").write_bytes(b"vision")
    return directory


def tokenizer(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text('{"model": "llama"}')
    (directory / "config.json").write_text('{"image_seq_length": 576}')
    return directory


def test_two_engine_builds_that_differ_give_two_identities(tmp_path: Path) -> None:
    hf = tokenizer(tmp_path / "hf")
    fp16 = write_manifest(engines(tmp_path / "a"), dtype="float16", gpu="NVIDIA H100 80GB HBM3", tokenizer=hf)
    same = write_manifest(engines(tmp_path / "b"), dtype="float16", gpu="NVIDIA H100 80GB HBM3", tokenizer=hf)
    assert fp16 == same == weights_identity(tmp_path / "a")  # the same build: the same manifest, no time stamp
    fp8 = write_manifest(engines(tmp_path / "c", b"engine-8"), dtype="fp8", gpu="NVIDIA H100 80GB HBM3", tokenizer=hf)
    h200 = write_manifest(engines(tmp_path / "d"), dtype="float16", gpu="NVIDIA H200", tokenizer=hf)
    assert len({fp16, fp8, h200}) == 3


def test_the_manifest_records_what_the_issue_asks(tmp_path: Path) -> None:
    hf = tokenizer(tmp_path / "hf")
    manifest = build_manifest(engines(tmp_path / "e"), dtype="float16", gpu="NVIDIA H100", tokenizer=hf)
    assert manifest["files"]["llm/rank0.engine"]["size"] == len(b"engine-1")
    assert len(manifest["files"]["llm/rank0.engine"]["sha256"]) == 64
    assert set(manifest["tokenizer"]) == {"tokenizer.json", "config.json"}
    assert {"dtype", "gpu", "builders"} <= set(manifest) and "torch" in manifest["builders"]


def test_a_config_edited_after_the_build_changes_the_identity(tmp_path: Path) -> None:
    first = write_manifest(engines(tmp_path / "e"), dtype="float16", gpu="g")
    (tmp_path / "e" / "llm" / "config.json").write_text('{"vocab_size": 32000}')
    assert weights_identity(tmp_path / "e") != first


def huge_weights(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"]}')
    (directory / "tokenizer.json").write_text("{}")
    with (directory / "model-00001-of-00003.safetensors").open("wb") as sparse:
        sparse.truncate(HUGE)
    return directory


def test_starting_reads_only_small_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = huge_weights(tmp_path / "w")
    big = weights / "model-00001-of-00003.safetensors"
    manifest = {"format": 1, "files": {big.name: {"size": HUGE, "sha256": "ab" * 32}}, "dtype": "bfloat16"}
    (weights / MANIFEST).write_text(json.dumps(manifest))
    opened: list[Path] = []
    real_open = builtins.open

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> io.IOBase:
        opened.append(Path(os.fsdecode(file)).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)  # Path.open and read_bytes go through io.open
    first = weights_identity(weights)
    assert big.resolve() not in opened
    assert (weights / "config.json").resolve() in opened and (weights / MANIFEST).resolve() in opened
    manifest["dtype"] = "float16"
    (weights / MANIFEST).write_text(json.dumps(manifest))
    assert weights_identity(weights) != first


def test_a_large_file_without_a_manifest_has_no_identity_and_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = huge_weights(tmp_path / "w")
    hashed: list[Path] = []
    monkeypatch.setattr(identity, "file_sha256", lambda file: hashed.append(file) or "0" * 64)
    with pytest.raises(ModelError, match=r"no manifest\.json"):
        weights_identity(weights)
    assert all(p.stat().st_size <= SMALL_FILE_BYTES for p in hashed)


def test_a_rebuilt_engine_without_a_new_manifest_is_refused(tmp_path: Path) -> None:
    weights = huge_weights(tmp_path / "w")
    big = weights / "model-00001-of-00003.safetensors"
    (weights / MANIFEST).write_text(json.dumps({"files": {big.name: {"size": HUGE - 1, "sha256": "x"}}}))
    with pytest.raises(ModelError, match="rewrite the manifest"):
        weights_identity(weights)
    (weights / MANIFEST).write_text("[]")
    with pytest.raises(ModelError, match="not a weights manifest"):
        weights_identity(weights)


def test_the_command_writes_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(engines(tmp_path / "e")), "--dtype", "float16", "--gpu", "none"])
    assert capsys.readouterr().out.strip().endswith(weights_identity(tmp_path / "e"))
    assert json.loads((tmp_path / "e" / MANIFEST).read_text())["gpu"] == "none"


def test_the_tiny_checkpoints_keep_their_content_digest(tiny_checkpoint: Path) -> None:
    assert not (tiny_checkpoint / MANIFEST).exists()
    assert weights_identity(tiny_checkpoint) == identity.directory_digest(tiny_checkpoint.resolve())


def test_the_weights_job_writes_the_manifest_of_a_downloaded_checkpoint(tmp_path: Path) -> None:
    """deploy/weights/job.yaml runs the command after `hf download`: the dtype is the checkpoint's own."""
    weights = tmp_path / "fakevlm"
    weights.mkdir()
    (weights / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    (weights / "model.safetensors").write_bytes(b"w")
    main([str(weights), "--gpu", "none"])
    assert json.loads((weights / MANIFEST).read_text())["dtype"] == "bfloat16"
    job = (Path(__file__).resolve().parents[2] / "deploy" / "weights" / "job.yaml").read_text()
    assert "python -m moderation.model.manifest /weights/fakevlm --gpu none;" in job
