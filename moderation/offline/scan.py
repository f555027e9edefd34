"""Offline detection over local files: the worker's decoding and scoring, a JSONL line per file.

`detect_files` is the shared core (also behind `moderation eval`): read, hash, decode and
preprocess each file in worker threads with the stream worker's own code (`imaging.prepare`),
then score a batch at a time through any detector backend, preparing the next batch while the
current one is scored. A file that cannot be read or decoded becomes an error record with a
reason code; nothing about one file stops the scan.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console

from moderation.errors import Reason, Rejected
from moderation.events import ImageInfo, ModelInfo, Timings, utcnow
from moderation.model.detectors import BatchDetector, Detection
from moderation.model.imaging import ModelInput, prepare
from moderation.offline.progress import ProgressBar
from moderation.offline.report import ScanPage
from moderation.offline.results import ScanError, ScanResult, ScanSummary
from moderation.policy import Policy

# Reason codes of a scan beyond the stream's dead-letter reasons (moderation.errors.Reason).
NOT_FOUND = "not_found"
UNREADABLE = "unreadable"

DEFAULT_MAX_BYTES = 200 * 1024 * 1024
THUMBNAIL_PX = 160


@dataclass(frozen=True)
class FileOutcome:
    """What `detect_files` found for one file: a detection, or an error code with its detail."""

    path: Path
    prepared: ModelInput | None = None
    sha256: str = ""
    detection: Detection | None = None
    error: str | None = None
    detail: str = ""
    read_ms: float = 0.0
    decode_ms: float = 0.0
    inference_ms: float = 0.0
    thumbnail: bytes | None = None  # JPEG, when asked for


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under `paths` (directories recursively, sorted), each once, in order.

    A path that does not exist is kept, so the scan reports it as not_found instead of stopping.
    """
    found: list[Path] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve() if path.exists() else path.absolute()
        if key not in seen:
            seen.add(key)
            found.append(path)

    for path in paths:
        if not path.is_dir():
            add(path)
            continue
        # Symlinked directories are not followed (no loops); one that cannot be listed is kept as a
        # path, so the scan reports it (unreadable) like any other file it could not read.
        for root, dirs, names in os.walk(path, onerror=lambda exc: add(Path(exc.filename))):
            dirs.sort()
            for name in sorted(names):
                add(Path(root) / name)
    return found


