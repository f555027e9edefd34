"""FakeVLM inference throughput: the verdict-first path and explanations against transformers `generate`.

A model of FakeVLM's exact shape (LLaVA-1.5-7B: CLIP ViT-L/14-336, 2-layer gelu projector, Llama-7B with
a 32064 vocabulary) with RANDOM weights, built in memory: nothing is downloaded, so the figures are
about speed only. `--tiny` uses moderation.devkit.tinymodel's shrunken config instead, which runs on a CPU
(that is how the test suite and this machine exercise the script; its figures say nothing about a GPU).

Measured in one run, on one device, with the same inputs:
- verdict:  `FakeVLM.score` with no explanations (one forward pass over prompt + image + "This is a"),
            at each --verdict-batch;
- explain:  `FakeVLM.score` explaining every image (the verdict pass, then greedy generation that
            continues from its KV cache), --new-tokens tokens each, at each --explain-batch;
- generate: transformers `generate` from the raw prompt, the same images, tokens and batch (the
            baseline for explain);
- naive:    transformers `generate`, batch 1 (how the released eval runs; the baseline for verdict).
EOS is disabled for every path, so each generates exactly --new-tokens tokens (random weights would
otherwise stop at random points). The printed lines, ending with a JSON summary, are also written to
bench/results/gpu_fakevlm-<device>.txt (the card's name, or cpu-tiny).

    python bench/gpu_fakevlm.py                 # on a CUDA device, bf16
    python bench/gpu_fakevlm.py --tiny          # anywhere, in seconds
    python bench/gpu_fakevlm.py --device cpu --dtype bfloat16 --threads 2 --verdict-batch 1 \
        --explain-batch 1 --new-tokens 16 --repeat 1 --generate-repeat 1   # the 7B shape on a CPU (16 GB RAM)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, LlavaForConditionalGeneration

from moderation.devkit.tinymodel import FAKEVLM_WIDTHS, TINY_WIDTHS, build_tiny_processor, llava_config
from moderation.model.fakevlm import FakeVLM, FastPath
from moderation.model.imaging import CROP_SIZE

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_VERDICT_IMG_S = 67.0  # on one H100
TARGET_EXPLAIN_VS_GENERATE = 2.0
FAKEVLM_VOCAB = 32064
COMPILED_NOTE = "; verdict pass compiled (torch.compile, in the warm-up); explained rows prefilled again"


def build_model(tiny: bool, device: str, dtype: torch.dtype, *, compile: bool = False) -> FakeVLM:
    """Random weights, built directly on the device (no checkpoint on disk), wrapped like a loaded FakeVLM."""
    processor = build_tiny_processor()  # real token ids do not matter for speed; the shapes do
    tokenizer = processor.tokenizer
    image_id, pad_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    if tiny:
        vocab = -(-len(tokenizer) // 64) * 64
        config = llava_config(TINY_WIDTHS, vocab_size=vocab, image_token_id=image_id, pad_token_id=pad_id)
    else:
        config = llava_config(FAKEVLM_WIDTHS, vocab_size=FAKEVLM_VOCAB, image_token_id=image_id, pad_token_id=pad_id)
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    # No EOS: every path generates exactly the requested number of tokens.
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=None, pad_token_id=pad_id, do_sample=False)
    model_id = "random-fakevlm-tiny" if tiny else "random-fakevlm-7b"
    return FakeVLM(model, processor, model_id=model_id, fast=FastPath(compile=compile))


def timed(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median seconds of `repeat` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # uint8 crops, as Triton receives them: FakeVLM.score normalises them on its device
    return torch.randint(0, 256, (batch, CROP_SIZE, CROP_SIZE, 3), generator=generator, dtype=torch.uint8)


def naive_generate(vlm: FakeVLM, images: torch.Tensor, new_tokens: int) -> Any:
    """transformers generate from the raw prompt (no answer prefix, no KV reuse), as the released eval does."""
    prompt = vlm._prefix_ids[:, : -len(vlm._answer_ids)].expand(images.shape[0], -1)
    return vlm.model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        pixel_values=vlm.pixel_values(images),
        max_new_tokens=new_tokens,
        do_sample=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="moderation.devkit.tinymodel's config: runs on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default: bf16 on CUDA, else fp32")
    parser.add_argument("--verdict-batch", type=int, nargs="+", default=[1, 16, 64, 96])
    parser.add_argument("--explain-batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each verdict batch")
    parser.add_argument("--generate-repeat", type=int, default=2, help="timed runs of each generating path")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads; default 1 on a CPU (OpenMP spins on a busy box)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="FastPath(compile=True): torch.compile's verdict pass (the baselines stay eager)",
    )
    parser.add_argument("--output", type=Path, help="default: bench/results/gpu_fakevlm-<device>.txt")
    args = parser.parse_args(argv)
    if not args.tiny and not args.device.startswith("cuda") and args.dtype != "bfloat16":
        parser.error("on a CPU the 7B shape needs --dtype bfloat16 (14 GB of weights, 28 GB in fp32), or --tiny")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    )
    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") + ("-tiny" if args.tiny else "")
    slug += "-compiled" if args.compile else ""
    output = args.output or RESULTS / f"gpu_fakevlm-{slug}.txt"
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    vlm = build_model(args.tiny, args.device, dtype, compile=args.compile)
    params = sum(p.numel() for p in vlm.model.parameters())
    say(
        f"# gpu_fakevlm: {card}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {sys.version.split()[0]}"
    )
    say(
        f"# model: {vlm.model_id}, {params / 1e6:,.1f} M parameters, {str(dtype).removeprefix('torch.')}, "
        f"random weights{COMPILED_NOTE if args.compile else ''}"
    )
    say(
        f"# prompt+image+answer prefix: {vlm._prefix_ids.shape[1]} tokens; {args.new_tokens} new tokens per explanation"
    )
    if args.tiny:
        say("# --tiny: a plumbing check; these figures say nothing about FakeVLM on a GPU")

    never = [math.inf]
    verdict: dict[int, float] = {}
    for batch in args.verdict_batch:
        images = pixels(batch)
        seconds = timed(partial(vlm.score, images, never * batch), args.device, args.repeat)
        verdict[batch] = batch / seconds
        say(f"verdict      batch {batch:>3}: {verdict[batch]:10.2f} img/s  ({seconds * 1000:.1f} ms per batch)")

    naive_s = timed(partial(naive_generate, vlm, pixels(1), args.new_tokens), args.device, args.generate_repeat)
    naive = 1 / naive_s
    say(f"naive        batch   1: {naive:10.2f} img/s  (transformers generate, {args.new_tokens} tokens)")

    explain: dict[int, float] = {}
    generate: dict[int, float] = {}
    for batch in args.explain_batch:
        images = pixels(batch, seed=1)
        always = [0.0] * batch
        ours = timed(
            partial(vlm.score, images, always, max_new_tokens=args.new_tokens), args.device, args.generate_repeat
        )
        theirs = timed(partial(naive_generate, vlm, images, args.new_tokens), args.device, args.generate_repeat)
        explain[batch], generate[batch] = batch / ours, batch / theirs
        say(
            f"explain      batch {batch:>3}: {explain[batch]:10.2f} img/s   generate: {generate[batch]:8.2f} img/s"
            f"   ratio {explain[batch] / generate[batch]:.2f}"
        )

    best_batch = max(verdict, key=lambda b: verdict[b])
    # The targets are for one H100; an H200 is the same GH100 compute (132 SMs, same clocks) with more
    # and faster HBM, and the verdict pass is compute-bound, so they apply to it too (say which card).
    on_h100 = not args.tiny and ("H100" in card or "H200" in card)
    ratios = {b: explain[b] / generate[b] for b in explain}
    summary = {
        "bench": "gpu_fakevlm",
        "device": card,
        "model": vlm.model_id,
        "compiled": args.compile,
        "dtype": str(dtype).removeprefix("torch."),
        "new_tokens": args.new_tokens,
        "baseline": f"transformers generate, batch 1: {naive:.3f} img/s",
        "verdict_img_s": {str(b): round(v, 3) for b, v in verdict.items()},
        "verdict_best_img_s": round(verdict[best_batch], 3),
        "verdict_vs_naive": round(verdict[best_batch] / naive, 2),
        "explain_img_s": {str(b): round(v, 3) for b, v in explain.items()},
        "generate_img_s": {str(b): round(v, 3) for b, v in generate.items()},
        "explain_vs_generate": {str(b): round(r, 2) for b, r in ratios.items()},
        "naive_img_s": round(naive, 4),
        "targets": {"verdict_img_s": TARGET_VERDICT_IMG_S, "explain_vs_generate": TARGET_EXPLAIN_VS_GENERATE},
        "targets_apply": on_h100,  # the targets are for the 7B shape on one H100
        "meets_targets": (
            verdict[best_batch] >= TARGET_VERDICT_IMG_S and min(ratios.values()) >= TARGET_EXPLAIN_VS_GENERATE
            if on_h100
            else None
        ),
    }
    say(json.dumps(summary))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"# written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
