"""Near-duplicate matching: PDQ hashes of uploads against a bank of known verdicts.

PDQ (Meta's perceptual hash, as HMA uses it, through the `pdqhash` binding) turns an image into 256 bits
that move little under re-encoding and resizing, so a re-upload of a known fake lands within a few dozen
bits of the banked original while unrelated images sit near 128. Cropping moves PDQ much more, so a bank
entry also carries the hashes of its centred crops (`crop_hashes`, computed once when it is banked) and
an upload matches the nearest of them; so are the hashes of its mirrored and rotated copies (`pdq_dihedral`).
Hashes of quality below 50 (flat or featureless images) are
unreliable and never match, as in HMA.

The bank is every worker's in-memory copy of the compacted hash-bank topic (keyed by image sha256), read
from its start like the verdict cache: a reviewer's decision outranks the model's for the same bytes,
and among near ties for a query the reviewed entry wins. Lookups are a vectorised Hamming distance over
every banked hash (bench/neardup.py: ~1 ms for 10k hashes, ~5 ms for 100k), as HMA's flat index does,
with no index structure to keep in step with the topic.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from enum import StrEnum

import numpy as np
import pdqhash
from PIL import Image
from pydantic import ValidationError

from moderation.events import BankEntry
from moderation.settings import Settings
from moderation.worker import metrics, tables

log = logging.getLogger(__name__)

# HMA's confident-match distance for PDQ is 31 of 256 bits. Measured (tests/worker/test_neardup.py): JPEG q70
# copies within 10 bits, 0.75x within 20, 0.5x within 16, 5% crops within 6 of a crop hash; unrelated demo,
# Pillow-style and synthetic images never closer than 86.
DEFAULT_MAX_DISTANCE = 31
MIN_QUALITY = 50  # below this PDQ's own quality the hash is noise (HMA's QUALITY_THRESHOLD)
# The reference hasher downsamples to 512 px before its Jarosz filter, which costs ~1 s on a 12 MP image at
# full size; we keep the aspect ratio (measured closer to the full-size hash than its 512x512 squash).
DOWNSAMPLE_PX = 512
# PDQ filters (Jarosz) and decimates any image to 64x64 luma, whatever its aspect ratio; a BOX reduction of
# Pillow's luma to the same square stands in for it (tests/worker/test_neardup.py: within a median 8 bits of PDQ on
# the full image, copies of a fake no further apart, unrelated pairs no closer), at a fifth of the cost.
PDQ_PX = 64
# A reviewed entry this many bits further than the closest model entry still wins: near-duplicates of one
# image are near-duplicates of each other, and a person's decision about one of them is worth more.
REVIEW_PREFERENCE_BITS = 4
# PDQ moves 40-120 bits when 2-5% of each edge is cropped off (measured on photos and our synthetic images),
# so a bank entry carries the hashes of its centred crops in steps of 1% (each ~10 ms to compute).
CROP_LEVELS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08)

_RANK = {"review": 0, "provenance": 1, "match": 2, "import": 3, "model": 4}  # lower outranks higher
# Mirrored and rotated copies: PDQ of a mirrored image is ~128 bits from the original's. The bank stores the
# seven other orientations of a decided image: bench/neardup.py measured lookups 1.7-1.8x the bank without them
# at 10k and 100k entries, where looking up an upload's eight orientations costs 8x (and compute_dihedral 2.9x
# compute on every upload). A shared list's hashes come without their image, so only their own orientation.
_DIHEDRAL = (
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
)
IMPORTED_KEY_PREFIX = "import:"
_WORDS = 4  # 256 bits as four uint64 words


def pdq_of(image: Image.Image) -> tuple[str, int]:
    """The image's PDQ hash (64 hex characters, as HMA writes it) and its quality (0-100)."""
    return _pdq(_prepared(image))


