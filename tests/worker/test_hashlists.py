"""Hash lists exchanged with other platforms, against python-threatexchange itself (HMA's library): what its
CLI writes we import, what we export its file exchange reads, and its PDQ matchers and our bank agree on
distances. On the real stack: an imported list reaches the worker through the bank topic, decides matches
under its source, never over a reviewer's decision, and goes away with `moderation bank remove`."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from PIL import Image
from threatexchange.exchanges.impl.file_api import FileCollaborationConfig, LocalFileSignalExchangeAPI
from threatexchange.signal_type.pdq.pdq_index2 import PDQIndex2
from threatexchange.signal_type.pdq.signal import PdqSignal
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.devkit.demo import DEMO_SEED, stop_worker
from moderation.devkit.samples import draw_image, encode
from moderation.devkit.synthetic import make_sample
from moderation.events import BankEntry
from moderation.worker import neardup
from moderation.worker.hashlists import InvalidList, Listed, ListFormat, bank_entry, read_list, write_list
from moderation.worker.neardup import DEFAULT_MAX_DISTANCE, HashBank, hamming
from tests.fixtures.uploads import decide, moderated, upload

NOW = datetime(2026, 12, 7, tzinfo=UTC)
THREATEXCHANGE = Path(sys.executable).parent / "threatexchange"


def te_hash(paths: list[Path], home: Path) -> str:
    """`threatexchange hash photo FILE...`: HMA's CLI, its own PDQ of each file, one `pdq <hash>` line each."""
    done = subprocess.run(
        [str(THREATEXCHANGE), "hash", "photo", *map(str, paths)],
        env={"HOME": str(home), "PATH": str(THREATEXCHANGE.parent)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def te_reads(path: Path) -> set[str]:
    """The PDQ hashes python-threatexchange's local-file exchange fetches from a file, each validated by it."""
    api = LocalFileSignalExchangeAPI(FileCollaborationConfig(name="ours", filename=str(path)))
    signals = {key for delta in api.fetch_iter([PdqSignal], None) for key in delta.updates}
    assert {signal_type for signal_type, _ in signals} == {PdqSignal.get_name()}
    return {PdqSignal.validate_signal_str(signal) for _, signal in signals}


def images(tmp_path: Path) -> list[Path]:
    pictures = [make_sample(DEMO_SEED, i).image for i in range(0, 8, 2)] + [draw_image(s) for s in (5, 6)]
    pictures += [pictures[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT), pictures[1].resize((200, 200))]
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(tmp_path / f"image-{i}.png")
        paths[-1].write_bytes(encode(picture, "PNG"))
    return paths


def test_what_threatexchange_writes_we_import_and_what_we_export_it_reads(tmp_path: Path) -> None:
    written = te_hash(images(tmp_path), tmp_path)
    theirs = [line.split()[1] for line in written.splitlines()]
    parsed = read_list(
        written + "video_md5 d41d8cd98f00b204e9800998ecf8427e\n", ListFormat.THREATEXCHANGE, source="te", label="fake"
    )
    assert [h.pdq for h in parsed.hashes] == theirs and parsed.other_signals == 1
    assert {(h.label, h.source) for h in parsed.hashes} == {("fake", "te")}
    # A file of one signal type may hold bare hashes (FileCollaborationConfig.signal_type): the same list.
    assert [
        h.pdq for h in read_list("\n".join(theirs), ListFormat.THREATEXCHANGE, source="te", label="fake").hashes
    ] == theirs

    ours = [Listed(h, "fake", "moderation") for h in theirs] + [Listed("0f" * 32, "real", "moderation")]
    exported = tmp_path / "export.te"
    exported.write_text(write_list(ours, ListFormat.THREATEXCHANGE))
    assert te_reads(exported) == set(theirs)  # positives only: the real one is not in a ThreatExchange file
    as_csv = write_list(ours, ListFormat.CSV)
    assert as_csv.splitlines()[0] == "hash,label,source"
    assert read_list(as_csv, ListFormat.CSV, source="x", label="fake").hashes == ours


def test_a_malformed_list_names_its_line_and_imports_nothing() -> None:
    with pytest.raises(InvalidList, match="line 2"):
        read_list(f"pdq {'ab' * 32}\npdq {'AB' * 32}\n", ListFormat.THREATEXCHANGE, source="s", label="fake")
    with pytest.raises(InvalidList, match="line 1"):
        read_list("sha,label\n", ListFormat.CSV, source="s", label="fake")
    with pytest.raises(InvalidList, match="line 3: label 'maybe'"):
        read_list(
            f"hash,label,source\n{'ab' * 32},fake,\n{'cd' * 32},maybe,x\n", ListFormat.CSV, source="s", label="fake"
        )


def test_threatexchanges_pdq_matchers_and_our_bank_agree_on_distances(tmp_path: Path) -> None:
    hashes = [line.split()[1] for line in te_hash(images(tmp_path), tmp_path).splitlines()]
    index = PDQIndex2(entries=[(h, i) for i, h in enumerate(hashes)])
    compared = 0
    for query in hashes:
        theirs = {m.metadata: m.similarity_info.distance for m in index.query(query)}  # within 31 bits
        for i, h in enumerate(hashes):
            bank = HashBank()
            bank.add(bank_entry(Listed(h, "fake", "list"), NOW))
            found = bank.nearest(query, 256, quality=100)
            distance = PdqSignal.compare_hash(query, h).distance.distance
            assert found is not None and found[1] == hamming(query, h) == distance
            assert theirs.get(i, distance) == distance and (i in theirs) == (distance <= DEFAULT_MAX_DISTANCE)
            compared += 1
    assert compared == len(hashes) ** 2


def test_an_imported_hash_never_overrides_a_reviewers_decision_and_goes_with_its_source() -> None:
    pdq = "f0" * 32
    reviewed = BankEntry(
        image_sha256="ab" * 32,
        pdq=neardup_flip(pdq, 20),
        pdq_quality=90,
        event_id="e1",
        label="real",
        decided_by="review",
        decided_at=NOW,
    )
    imported = bank_entry(Listed(pdq, "fake", "other-platform"), NOW)
    bank = HashBank()
    for entry in (imported, reviewed):
        assert neardup.put_record(bank, neardup.bank_key(entry), entry.to_bytes()) is None
    assert neardup.bank_key(imported) == f"import:other-platform:{pdq}".encode()
    found = bank.nearest(pdq, DEFAULT_MAX_DISTANCE, quality=100)
    assert found is not None and found[0] == reviewed and found[1] == 20  # the imported hash is 0 bits away
    assert bank.by_sha256(reviewed.image_sha256) == reviewed
    neardup.put_record(bank, neardup.bank_key(reviewed), None)
    assert bank.nearest(pdq, DEFAULT_MAX_DISTANCE, quality=100) == (imported, 0)  # no quality: the list's maker vouched
    neardup.put_record(bank, neardup.bank_key(imported), None)
    assert len(bank) == 0


def neardup_flip(pdq: str, bits: int) -> str:
    return f"{int(pdq, 16) ^ ((1 << bits) - 1):064x}"


def env_file_of(lane, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "stack.env"
    path.write_text("\n".join(f"{k}={v}" for k, v in lane.env.items()) + "\n")
    return path


def reencoded(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


@pytest.mark.integration
@pytest.mark.slow
def test_an_imported_list_decides_matches_on_the_worker_below_reviews_until_removed(lane, tmp_path: Path) -> None:
    shared = {"a.jpg": encode(draw_image(5, (640, 480)), "JPEG"), "b.jpg": encode(draw_image(12, (640, 480)), "JPEG")}
    for name, data in shared.items():
        (tmp_path / name).write_bytes(data)
    te_file = tmp_path / "other-platform.te"
    te_file.write_text(te_hash([tmp_path / name for name in shared], tmp_path))
    env_file, runner = env_file_of(lane, tmp_path), CliRunner()
    worker = lane.worker()
    try:
        result = runner.invoke(app, ["bank", "import", str(te_file), "--source", "other", "--env-file", str(env_file)])
        assert result.exit_code == 0 and "imported 2 PDQ hashes from other" in result.output, result.output
        time.sleep(2)  # the worker's bank follower reads the list
        first = upload(lane, tmp_path, {"a1.jpg": reencoded(shared["a.jpg"]), "b1.jpg": shared["b.jpg"]})
        verdicts = moderated(lane, first)
        for event in first:
            v = verdicts[event.event_id]
            assert (v.label, v.decided_by) == ("fake", "match"), v
            assert v.match is not None and (v.match.decided_by, v.match.source, v.match.event_id) == (
                "import",
                "other",
                None,
            )

        # A reviewer here says b is real: that decides b and its copies, over the list's hash of it.
        decide(lane.settings, verdicts[first[1].event_id], "overturn_real")
        deadline = time.monotonic() + 60
        while lane.counter("moderation_decisions_banked_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)
        copy = upload(lane, tmp_path, {"b2.jpg": reencoded(shared["b.jpg"])})
        b2 = moderated(lane, copy)[copy[0].event_id]
        assert b2.match is not None and (b2.match.decided_by, b2.label) == ("review", "real"), b2

        exported = tmp_path / "ours.csv"
        result = runner.invoke(
            app, ["bank", "export", "--label", "real", "--out", str(exported), "--env-file", str(env_file)]
        )
        assert result.exit_code == 0, result.output
        assert read_list(exported.read_text(), ListFormat.CSV, source="x", label="fake").hashes == [
            Listed(verdicts[first[1].event_id].image.pdq or "", "real", "moderation")
        ]
        te_out = tmp_path / "imports.te"
        result = runner.invoke(
            app, ["bank", "export", "--decided-by", "import", "--out", str(te_out), "--env-file", str(env_file)]
        )
        assert te_reads(te_out) == {line.split()[1] for line in te_file.read_text().splitlines()}

        result = runner.invoke(app, ["bank", "remove", "--source", "other", "--env-file", str(env_file)])
        assert result.exit_code == 0 and "removed 2 PDQ hashes" in result.output, result.output
        time.sleep(2)
        again = upload(lane, tmp_path, {"a2.jpg": reencoded(shared["a.jpg"])})
        assert moderated(lane, again)[again[0].event_id].match is None
    finally:
        stop_worker(worker)
