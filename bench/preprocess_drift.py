"""Fast preprocessing as SCORE drift: the trained tiny FakeVLM's P(fake) on the exact path against the fast one.

FakeVLM reads high-frequency artifacts, so pixels within tolerance are not enough: what matters is whether
the verdict moves. Images are the trained model's own distribution (`moderation.devkit.synthetic`, real and
fake alternating), rendered at 0.3 to --max-mp megapixels (upscaled renders, odd aspect ratios up to 3:1),
a few at their native size (the resize is a no-op) or smaller (the resize enlarges), and saved as JPEG at
a few qualities or as PNG. Each image is scored twice, verdict-first and without explanations:

- baseline (exact): `imaging.decode` + `imaging.crop` (Pillow, = transformers' CLIPImageProcessor once
  normalised, as the model does on its side);
- candidate (fast): `imaging.decode_for_model` (MODERATION_FAST_PREPROCESS=true).

Printed per case (format and quality) and overall: max and mean |dP(fake)|, label flips at 0.5, accuracy of
each path, and the baseline / candidate preprocessing time ratio (sums over the images, interleaved in
the same run, torch on one thread). The issue's rule: the fast path may be the stream's default only if
the max drift is at most 0.01 with no flip. The last line is a JSON summary.

    python bench/preprocess_drift.py [--count 300] [--max-mp 12] [--seed 7] [--output FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moderation.devkit.synthetic import make_sample
from moderation.devkit.training import trained_checkpoint
from moderation.model.fakevlm import FakeVLM
from moderation.model.imaging import crop, decode, decode_for_model

MAX_DRIFT = 0.01  # issue 12 point 5: the fast path stays the default only within this, with no flip
THRESHOLD = 0.5
CASES = (("JPEG", 95), ("JPEG", 85), ("JPEG", 70), ("PNG", None))
NO_CAP = 10**10
WORST = 5  # the images with the largest drift, listed


@dataclass(frozen=True)
class Rendered:
    label: str  # the truth: "fake" or "real"
    case: str  # format and quality
    width: int
    height: int
    data: bytes


def render_size(rng: np.random.Generator, native: tuple[int, int], max_mp: float) -> tuple[int, int]:
    """Mostly 0.3..max_mp MP log-uniform with an aspect ratio up to 3:1; 5% native, 10% below 336 px."""
    kind = rng.uniform()
    if kind < 0.05:
        return native
    aspect = math.exp(rng.uniform(-math.log(3), math.log(3)))  # width / height
    if kind < 0.15:  # downscaled render: the shortest edge below 336, so both paths enlarge it
        short = int(rng.integers(160, 336))
        long = round(short * max(aspect, 1 / aspect))
        return (long, short) if aspect >= 1 else (short, long)
    pixels = math.exp(rng.uniform(math.log(0.3), math.log(max(max_mp, 0.3)))) * 1e6
    height = math.sqrt(pixels / aspect)
    return max(1, round(height * aspect)), max(1, round(height))


def rendered(count: int, seed: int, max_mp: float) -> Iterator[Rendered]:
    """One image at a time: 300 encoded 12 MP images would not fit beside everyone else's memory."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        sample = make_sample(seed, index)
        size = render_size(rng, sample.image.size, max_mp)
        picture = sample.image if size == sample.image.size else sample.image.resize(size, Image.Resampling.BICUBIC)
        # Pairs of indices (one fake, one real: the label alternates) share a case, so every case has both.
        fmt, quality = CASES[index // 2 % len(CASES)]
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt, **({"quality": quality} if quality else {}))
        case = f"{fmt} q{quality}" if quality else fmt
        yield Rendered(sample.label, case, size[0], size[1], buffer.getvalue())


def timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def exact(data: bytes) -> np.ndarray:
    return crop(decode(data, max_pixels=NO_CAP).image)


def fast(data: bytes) -> np.ndarray:
    return decode_for_model(data, max_pixels=NO_CAP).pixels


def verdicts(model: FakeVLM, pixels: list[np.ndarray]) -> list[float]:
    return [s.score for s in model.score(np.stack(pixels), [math.inf] * len(pixels))]  # inf: never explain


def measure(model: FakeVLM, batch: list[Rendered]) -> list[dict[str, object]]:
    """Both paths on each image, interleaved so that load on the machine hits both alike; then both scored."""
    exact_pixels, fast_pixels, times = [], [], []
    for image in batch:
        base, base_s = timed(lambda data=image.data: exact(data))  # type: ignore[misc]
        cand, cand_s = timed(lambda data=image.data: fast(data))  # type: ignore[misc]
        exact_pixels.append(base)
        fast_pixels.append(cand)
        times.append((base_s * 1000, cand_s * 1000))
    rows: list[dict[str, object]] = []
    scored = zip(batch, verdicts(model, exact_pixels), verdicts(model, fast_pixels), times, strict=True)
    for image, p_exact, p_fast, (exact_ms, fast_ms) in scored:
        fake = image.label == "fake"
        rows.append(
            {
                "case": image.case,
                "label": image.label,
                "size": f"{image.width}x{image.height}",
                "megapixels": image.width * image.height / 1e6,
                "p_exact": p_exact,
                "p_fast": p_fast,
                "drift": abs(p_fast - p_exact),
                "flip": (p_exact >= THRESHOLD) != (p_fast >= THRESHOLD),
                "exact_right": (p_exact >= THRESHOLD) == fake,
                "fast_right": (p_fast >= THRESHOLD) == fake,
                "exact_ms": exact_ms,
                "fast_ms": fast_ms,
            }
        )
    return rows