def crop_hashes(image: Image.Image) -> list[str]:
    """PDQ hashes of the image's centred crops, CROP_LEVELS of each edge off: for its bank entry, so that a
    copy cropped by a few percent (which moves PDQ by 40-120 bits) is still matched."""
    rgb = _prepared(image)
    width, height = rgb.size
    boxes = [
        (round(width * f), round(height * f), width - round(width * f), height - round(height * f)) for f in CROP_LEVELS
    ]
    return [_pdq(rgb.crop(box))[0] for box in boxes]


def dihedral_hashes(image: Image.Image) -> list[str]:
    """PDQ hashes of the image mirrored, flipped, rotated by 90/180/270 degrees and transposed: for its bank
    entry, so that such a copy is matched. Hashed as pdq_of hashes an upload so that the two stay comparable."""
    rgb = _prepared(image)
    return [_pdq(rgb.transpose(t))[0] for t in _DIHEDRAL]


def _prepared(image: Image.Image) -> Image.Image:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if max(rgb.size) > DOWNSAMPLE_PX:
        rgb = rgb.copy()
        rgb.thumbnail((DOWNSAMPLE_PX, DOWNSAMPLE_PX), Image.Resampling.BOX)
    return rgb


def _pdq(rgb: Image.Image) -> tuple[str, int]:
    """PDQ of the image's luma box-reduced to PDQ_PX square first: PDQ's own first step filters its float luma
    down to 64x64, which costs 1 to 2 ms on a 336x336 image and 4 to 5 times less from Pillow's 8-bit luma."""
    luma = rgb.convert("L")
    if min(luma.size) > PDQ_PX:
        luma = luma.resize((PDQ_PX, PDQ_PX), Image.Resampling.BOX, reducing_gap=2.0)
    grey = np.asarray(luma)
    bits, quality = pdqhash.compute(np.repeat(grey[:, :, np.newaxis], 3, axis=2))  # its RGB->luma is then exact
    return np.packbits(bits.astype(np.uint8)).tobytes().hex(), int(quality)


def hamming(a: str, b: str) -> int:
    """Bits that differ between two PDQ hashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _words(pdq: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(pdq), dtype=">u8").astype(np.uint64)


_M1, _M2, _M4, _H01 = (
    np.uint64(m) for m in (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101)
)
_CHUNK_ROWS = 8192  # 256 KiB of hashes: the temporaries stay in cache (3-4x faster than whole-array passes)


def _distances(hashes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance of every row to the query, by SWAR popcount in place, a cache-sized chunk at a time
    (numpy<2, which the local Triton needs, has no bitwise_count)."""
    out = np.empty(len(hashes), dtype=np.int64)
    for start in range(0, len(hashes), _CHUNK_ROWS):
        x = hashes[start : start + _CHUNK_ROWS] ^ query
        t = x >> np.uint64(1)
        t &= _M1
        x -= t
        t = x >> np.uint64(2)
        t &= _M2
        x &= _M2
        x += t
        x += x >> np.uint64(4)
        x &= _M4
        x *= _H01
        x >>= np.uint64(56)
        out[start : start + len(x)] = x.sum(axis=1)
    return out


