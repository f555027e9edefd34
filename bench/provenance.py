"""What reading provenance adds to the decode thread: `read_provenance` against `decode_for_model`, per image.

Cases: a photo-like image with no metadata, the same with EXIF and an IPTC XMP packet, the same signed
with a C2PA manifest (c2pa-python validates the signature and the hash of every byte), and the same as a
signed camera capture with an AI-generated parent composited in (two manifests, the parent's read as an
ingredient). Baseline: the
worker's own decode of the same bytes (`decode_for_model`, the fast path), measured interleaved in the same
run; each figure is the median of --repeat runs. `overhead` is provenance time / decode time. The last line
is a JSON summary.

    python bench/provenance.py [--megapixels 1] [--formats JPEG PNG] [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable

import c2pa

from moderation.devkit import provenance_samples as samples
from moderation.devkit.samples import draw_image, encode
from moderation.model.imaging import decode_for_model
from moderation.worker.provenance import read_provenance

MAX_PIXELS = 100_000_000


def size_for(megapixels: float) -> tuple[int, int]:
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    return width, round(width * 3 / 4)


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def cases(fmt: str, megapixels: float) -> dict[str, bytes]:
    plain = encode(draw_image(7, size_for(megapixels)), fmt)
    tagged = samples.iptc_tagged(plain, fmt, samples.TRAINED_ALGORITHMIC_MEDIA)
    parent = samples.signed(samples.sample_image(fmt, (320, 240)), fmt, samples.TRAINED_ALGORITHMIC_MEDIA)
    return {
        "plain": plain,
        "iptc_xmp": tagged,
        "c2pa": samples.signed(plain, fmt, samples.TRAINED_ALGORITHMIC_MEDIA),
        "c2pa_composite": samples.signed(plain, fmt, samples.DIGITAL_CAPTURE, ingredients=(parent,)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=1.0)
    parser.add_argument("--formats", nargs="+", default=["JPEG", "PNG"], choices=["JPEG", "PNG"])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    print(f"python {platform.python_version()}, c2pa-python {c2pa.__version__}, {args.megapixels} MP")
    results = []
    for fmt in args.formats:
        for case, data in cases(fmt, args.megapixels).items():
            found = read_provenance(data, fmt)
            provenance_ms = median_ms(lambda data=data, fmt=fmt: read_provenance(data, fmt), args.repeat)
            decode_ms = median_ms(lambda data=data: decode_for_model(data, max_pixels=MAX_PIXELS), args.repeat)
            overhead = provenance_ms / decode_ms
            results.append(
                {
                    "format": fmt,
                    "case": case,
                    "bytes": len(data),
                    "provenance_ms": round(provenance_ms, 3),
                    "decode_ms": round(decode_ms, 3),
                    "overhead": round(overhead, 4),
                    "declares_ai": bool(found and found.declares_ai),
                    "ingredient_declares_ai": bool(found and found.ingredient_declares_ai),
                }
            )
            print(
                f"{fmt:4} {case:14} {len(data) / 1e6:5.2f} MB  read_provenance {provenance_ms:8.3f} ms  "
                f"decode_for_model {decode_ms:7.2f} ms  overhead {overhead:7.2%}"
            )
    print(json.dumps({"megapixels": args.megapixels, "results": results}))


if __name__ == "__main__":
    main()
