"""Image bytes -> pixel_values: `moderation.model.imaging.decode_for_model` against CLIPImageProcessor.

Baseline, as a project without the fast path would do it: Pillow decodes the whole image
(`Image.open(...).convert("RGB")`) and transformers' CLIPImageProcessor (llava-hf/FakeVLM settings; the
PIL backend, as transformers picks without torchvision) resizes, crops and normalises it. Candidate:
`decode_for_model(data)`. Both start from the same encoded bytes and run interleaved in the same process;
each figure is the median of --repeat runs. The last line is a JSON summary; `speedup` is the smallest
per-case ratio (the claim is "on every size and format"), `speedup_geomean` the geometric mean. torch
runs on one thread, like Pillow, so that the ratio is per core.

    python bench/preprocess.py [--megapixels 1 4 8 12] [--formats JPEG PNG] [--repeat 7] [--output FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from moderation.devkit.samples import draw_image, encode
from moderation.devkit.tinymodel import fakevlm_image_processor
from moderation.model.imaging import (
    FAST_MAX_ABS_DIFF,
    FAST_MEAN_ABS_DIFF,
    REDUCING_GAP,
    decode_for_model,
    normalise,
)

TARGET_SPEEDUP = 4.0


def size_for(megapixels: float) -> tuple[int, int]:
    """A 4:3 landscape size of about `megapixels`."""
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
    return width, round(width * 3 / 4)


def clock(fn: Callable[[], object], timings: list[float]) -> None:
    started = time.perf_counter()
    fn()
    timings.append((time.perf_counter() - started) * 1000)


def run_case(data: bytes, processor: CLIPImageProcessorPil, repeat: int, gap: float) -> dict[str, float]:
    def baseline() -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return processor(images=image, return_tensors="np")["pixel_values"][0]

    def candidate() -> np.ndarray:
        # normalised here as the model does on its side, so both give pixel_values
        return normalise(decode_for_model(data, max_pixels=10**9, reducing_gap=gap).pixels)

    def full_decode() -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    diff = np.abs(candidate() - baseline())  # also the warm-up of both
    base: list[float] = []
    cand: list[float] = []
    decode: list[float] = []
    for _ in range(repeat):  # interleaved, so that load on the machine hits both alike
        clock(baseline, base)
        clock(candidate, cand)
        clock(full_decode, decode)
    return {
        "baseline_ms": statistics.median(base),
        "candidate_ms": statistics.median(cand),
        "full_decode_ms": statistics.median(decode),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, nargs="+", default=[1, 4, 8, 12])
    parser.add_argument("--formats", nargs="+", default=["JPEG", "PNG"], choices=["JPEG", "PNG", "WEBP"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reducing-gap", type=float, default=REDUCING_GAP)
    parser.add_argument("--output", type=Path, help="also write everything printed to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(
        f"# preprocess: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    say(
        f"# Pillow {PIL.__version__}, torch {torch.__version__} (1 thread), transformers {transformers.__version__}, "
        f"numpy {np.__version__}"
    )
    say("# baseline : Image.open(bytes).convert('RGB') + transformers CLIPImageProcessor (PIL backend)")
    say(f"# candidate: moderation.model.imaging.decode_for_model(bytes, reducing_gap={args.reducing_gap})")
    say(f"# median of {args.repeat} interleaved runs; diff in normalised units vs the baseline's output")
    header = f"{'case':<14}{'bytes':>11}{'baseline ms':>13}{'candidate ms':>14}{'speedup':>9}"
    say(header + f"{'full decode ms':>16}{'max diff':>10}{'mean diff':>11}")
    processor = fakevlm_image_processor()  # llava-hf/FakeVLM's preprocessor_config.json
    cases = {}
    for megapixels in args.megapixels:
        size = size_for(megapixels)
        image = draw_image(args.seed + int(megapixels * 10), size)
        for fmt in args.formats:
            data = encode(image, fmt)
            result = run_case(data, processor, args.repeat, args.reducing_gap)
            ratio = result["baseline_ms"] / result["candidate_ms"]
            name = f"{fmt} {megapixels:g}MP"
            cases[name] = {"width": size[0], "height": size[1], "bytes": len(data), "speedup": ratio} | result
            say(
                f"{name:<14}{len(data):>11}{result['baseline_ms']:>13.1f}{result['candidate_ms']:>14.1f}"
                f"{ratio:>9.2f}{result['full_decode_ms']:>16.1f}{result['max_abs_diff']:>10.3f}"
                f"{result['mean_abs_diff']:>11.4f}"
            )
    ratios = [c["speedup"] for c in cases.values()]
    worst_max = max(c["max_abs_diff"] for c in cases.values())
    worst_mean = max(c["mean_abs_diff"] for c in cases.values())
    summary = {
        "bench": "preprocess",
        "baseline": "Pillow full decode + transformers CLIPImageProcessor (PIL backend)",
        "candidate": "moderation.model.imaging.decode_for_model",
        "reducing_gap": args.reducing_gap,
        "speedup": round(min(ratios), 2),
        "speedup_geomean": round(math.exp(statistics.fmean(math.log(r) for r in ratios)), 2),
        "speedup_by_case": {name: round(c["speedup"], 2) for name, c in cases.items()},
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": min(ratios) >= TARGET_SPEEDUP,
        "max_abs_diff": round(worst_max, 4),
        "mean_abs_diff": round(worst_mean, 5),
        "tolerance": {"max_abs_diff": FAST_MAX_ABS_DIFF, "mean_abs_diff": FAST_MEAN_ABS_DIFF},
        "within_tolerance": worst_max <= FAST_MAX_ABS_DIFF and worst_mean <= FAST_MEAN_ABS_DIFF,
        "cases": {
            name: {k: round(v, 4) if isinstance(v, float) else v for k, v in c.items()} for name, c in cases.items()
        },
    }
    say(json.dumps(summary))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
