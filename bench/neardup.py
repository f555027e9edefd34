"""Near-duplicate lookup time: HashBank.nearest over banks of 10k and 100k entries, each with the hashes of
its crops (1 + len(CROP_LEVELS) rows an entry) or without, against a baseline measured in the same run:
the same scan in pure Python (int.bit_count per banked hash). Also the time of pdq_of and crop_hashes on a
640x480 image. Hashes are random: the scan costs the same whatever they are.

Mirrored and rotated copies (PDQ's eight dihedral orientations), two ways against the bank as it was (1 + crops
rows an entry) as the baseline: at bank time, each entry also holds its 7 other orientations' hashes (one
query, 16 rows an entry); at query time, the upload's 8 orientations are each looked up (8 queries, 9 rows an
entry), which also costs pdqhash.compute_dihedral instead of pdqhash.compute on every upload. The last line is
JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from datetime import UTC, datetime

import numpy as np
import pdqhash

from moderation.devkit.samples import draw_image
from moderation.events import BankEntry
from moderation.worker.neardup import (
    CROP_LEVELS,
    DEFAULT_MAX_DISTANCE,
    PDQ_PX,
    HashBank,
    crop_hashes,
    dihedral_hashes,
    pdq_of,
)

ORIENTATIONS = 8


def random_hashes(rng: np.random.Generator, count: int) -> list[str]:
    return [bytes(row).hex() for row in rng.integers(0, 256, (count, 32), dtype=np.uint8)]


def bank_of(rng: np.random.Generator, size: int, crops: int, dihedral: int = 0) -> HashBank:
    bank, now = HashBank(), datetime.now(UTC)
    rows = 1 + crops + dihedral
    hashes = random_hashes(rng, size * rows)
    for i in range(size):
        pdq, *others = hashes[i * rows : (i + 1) * rows]
        sha = f"{i:064x}"
        entry = BankEntry(
            image_sha256=sha, pdq=pdq, pdq_quality=100, pdq_crops=others[:crops], pdq_dihedral=others[crops:],
            event_id=sha, label="fake", decided_by="review", decided_at=now,
        )  # fmt: skip
        bank.add(entry)
    return bank


def dihedral_lookups(rng: np.random.Generator, size: int, queries: list[str]) -> dict[str, float]:
    """Per-upload lookup cost of matching mirrored and rotated copies, both ways, against the baseline."""
    crops = len(CROP_LEVELS)
    baseline_bank = bank_of(rng, size, crops)
    it = itertools.cycle(queries)
    baseline = per_call_ms(lambda: baseline_bank.nearest(next(it), DEFAULT_MAX_DISTANCE, quality=100), 10)
    at_bank = bank_of(rng, size, crops, ORIENTATIONS - 1)
    it = itertools.cycle(queries)
    bank_time = per_call_ms(lambda: at_bank.nearest(next(it), DEFAULT_MAX_DISTANCE, quality=100), 10)
    eight = [queries[:ORIENTATIONS]]
    batches = itertools.cycle(eight)
    query_time = per_call_ms(
        lambda: [baseline_bank.nearest(q, DEFAULT_MAX_DISTANCE, quality=100) for q in next(batches)], 10
    )
    print(
        f"{size:>7} entries, mirrored/rotated copies: baseline (1+{crops} rows, 1 query) {baseline:.2f} ms; "
        f"at bank time (+7 rows) {bank_time:.2f} ms ({bank_time / baseline:.2f}x); "
        f"at query time (8 queries) {query_time:.2f} ms ({query_time / baseline:.2f}x)"
    )
    return {
        f"dihedral_baseline_{size}_ms": baseline,
        f"dihedral_bank_time_{size}_ms": bank_time,
        f"dihedral_query_time_{size}_ms": query_time,
    }


def dihedral_hashing(repeat: int) -> dict[str, float]:
    """What each way costs to hash: pdqhash on a 64x64 luma (the upload's path) once or in 8 orientations, and
    dihedral_hashes of a decided 640x480 image (paid once per decision)."""
    luma = np.asarray(draw_image(0).convert("L").resize((PDQ_PX, PDQ_PX)))
    rgb = np.repeat(luma[:, :, np.newaxis], 3, axis=2)
    one = per_call_ms(lambda: pdqhash.compute(rgb), repeat * 10)
    eight = per_call_ms(lambda: pdqhash.compute_dihedral(rgb), repeat * 10)
    banked = per_call_ms(lambda: dihedral_hashes(draw_image(0)), 3)
    print(
        f"pdqhash on the 64x64 luma: compute {one:.3f} ms, compute_dihedral {eight:.3f} ms ({eight / one:.2f}x) "
        f"per upload; dihedral_hashes of a decided 640x480 image {banked:.1f} ms once"
    )
    return {"pdq_compute_64_ms": one, "pdq_compute_dihedral_64_ms": eight, "dihedral_hashes_640x480_ms": banked}


def per_call_ms(call, repeat: int) -> float:  # type: ignore[no-untyped-def]
    call()
    started = time.perf_counter()
    for _ in range(repeat):
        call()
    return (time.perf_counter() - started) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    queries = random_hashes(rng, args.repeat)
    results: dict[str, float] = {}
    for size in args.sizes:
        python_ints = [int(h, 16) for h in random_hashes(rng, size)]
        query = int(queries[0], 16)
        baseline = per_call_ms(lambda ints=python_ints, q=query: min((q ^ h).bit_count() for h in ints), 3)
        results[f"python_scan_{size}_ms"] = baseline
        for crops in (0, len(CROP_LEVELS)):
            bank = bank_of(rng, size, crops)
            it = iter(queries * 2)
            ms = per_call_ms(lambda bank=bank, it=it: bank.nearest(next(it), DEFAULT_MAX_DISTANCE, quality=100), 10)
            results[f"nearest_{size}_entries_{1 + crops}_rows_ms"] = ms
            print(f"{size:>7} entries x {1 + crops} hashes: {ms:7.2f} ms a query ({baseline / ms * (1 + crops):.1f}x "
                  f"the pure-Python scan of {size} hashes, {baseline:.1f} ms, per hash)")  # fmt: skip
    for size in args.sizes:
        results |= dihedral_lookups(rng, size, queries)
    results |= dihedral_hashing(args.repeat)
    image = draw_image(0)
    results["pdq_of_640x480_ms"] = per_call_ms(lambda: pdq_of(image), args.repeat)
    results["crop_hashes_640x480_ms"] = per_call_ms(lambda: crop_hashes(image), 3)
    hashing = results["pdq_of_640x480_ms"], results["crop_hashes_640x480_ms"]
    print(f"pdq_of 640x480: {hashing[0]:.1f} ms; crop_hashes: {hashing[1]:.1f} ms")
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