class HashBank:
    """Known images by sha256, with all their hashes (the image's and its crops') in one array of rows for
    vectorised lookups. A replaced or forgotten entry's rows are marked dead and swept out in bulk.

    Not locked: it is written and read from one event loop (the bank's reader task and the pipeline).
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._held: dict[str, int] = {}  # slot (image_sha256, or an imported hash's key) -> id of its entry
        self._entries: list[BankEntry | None] = []  # by id; None once replaced or forgotten
        self._spans: list[tuple[int, int]] = []  # by id: its rows
        self._hashes = np.zeros((capacity, _WORDS), dtype=np.uint64)
        self._owner = np.full(capacity, -1, dtype=np.int64)  # the id a row hashes; -1 for a dead row
        self._quality = np.zeros(capacity, dtype=np.int16)
        self._rows = self._dead = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, entry: BankEntry) -> bool:
        """Store the entry unless the bank holds a decision that outranks it for the same image (a review
        over a model's); say whether it was stored."""
        slot = _slot(entry)
        held = self._entry(slot)
        if held is not None:
            if _RANK[entry.decided_by] > _RANK[held.decided_by]:
                return False
            self._drop(self._held[slot])
        # Without a PDQ hash (too flat an image, or none computed) an entry still decides its exact bytes.
        found = [entry.pdq, *entry.pdq_crops, *entry.pdq_dihedral] if entry.pdq is not None else []
        start, stop = self._rows, self._rows + len(found)
        self._grow(stop)
        ident = len(self._entries)
        if found:
            self._hashes[start:stop] = np.stack([_words(h) for h in found])
            self._owner[start:stop], self._quality[start:stop] = ident, _quality(entry)
        self._entries.append(entry)
        self._spans.append((start, stop))
        self._held[slot], self._rows = ident, stop
        if self._dead > max(1024, self._rows // 2):
            self._compact()
        metrics.BANK_ENTRIES.set(len(self._held))
        return True

    def remove(self, slot: str) -> None:
        """Forget an image, or an imported hash by its key (a tombstone on the bank topic)."""
        ident = self._held.pop(slot, None)
        if ident is not None:
            self._drop(ident)
        metrics.BANK_ENTRIES.set(len(self._held))

    def by_sha256(self, sha256: str) -> BankEntry | None:
        return self._entry(sha256)

    def entries(self) -> list[BankEntry]:
        """Every live entry, oldest first (for exporting and removing hash lists)."""
        return [e for e in self._entries if e is not None]

    def _entry(self, slot: str) -> BankEntry | None:
        ident = self._held.get(slot)
        return None if ident is None else self._entries[ident]

    def nearest(
        self, pdq: str, max_distance: int, min_quality: int = MIN_QUALITY, *, quality: int
    ) -> tuple[BankEntry, int] | None:
        """The banked entry closest to `pdq` (of PDQ quality `quality`) within `max_distance` bits, with its
        distance (to the nearest of its hashes); a reviewed entry up to REVIEW_PREFERENCE_BITS further still
        beats a model's, and the newest decision breaks exact ties. Entries or a query below `min_quality`
        never match."""
        if quality < min_quality or not self._held:
            return None
        rows = slice(0, self._rows)
        distances = _distances(self._hashes[rows], _words(pdq))
        hits = np.flatnonzero(
            (distances <= max_distance) & (self._owner[rows] >= 0) & (self._quality[rows] >= min_quality)
        )
        closest: dict[int, int] = {}
        for row in hits.tolist():
            ident, distance = int(self._owner[row]), int(distances[row])
            closest[ident] = min(distance, closest.get(ident, distance))
        if not closest:
            return None
        if any(self._decided_by(ident) == "review" for ident in closest):
            # A reviewer here outranks any other platform's list, however close its hash.
            closest = {ident: d for ident, d in closest.items() if self._decided_by(ident) != "import"}
        best = min(closest, key=lambda ident: self._preference(ident, closest[ident]))
        entry = self._entries[best]
        assert entry is not None  # live rows belong to live entries
        return entry, closest[best]

    def _decided_by(self, ident: int) -> str:
        entry = self._entries[ident]
        assert entry is not None
        return entry.decided_by

    def _preference(self, ident: int, distance: int) -> tuple[int, int, float]:
        entry = self._entries[ident]
        assert entry is not None
        handicap = 0 if entry.decided_by == "review" else REVIEW_PREFERENCE_BITS
        return distance + handicap, _RANK[entry.decided_by], -entry.decided_at.timestamp()

    def _drop(self, ident: int) -> None:
        start, stop = self._spans[ident]
        self._owner[start:stop] = -1
        self._entries[ident] = None
        self._dead += stop - start

    def _compact(self) -> None:
        """Sweep out dead rows and entries, keeping the live ones in order."""
        live = np.flatnonzero(self._owner[: self._rows] >= 0)
        old_ids = self._owner[live]
        kept = sorted(self._held.values())
        renumber = np.full(len(self._entries), -1, dtype=np.int64)
        renumber[kept] = np.arange(len(kept))
        self._hashes[: len(live)], self._quality[: len(live)] = self._hashes[live], self._quality[live]
        self._owner[: len(live)] = renumber[old_ids]
        self._owner[len(live) : self._rows] = -1
        self._entries = [self._entries[i] for i in kept]
        starts = np.searchsorted(self._owner[: len(live)], np.arange(len(kept) + 1))
        spans = [(int(a), int(b)) for a, b in itertools.pairwise(starts.tolist())]
        self._spans, self._rows, self._dead = spans, len(live), 0
        self._held = {_slot(entry): i for i, entry in enumerate(self._entries) if entry is not None}

    def _grow(self, size: int) -> None:
        if size <= len(self._hashes):
            return
        capacity = max(size, 2 * len(self._hashes))
        self._hashes = np.resize(self._hashes, (capacity, _WORDS))
        self._quality = np.resize(self._quality, capacity)
        owner = np.full(capacity, -1, dtype=np.int64)
        owner[: self._rows] = self._owner[: self._rows]
        self._owner = owner


class Refusal(StrEnum):
    """Why a bank record was skipped (the label of moderation_bank_records_refused_total)."""

    UNREADABLE = "unreadable"
    KEY_MISMATCH = "key_mismatch"


def _slot(entry: BankEntry) -> str:
    """Where the bank holds an entry: its image's sha256 (a review and a model flag of one image compete for it),
    or an imported hash's own key, so that no list can take a reviewer's place."""
    return entry.image_sha256 if entry.image_sha256 is not None else bank_key(entry).decode()


def _quality(entry: BankEntry) -> int:
    # A shared list carries no quality: its maker hashed the image and kept only hashes worth matching.
    if entry.pdq_quality is None and entry.decided_by == "import":
        return 100
    return entry.pdq_quality or 0


def bank_key(entry: BankEntry) -> bytes:
    """The record key of an entry on the compacted bank topic: the image's sha256, or `<sha256>:model` for a
    banked model flag, so that compaction never replaces a reviewer's entry with a model's; an imported hash is
    `import:<source>:<pdq>`, so that a list can be removed by its source."""
    if entry.image_sha256 is None:
        return f"{IMPORTED_KEY_PREFIX}{entry.source}:{entry.pdq}".encode()
    suffix = ":model" if entry.decided_by == "model" else ""
    return f"{entry.image_sha256}{suffix}".encode()


def put_record(bank: HashBank, key: bytes | None, value: bytes | None) -> Refusal | None:
    """A record of the bank topic: a tombstone forgets what its key held; an entry is stored only under its own
    key (`bank_key`), so no record can overwrite another image's decision."""
    if value is None:
        if key is not None and key.startswith(IMPORTED_KEY_PREFIX.encode()):
            bank.remove(key.decode(errors="replace"))
        elif key is not None:
            sha256, _, model = key.decode(errors="replace").partition(":")
            held = bank.by_sha256(sha256)
            if held is not None and (held.decided_by == "model") == (model == "model"):
                bank.remove(sha256)
        return None
    try:
        entry = BankEntry.model_validate_json(value)
    except ValidationError:
        refusal = Refusal.UNREADABLE
    else:
        if key == bank_key(entry):
            bank.add(entry)
            return None
        refusal = Refusal.KEY_MISMATCH
    metrics.BANK_REFUSED.labels(str(refusal)).inc()
    return refusal


async def load(bank: HashBank, settings: Settings, partitions: tables.Partitions) -> asyncio.Task[None]:
    """Follow the hash bank topic, read to its end first: a restarted worker matches against the whole bank."""
    table = tables.Table(
        "hash bank",
        settings.topic_bank,
        settings.bank_load_timeout_s,
        functools.partial(put_record, bank),
        bank.__len__,
    )
    return await tables.load(table, settings, partitions)
