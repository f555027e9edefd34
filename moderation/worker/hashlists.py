"""PDQ hash lists exchanged with other platforms, in and out of the bank (`moderation bank import|export|remove`).

Two formats. ThreatExchange's, exactly as python-threatexchange (HMA's library) reads and writes a signal file
(`LocalFileSignalExchangeAPI`): one signal a line, `pdq <64 hex>`, or the bare hash in a file of one signal
type; such a file lists positives only, so its hashes take the label given on import. And a CSV with the header
`hash,label,source`. Imported hashes go on the bank topic as `decided_by: import` entries keyed
`import:<source>:<pdq>`, so every worker follows them, none takes a reviewer's place, and a source's keys can be
tombstoned together.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from moderation.adapters.kafka import read_to_end
from moderation.adapters.publisher import Publisher, Record
from moderation.errors import ModerationError
from moderation.events import PDQ_PATTERN, BankEntry, Label
from moderation.settings import Settings
from moderation.worker.neardup import HashBank, bank_key, put_record

TE_SIGNAL_TYPE = "pdq"  # PdqSignal.get_name(): the type column of a ThreatExchange signal file
CSV_HEADER = ("hash", "label", "source")
_PDQ = re.compile(PDQ_PATTERN)
_LABELS: frozenset[str] = frozenset({"fake", "real"})


class ListFormat(StrEnum):
    THREATEXCHANGE = "threatexchange"
    CSV = "csv"


class InvalidList(ModerationError):
    """A hash list that cannot be imported: which line, and why (nothing of it is published)."""


@dataclass(frozen=True)
class Listed:
    pdq: str
    label: Label
    source: str


@dataclass(frozen=True)
class Parsed:
    hashes: list[Listed]
    other_signals: int  # lines of a ThreatExchange file with another signal type (video_md5, ...): skipped


def read_list(text: str, fmt: ListFormat, *, source: str, label: Label) -> Parsed:
    """The PDQ hashes a list holds; a CSV row's own label and source win over the defaults given."""
    if fmt is ListFormat.THREATEXCHANGE:
        return _read_threatexchange(text, source, label)
    return Parsed(_read_csv(text, source), 0)


def _read_threatexchange(text: str, source: str, label: Label) -> Parsed:
    hashes, other = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        signal = line.strip()
        if not signal:
            continue
        signal_type, _, value = signal.partition(" ") if " " in signal else (TE_SIGNAL_TYPE, "", signal)
        if signal_type != TE_SIGNAL_TYPE:
            other += 1
            continue
        hashes.append(Listed(_pdq(value.strip(), number), label, source))
    return Parsed(hashes, other)


def _read_csv(text: str, source: str) -> list[Listed]:
    rows = csv.reader(io.StringIO(text))
    if tuple(c.strip().lower() for c in next(rows, ())) != CSV_HEADER:
        raise InvalidList(f"line 1: the header must be {','.join(CSV_HEADER)}")
    hashes = []
    for number, row in enumerate(rows, 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(CSV_HEADER):
            raise InvalidList(f"line {number}: {len(row)} columns, not {len(CSV_HEADER)}")
        pdq, label, row_source = (cell.strip() for cell in row)
        if label not in _LABELS:
            raise InvalidList(f"line {number}: label {label!r} is neither fake nor real")
        hashes.append(Listed(_pdq(pdq, number), label, row_source or source))  # type: ignore[arg-type]
    return hashes


def _pdq(value: str, number: int) -> str:
    # As PdqSignal.validate_signal_str: 64 lowercase hex digits, nothing else.
    if not _PDQ.match(value):
        raise InvalidList(f"line {number}: {value[:80]!r} is not a PDQ hash (64 lowercase hex digits)")
    return value


def write_list(hashes: Iterable[Listed], fmt: ListFormat) -> str:
    """The list as text; a ThreatExchange file holds positives, so only the fakes go into one."""
    if fmt is ListFormat.THREATEXCHANGE:
        return "".join(f"{TE_SIGNAL_TYPE} {h.pdq}\n" for h in hashes if h.label == "fake")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    writer.writerows((h.pdq, h.label, h.source) for h in hashes)
    return out.getvalue()


def exported(bank: HashBank, *, decided_by: set[str], labels: set[str], source: str) -> list[Listed]:
    """The bank's hashes to share: one a banked image (its own, not its crops' or orientations'), under its
    list's source when imported, else under `source`; each hash once, oldest decision first."""
    seen: dict[str, Listed] = {}
    for entry in bank.entries():
        if entry.pdq is None or entry.decided_by not in decided_by or entry.label not in labels:
            continue
        seen.setdefault(entry.pdq, Listed(entry.pdq, entry.label, entry.source or source))
    return list(seen.values())


def bank_entry(listed: Listed, now: datetime) -> BankEntry:
    return BankEntry(
        image_sha256=None,
        pdq=listed.pdq,
        event_id=None,
        label=listed.label,
        decided_by="import",
        decided_at=now,
        source=listed.source,
    )


async def read_bank(settings: Settings) -> HashBank:
    """The bank as a worker holds it after reading the whole topic (tombstones and ranks applied)."""
    bank = HashBank()
    async for records in read_to_end(settings, settings.topic_bank):
        for record in records:
            put_record(bank, record.key, record.value)
    return bank


async def publish_entries(settings: Settings, entries: list[BankEntry]) -> None:
    await _send(settings, [(bank_key(e), e.to_bytes()) for e in entries])


async def remove_source(settings: Settings, source: str) -> int:
    """Tombstone every hash imported from `source`; how many."""
    bank = await read_bank(settings)
    keys = [bank_key(e) for e in bank.entries() if e.decided_by == "import" and e.source == source]
    await _send(settings, [(key, None) for key in keys])
    return len(keys)


async def _send(settings: Settings, records: list[tuple[bytes, bytes | None]]) -> None:
    publisher = Publisher(settings)
    await publisher.start()
    try:  # every record acknowledged by the broker before the command says it is done
        await publisher.publish([Record(settings.topic_bank, key, value) for key, value in records])
    finally:
        await publisher.stop()
