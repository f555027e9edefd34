"""`moderation scan`: a directory tree of good and bad files through the in-process detector on a tiny
checkpoint; one JSONL record per file, reason codes for the bad ones, a self-contained HTML report."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import markupsafe
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.devkit.samples import draw_image, encode, write_samples
from moderation.errors import Reason, Rejected
from moderation.events import ModelInfo, Verdict
from moderation.model.detectors import Detection, InProcessDetector
from moderation.offline.results import ScanError, ScanResult
from moderation.offline.scan import NOT_FOUND, collect_files, scan
from moderation.policy import Policy

GOOD = ["sample-000.jpg", "sample-001.png", "sample-002.webp", "sample-003.gif", "nested/deeper/photo.bmp"]


@pytest.fixture(scope="module")
async def detector(tiny_checkpoint: Path) -> AsyncIterator[InProcessDetector]:
    detector = InProcessDetector(tiny_checkpoint, batch_size=4, max_new_tokens=12)
    await detector.start()
    yield detector
    await detector.stop()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "uploads"
    write_samples(root, 4)
    (root / "nested" / "deeper").mkdir(parents=True)
    draw_image(9, (300, 500)).save(root / "nested" / "deeper" / "photo.bmp")
    truncated = encode(draw_image(3), "JPEG")
    (root / "nested" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (root / "notes.txt").write_text("not an image at all\n")
    (root / "empty.png").write_bytes(b"")
    (root / "a<b>&c.jpg").write_bytes(b"<script>alert(1)</script>")  # HTML in a name and in the bytes
    return root


def records(path: Path) -> dict[str, dict[str, object]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_path = {str(line["path"]): line for line in lines}
    assert len(by_path) == len(lines), "one record per file"
    return by_path


async def test_scan_writes_one_record_per_file_and_reasons_for_bad_files(
    tree: Path, detector: InProcessDetector, tmp_path: Path
) -> None:
    out, html = tmp_path / "out" / "results.jsonl", tmp_path / "out" / "report.html"
    missing = tmp_path / "missing.jpg"
    policy = Policy(review_threshold=0.3, flag_threshold=0.55, explain_above=0.0)

    summary = await scan(
        [tree, missing, tree / "sample-000.jpg"],  # a file named twice is scanned once
        detector,
        out=out,
        html=html,
        batch_size=3,
        explain_above=0.0,
        max_pixels=10_000_000,
        policy=policy,
    )

    found = records(out)
    assert list(found) == [str(p) for p in collect_files([tree, missing])]  # walk order: files, then subdirs
    assert (summary.files, summary.images, summary.errors) == (10, 5, 5)
    assert {str(tree / name) for name in GOOD} == {p for p, r in found.items() if "error" not in r}
    errors = {Path(p).name: (r["error"], r["detail"]) for p, r in found.items() if "error" in r}
    assert {name: code for name, (code, _) in errors.items()} == {
        "truncated.jpg": Reason.INVALID_IMAGE,
        "notes.txt": Reason.INVALID_IMAGE,
        "empty.png": Reason.EMPTY_OBJECT,
        "a<b>&c.jpg": Reason.INVALID_IMAGE,
        "missing.jpg": NOT_FOUND,
    }
    assert all(detail for _, detail in errors.values())

    for path, record in found.items():
        if "error" in record:
            ScanError.model_validate(record)
            continue
        result = ScanResult.model_validate(record)
        assert result.action == policy.action(result.score)
        assert result.label == ("fake" if result.score >= 0.5 else "real")
        assert result.explanation is not None and result.explanation.startswith("This is a")
        assert result.model == detector.model and result.model.name == "fakevlm-in-process"
        assert result.image_sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert result.timings.inference_ms > 0 and result.timings.total_ms >= result.timings.decode_ms
    bmp = ScanResult.model_validate(found[str(tree / "nested/deeper/photo.bmp")])
    assert (bmp.image.width, bmp.image.height, bmp.image.format) == (300, 500, "BMP")

    page = html.read_text()
    thumbnails = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(thumbnails) == 5
    for data in thumbnails:
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert thumb.format == "JPEG" and max(thumb.size) <= 160
    for record in found.values():
        if "explanation" in record:
            assert str(markupsafe.escape(record["explanation"])) in page
            assert f"{record['score']:.3f}" in page
    assert "a&lt;b&gt;&amp;c.jpg" in page and "<script>alert" not in page and "a<b>" not in page
    for code in ("invalid_image", "empty_object", "not_found"):
        assert code in page
    assert "10 files: 5 images scored" in page


def test_scan_records_use_the_verdict_schema_where_it_applies() -> None:
    assert set(ScanResult.model_fields) - {"path"} <= set(Verdict.model_fields)
    shared = set(ScanResult.model_fields) & set(Verdict.model_fields)
    for name in shared:
        assert ScanResult.model_fields[name].annotation == Verdict.model_fields[name].annotation, name


async def test_explain_above_leaves_low_scores_unexplained(
    tree: Path, detector: InProcessDetector, tmp_path: Path
) -> None:
    out = tmp_path / "results.jsonl"
    await scan([tree / name for name in GOOD], detector, out=out, explain_above=2.0)
    found = records(out)
    assert len(found) == 5 and all(r["explanation"] is None for r in found.values())


class FlakyDetector:
    """Fails its first batch the way an unavailable Triton does, then answers 0.7 for everything."""

    model = ModelInfo(name="flaky", version="0")
    explain_model = model

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def detect(self, crop: np.ndarray) -> Detection:
        return (await self.detect_batch(crop[np.newaxis], explain_above=2.0))[0]

    async def explain(self, crop: np.ndarray) -> Detection:
        return await self.detect(crop)

    async def detect_batch(self, pixels: np.ndarray, *, explain_above: float | Sequence[float]) -> list[Detection]:
        self.batches.append(len(pixels))
        if len(self.batches) == 1:
            raise Rejected(Reason.INFERENCE_UNAVAILABLE, "Triton fakevlm: connection refused")
        return [Detection(0.7, "fake", None, None) for _ in pixels]


async def test_a_failed_batch_is_reported_and_the_scan_goes_on(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    detector = FlakyDetector()
    summary = await scan([tree], detector, out=out, batch_size=4)
    # Walk order: a<b>&c.jpg empty.png notes.txt sample-000..003 nested/truncated.jpg nested/deeper/photo.bmp
    assert detector.batches == [1, 3, 1]  # decodable images per batch of 4 files; the first batch fails
    found = records(out)
    failed = [p for p, r in found.items() if r.get("error") == Reason.INFERENCE_UNAVAILABLE]
    assert failed == [str(tree / "sample-000.jpg")]
    assert "connection refused" in str(found[failed[0]]["detail"])
    assert [r["action"] for r in found.values() if "action" in r] == ["review"] * 4
    assert (summary.images, summary.errors) == (4, 5)


async def test_a_rerun_does_not_scan_its_own_output(tree: Path) -> None:
    out, html = tree / "results.jsonl", tree / "nested" / "report.html"
    for _ in range(2):
        detector = FlakyDetector()
        detector.batches.append(0)  # past its failing first batch
        summary = await scan([tree], detector, out=out, html=html)
    assert summary.files == 9 and str(out) not in records(out) and str(html) not in records(out)


def test_unreadable_and_oversized_files_are_reported(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    out = tmp_path / "r.jsonl"
    asyncio.run(scan([big, tmp_path / "nope.gif"], FlakyDetector(), out=out, max_bytes=10, max_pixels=100))
    found = records(out)
    assert found[str(big)]["error"] == Reason.TOO_LARGE
    assert found[str(tmp_path / "nope.gif")]["error"] == NOT_FOUND


def test_scan_command(tree: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out, html = tmp_path / "cli.jsonl", tmp_path / "cli.html"
    result = CliRunner().invoke(
        app,
        [
            "scan",
            str(tree),
            str(tmp_path / "nothing-here"),
            "--out",
            str(out),
            "--html",
            str(html),
            "--checkpoint",
            str(tiny_checkpoint),
            "--batch-size",
            "4",
            "--explain-above",
            "0.0",
        ],
    )
    assert result.exit_code == 0, result.output
    found = records(out)
    assert len(found) == 10
    assert sum("error" not in r for r in found.values()) == 5
    assert '"images": 5' in result.output and html.stat().st_size > 5 * 1000
