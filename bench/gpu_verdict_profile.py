"""Why the transformers path misses issue 5's GPU targets: where the time goes, and what compiling buys.

An experiment on FakeVLM's 7B shape with random bf16 weights (bench/gpu_fakevlm.py's model), one step
per invocation so that a step that runs over its time limit loses only itself:

    python bench/gpu_verdict_profile.py profile   # CUDA kernel time of one verdict pass, by kind
    python bench/gpu_verdict_profile.py compile   # verdict img/s, eager vs torch.compile'd language model
    python bench/gpu_verdict_profile.py static    # transformers generate: dynamic vs static (compiled) KV cache

Each step appends its lines to bench/results/gpu_verdict_profile-<card>.txt. Nothing here changes the
product; it says what a faster verdict and explanation path would have to do.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_fakevlm import RESULTS, build_model, naive_generate, pixels, timed

KINDS = (
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "cublas")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("norm/elementwise", ("elementwise", "vectorized", "reduce", "norm", "pow", "mul", "add", "silu", "gelu")),
    ("copy/cat/index", ("copy", "cat", "index", "gather", "scatter", "memcpy", "memset", "fill")),
)


def kind(name: str) -> str:
    lowered = name.lower()
    return next((k for k, keys in KINDS if any(key in lowered for key in keys)), "other")


def profile(vlm: Any, batch: int, say: Any) -> None:
    cuda = vlm.device.type == "cuda"
    images = pixels(batch)
    never = [math.inf] * batch
    vlm.score(images, never)  # warm-up
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        vlm.score(images, never)
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and (cuda or not e.cpu_children)]
    total = sum(e.device_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for event in events:
        by_kind[kind(event.key)] += event.device_time_total
    say(f"profile  verdict batch {batch}: {total / 1000:.1f} ms of CUDA kernel time")
    for name, micros in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        say(f"profile    {name:<18} {micros / 1000:8.1f} ms  {micros / total:6.1%}")
    for event in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        say(f"profile    top  {event.device_time_total / 1000:8.1f} ms  x{event.count:<5} {event.key[:90]}")


def compiled_verdict(vlm: Any, batch: int, repeat: int, say: Any) -> dict[str, float]:
    images = pixels(batch)
    never = [math.inf] * batch
    device = vlm.device.type
    eager = batch / timed(partial(vlm.score, images, never), device, repeat)
    say(f"compile  verdict batch {batch}: eager    {eager:8.2f} img/s")
    model = vlm.model.model
    model.language_model = torch.compile(model.language_model, dynamic=False)
    model.vision_tower = torch.compile(model.vision_tower, dynamic=False)
    compiled = batch / timed(partial(vlm.score, images, never), device, repeat)
    say(f"compile  verdict batch {batch}: compiled {compiled:8.2f} img/s  ({compiled / eager:.2f}x eager)")
    return {"eager_img_s": round(eager, 2), "compiled_img_s": round(compiled, 2)}


def static_generate(vlm: Any, batch: int, new_tokens: int, say: Any) -> dict[str, float]:
    images = pixels(batch, seed=1)
    device = vlm.device.type
    dynamic = batch / timed(partial(naive_generate, vlm, images, new_tokens), device, 1)
    say(f"static   generate batch {batch}, {new_tokens} tokens: dynamic cache {dynamic:8.2f} img/s")
    vlm.model.generation_config.cache_implementation = "static"  # transformers compiles its decode step
    static = batch / timed(partial(naive_generate, vlm, images, new_tokens), device, 1)
    ratio = static / dynamic
    say(f"static   generate batch {batch}, {new_tokens} tokens: static cache  {static:8.2f} img/s  ({ratio:.2f}x)")
    return {"dynamic_img_s": round(dynamic, 3), "static_img_s": round(static, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["profile", "compile", "static"])
    parser.add_argument("--tiny", action="store_true", help="moderation.devkit.tinymodel's shape: a plumbing check")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--generate-batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # a CPU run (with --tiny) is a plumbing check
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") + ("-tiny" if args.tiny else "")
    output = RESULTS / f"gpu_verdict_profile-{slug}.txt"
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    vlm = build_model(args.tiny, device, torch.bfloat16 if device == "cuda" else torch.float32)
    say(f"# {args.step}: {card}, torch {torch.__version__}, {vlm.model_id}, bf16, random weights")
    if args.step == "profile":
        profile(vlm, args.batch, say)
        result: dict[str, Any] = {}
    elif args.step == "compile":
        result = compiled_verdict(vlm, args.batch, args.repeat, say)
    else:
        result = static_generate(vlm, args.generate_batch, args.new_tokens, say)
    say(json.dumps({"bench": "gpu_verdict_profile", "step": args.step, "device": card, **result}))
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a") as out:
        out.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
