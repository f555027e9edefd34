"""Near-duplicate lookup time: HashBank.nearest over banks of 10k and 100k entries, each with the hashes of
its crops (1 + len(CROP_LEVELS) rows an entry) or without, against a baseline measured in the same run:
the same scan in pure Python (int.bit_count per banked hash). Also the time of pdq_of and crop_hashes on a
640x480 image. Hashes are random: the scan costs the same whatever they are. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime

import numpy as np

from moderation.devkit.samples import draw_image
from moderation.events import BankEntry
from moderation.worker.neardup import CROP_LEVELS, DEFAULT_MAX_DISTANCE, HashBank, crop_hashes, pdq_of


def random_hashes(rng: np.random.Generator, count: int) -> list[str]:
    return [bytes(row).hex() for row in rng.integers(0, 256, (count, 32), dtype=np.uint8)]


def bank_of(rng: np.random.Generator, size: int, crops: int) -> HashBank:
    bank, now = HashBank(), datetime.now(UTC)
    hashes = random_hashes(rng, size * (1 + crops))
    for i in range(size):
        pdq, *others = hashes[i * (1 + crops) : (i + 1) * (1 + crops)]
        sha = f"{i:064x}"
        entry = BankEntry(
            image_sha256=sha, pdq=pdq, pdq_quality=100, pdq_crops=others, event_id=sha, label="fake",
            decided_by="review", decided_at=now,
        )  # fmt: skip
        bank.add(entry)
    return bank


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
    image = draw_image(0)
    results["pdq_of_640x480_ms"] = per_call_ms(lambda: pdq_of(image), args.repeat)
    results["crop_hashes_640x480_ms"] = per_call_ms(lambda: crop_hashes(image), 3)
    hashing = results["pdq_of_640x480_ms"], results["crop_hashes_640x480_ms"]
    print(f"pdq_of 640x480: {hashing[0]:.1f} ms; crop_hashes: {hashing[1]:.1f} ms")
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