async def detect_files(
    files: Sequence[Path],
    detector: BatchDetector,
    *,
    batch_size: int = 16,
    explain_above: float = 0.5,
    max_pixels: int = 50_000_000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    thumbnails: bool = False,
) -> AsyncIterator[list[FileOutcome]]:
    """Yield one list of outcomes per batch of `files`, in order; the next batch is decoded meanwhile."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    async def load(chunk: Sequence[Path]) -> list[FileOutcome]:
        return list(
            await asyncio.gather(*(asyncio.to_thread(_load, path, max_pixels, max_bytes, thumbnails) for path in chunk))
        )

    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    pending = asyncio.ensure_future(load(chunks[0])) if chunks else None
    try:
        for index in range(len(chunks)):
            assert pending is not None
            loaded = await pending
            pending = asyncio.ensure_future(load(chunks[index + 1])) if index + 1 < len(chunks) else None
            yield await _detect(loaded, detector, explain_above)
    finally:
        if pending is not None:
            pending.cancel()


async def scan(
    paths: Iterable[Path],
    detector: BatchDetector,
    *,
    out: Path,
    html: Path | None = None,
    batch_size: int = 16,
    explain_above: float = 0.5,
    max_pixels: int = 50_000_000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    policy: Policy | None = None,
    progress: bool = False,
    console: Console | None = None,
) -> ScanSummary:
    """Scan files and directories; write `out` (JSONL, one record per file) and optionally `html`."""
    policy = policy or Policy(explain_above=explain_above)
    own = {p.resolve() for p in (out, html) if p is not None}  # a rerun must not scan its own output
    files = [f for f in collect_files(paths) if f.resolve() not in own]
    summary = ScanSummary(files=len(files))
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    report = ScanPage(detector.model, started=utcnow().isoformat(timespec="seconds")) if html is not None else None
    with out.open("w", encoding="utf-8") as jsonl, ProgressBar(progress, console, "scanning", len(files)) as bar:
        outcomes = detect_files(
            files,
            detector,
            batch_size=batch_size,
            explain_above=explain_above,
            max_pixels=max_pixels,
            max_bytes=max_bytes,
            thumbnails=html is not None,
        )
        async for batch in outcomes:
            for outcome in batch:
                record = to_record(outcome, policy, detector.model)
                jsonl.write(record.model_dump_json() + "\n")
                if report is not None:
                    _add(report, record, outcome.thumbnail)
                _count(summary, record)
            jsonl.flush()
            bar.advance(len(batch))
        summary.elapsed_s = time.perf_counter() - started
    if html is not None and report is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(report.render(summary), encoding="utf-8")
    return summary


def to_record(
    outcome: FileOutcome, policy: Policy, model: ModelInfo, decided_at: datetime | None = None
) -> ScanResult | ScanError:
    if outcome.error is not None or outcome.detection is None or outcome.prepared is None:
        return ScanError(path=str(outcome.path), error=outcome.error or Reason.INTERNAL_ERROR, detail=outcome.detail)
    detection, prepared = outcome.detection, outcome.prepared
    return ScanResult(
        path=str(outcome.path),
        image_sha256=outcome.sha256,
        label=detection.label,
        score=detection.score,
        action=policy.action(detection.score),
        explanation=detection.explanation,
        answer_label=detection.answer_label,
        model=model,
        image=ImageInfo(width=prepared.width, height=prepared.height, format=prepared.format),
        timings=Timings(
            fetch_ms=outcome.read_ms,
            decode_ms=outcome.decode_ms,
            inference_ms=outcome.inference_ms,
            total_ms=round(outcome.read_ms + outcome.decode_ms + outcome.inference_ms, 3),
        ),
        decided_at=decided_at or utcnow(),
    )


def _load(path: Path, max_pixels: int, max_bytes: int, thumbnails: bool) -> FileOutcome:
    """Worker thread: read, hash, decode and preprocess one file; every failure is an outcome."""
    started = time.perf_counter()
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return FileOutcome(path, error=Reason.TOO_LARGE, detail=f"{size} bytes, the cap is {max_bytes}")
        data = path.read_bytes()
    except FileNotFoundError:
        return FileOutcome(path, error=NOT_FOUND, detail="no such file")
    except OSError as exc:
        return FileOutcome(path, error=UNREADABLE, detail=f"{type(exc).__name__}: {exc.strerror or exc}")
    read = time.perf_counter()
    try:
        prepared = prepare(data, max_pixels=max_pixels)
        thumbnail = _thumbnail(data) if thumbnails else None
    except Rejected as exc:
        return FileOutcome(path, error=exc.reason, detail=exc.detail, read_ms=_ms(started, read))
    except Exception as exc:  # a decoder bug costs this file a record, never the scan
        return FileOutcome(path, error=Reason.INTERNAL_ERROR, detail=f"{type(exc).__name__}: {exc}")
    return FileOutcome(
        path,
        prepared=prepared,
        sha256=hashlib.sha256(data).hexdigest(),
        read_ms=_ms(started, read),
        decode_ms=_ms(read, time.perf_counter()),
        thumbnail=thumbnail,
    )


async def _detect(loaded: list[FileOutcome], detector: BatchDetector, explain_above: float) -> list[FileOutcome]:
    good = [o for o in loaded if o.prepared is not None]
    if not good:
        return loaded
    pixels = np.stack([o.prepared.pixels for o in good if o.prepared is not None])
    started = time.perf_counter()
    try:
        detections = await detector.detect_batch(pixels, explain_above=explain_above)
    except Rejected as exc:
        failed = {id(o): FileOutcome(o.path, error=exc.reason, detail=exc.detail) for o in good}
        return [failed.get(id(o), o) for o in loaded]
    except Exception as exc:  # the backend broke on this batch: report it, go on with the next
        detail = f"{type(exc).__name__}: {exc}"
        failed = {id(o): FileOutcome(o.path, error=Reason.INFERENCE_FAILED, detail=detail) for o in good}
        return [failed.get(id(o), o) for o in loaded]
    inference_ms = _ms(started, time.perf_counter())
    scored = {
        id(o): dataclasses.replace(o, detection=d, inference_ms=inference_ms)
        for o, d in zip(good, detections, strict=True)
    }
    return [scored.get(id(o), o) for o in loaded]


def _thumbnail(data: bytes) -> bytes | None:
    """A small JPEG of an image prepare() already accepted (known good, within the pixel cap)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # JPEG: decode at a reduced scale
        image.seek(0)
        rgb = image.convert("RGB")
        rgb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=75)
    except Exception:  # a thumbnail is decoration: the verdict stands without it
        return None
    return buffer.getvalue()


def _add(report: ScanPage, record: ScanResult | ScanError, thumbnail: bytes | None) -> None:
    if isinstance(record, ScanError):
        report.add_error(record)
    else:
        report.add_result(record, thumbnail)


def _count(summary: ScanSummary, record: ScanResult | ScanError) -> None:
    if isinstance(record, ScanError):
        summary.errors += 1
        summary.reasons[record.error] += 1
    else:
        summary.images += 1
        summary.labels[record.label] += 1
        summary.actions[record.action] += 1


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)


def summary_json(summary: ScanSummary) -> str:
    """The summary as one JSON object (for logs and the CLI)."""
    return json.dumps(
        {
            "files": summary.files,
            "images": summary.images,
            "errors": summary.errors,
            "labels": dict(summary.labels),
            "actions": dict(summary.actions),
            "reasons": dict(summary.reasons),
            "elapsed_s": round(summary.elapsed_s, 3),
            "images_per_s": round(summary.images_per_s, 3),
        }
    )