def figures(rows: list[dict[str, object]]) -> dict[str, float | int]:
    drift = np.array([r["drift"] for r in rows], dtype=np.float64)
    base_ms = sum(float(r["exact_ms"]) for r in rows)  # type: ignore[arg-type]
    cand_ms = sum(float(r["fast_ms"]) for r in rows)  # type: ignore[arg-type]
    return {
        "images": len(rows),
        "max_drift": float(drift.max()),
        "mean_drift": float(drift.mean()),
        "flips": sum(bool(r["flip"]) for r in rows),
        "exact_accuracy": float(np.mean([r["exact_right"] for r in rows])),
        "fast_accuracy": float(np.mean([r["fast_right"] for r in rows])),
        "exact_ms": base_ms,
        "fast_ms": cand_ms,
        "speedup": base_ms / cand_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="images, cycling through the cases")
    parser.add_argument("--max-mp", type=float, default=12.0, help="largest render, in megapixels")
    parser.add_argument("--seed", type=int, default=7, help="synthetic stream (the model trained on seed 0)")
    parser.add_argument("--batch", type=int, default=16, help="images per scoring pass")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the trained tiny one)")
    parser.add_argument("--output", type=Path, help="also write everything printed to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # the ratio is per core, as in bench/preprocess.py
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    checkpoint = args.model or trained_checkpoint()
    model = FakeVLM.load(checkpoint)
    first = next(rendered(1, args.seed, args.max_mp))
    fast(first.data), exact(first.data)  # warm-up: torch's first resize
    rows: list[dict[str, object]] = []
    batch: list[Rendered] = []
    for image in rendered(args.count, args.seed, args.max_mp):
        batch.append(image)
        if len(batch) == args.batch:
            rows += measure(model, batch)
            batch = []
    if batch:
        rows += measure(model, batch)

    megapixels = [float(r["megapixels"]) for r in rows]  # type: ignore[arg-type]
    say(
        f"# preprocess_drift: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__} (1 thread)"
    )
    say(f"# model: {Path(checkpoint).name}; verdict-first P(fake), no explanations; label at {THRESHOLD}")
    say(
        f"# {len(rows)} synthetic images (seed {args.seed}, real and fake alternating), "
        f"{min(megapixels):.2f} to {max(megapixels):.2f} MP, median {float(np.median(megapixels)):.2f} MP"
    )
    say("# baseline : imaging.decode + imaging.crop (exact, = CLIPImageProcessor once normalised)")
    say("# candidate: imaging.decode_for_model (fast); time = sum over the images, interleaved")
    say(
        f"{'case':<10}{'images':>7}{'max |dP|':>10}{'mean |dP|':>11}{'flips':>7}"
        f"{'acc exact':>11}{'acc fast':>10}{'exact ms':>10}{'fast ms':>9}{'speedup':>9}"
    )
    by_case = {case: [r for r in rows if r["case"] == case] for case in dict.fromkeys(str(r["case"]) for r in rows)}
    groups = by_case | {"JPEG": [r for r in rows if str(r["case"]).startswith("JPEG")], "all": rows}
    results = {name: figures(group) for name, group in groups.items() if group}
    for name, f in results.items():
        say(
            f"{name:<10}{f['images']:>7}{f['max_drift']:>10.4f}{f['mean_drift']:>11.5f}{f['flips']:>7}"
            f"{f['exact_accuracy']:>11.3f}{f['fast_accuracy']:>10.3f}{f['exact_ms']:>10.0f}{f['fast_ms']:>9.0f}"
            f"{f['speedup']:>9.2f}"
        )
    say("# largest drifts:")
    for r in sorted(rows, key=lambda r: -float(r["drift"]))[:WORST]:  # type: ignore[arg-type]
        say(
            f"#   {r['case']:<9} {r['label']:<5} {r['size']:>11}  P(fake) exact {r['p_exact']:.4f}"
            f"  fast {r['p_fast']:.4f}  |dP| {r['drift']:.4f}"
        )
    overall = results["all"]
    faithful = overall["max_drift"] <= MAX_DRIFT and overall["flips"] == 0
    say(
        f"# rule (issue 12.5): fast path as default only if max |dP| <= {MAX_DRIFT} with no flip: "
        f"{'MET' if faithful else 'NOT MET'}"
    )
    summary = {
        "bench": "preprocess_drift",
        "model": Path(checkpoint).name,
        "baseline": "imaging.decode + imaging.crop",
        "candidate": "imaging.decode_for_model",
        "images": len(rows),
        "megapixels": [round(min(megapixels), 2), round(max(megapixels), 2)],
        "max_drift": round(overall["max_drift"], 5),
        "mean_drift": round(overall["mean_drift"], 6),
        "flips": overall["flips"],
        "speedup": round(overall["speedup"], 2),
        "max_allowed_drift": MAX_DRIFT,
        "faithful": faithful,
        "by_case": {
            name: {k: round(v, 6) if isinstance(v, float) else v for k, v in f.items()} for name, f in results.items()
        },
    }
    say(json.dumps(summary))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
