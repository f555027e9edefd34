"""The deployed GPU model measured THROUGH Triton: tritonserver with triton_models/fakevlm and fakevlm_explain on
their configs/gpu.pbtxt (`--model-config-name=gpu`), FakeVLM-shaped random bf16 weights made on the machine,
driven by the worker's own TritonDetector. One run, one device, written to bench/results/triton_gpu-<device>.txt:

- in process: the same FakeVLM with the same fast path (configs/gpu.pbtxt's parameters), verdicts at its
  largest bucket: the baseline;
- through Triton: verdict img/s at increasing client concurrency (one request per image, as the worker sends);
  the peak, and its ratio to the in-process figure;
- verdict p50/p99 at 80% of that peak (open loop: requests sent at that rate, whatever the answers);
- verdict p99 at the same rate while explanations run on fakevlm_explain.

    python bench/triton_gpu.py                       # on a CUDA machine with nvidia-pytriton's tritonserver
    python bench/triton_gpu.py --tiny --device cpu   # anywhere: tiny shapes, CPU configs, a dry run of the steps
    python bench/triton_gpu.py --pack bench/.carry --python-version 3.12   # here: what the GPU machine lacks
    bash bench/triton_gpu_device.sh                  # there: unpack bench/.carry, run this, under 8 minutes

NOT RUN ON A GPU in this repository (no device was lent to issue 20's session): results/ has no GPU figure of it.
Targets on an H100 (issue 20): verdicts >= 85 img/s through Triton, Triton / in process >= 0.9.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moderation.devkit import servers  # noqa: E402
from moderation.devkit.tinymodel import FAKEVLM_WIDTHS, TINY_WIDTHS, build_tiny_processor, llava_config  # noqa: E402
from moderation.model.detectors import TritonDetector, running  # noqa: E402
from moderation.model.fakevlm import FakeVLM  # noqa: E402
from moderation.model.triton_model import fast_path  # noqa: E402
from moderation.settings import Settings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET_IMG_S, TARGET_RATIO = 85.0, 0.9
FAKEVLM_VOCAB = 32064


def model_params(gpu: bool) -> dict[str, str]:
    """The parameters Triton's fakevlm runs with here: configs/gpu.pbtxt on a GPU, config.pbtxt on the CPU."""
    path = ROOT / "triton_models" / "fakevlm" / ("configs/gpu.pbtxt" if gpu else "config.pbtxt")
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in config.parameters.items()}


def make_weights(directory: Path, tiny: bool) -> Path:
    """A FakeVLM-shaped checkpoint with random bf16 weights, saved where Triton's models load it."""
    from transformers import LlavaForConditionalGeneration

    processor = build_tiny_processor()  # token ids do not matter for speed; the shapes do
    tokenizer = processor.tokenizer
    image_id, pad_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id
    vocab = -(-len(tokenizer) // 64) * 64 if tiny else FAKEVLM_VOCAB
    config = llava_config(TINY_WIDTHS if tiny else FAKEVLM_WIDTHS, vocab_size=vocab, image_token_id=image_id,
                          pad_token_id=pad_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def in_process(checkpoint: Path, device: str, crops: np.ndarray, seconds: float) -> float:
    """Verdict img/s of the same model, same fast path, batches of its largest bucket, in this process."""
    params = model_params(device.startswith("cuda"))
    fast = fast_path(params)
    vlm = FakeVLM.load(checkpoint, device=device, dtype=params.get("dtype"), fast=fast)
    batch = crops[: max(fast.batch_buckets or (len(crops),))]
    never = [2.0] * len(batch)
    vlm.score(batch, never)  # compiles (or warms) this bucket
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        vlm.score(batch, never)
        done += len(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    rate = done / (time.perf_counter() - start)
    del vlm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rate


def repository(run_dir: Path, tiny: bool) -> Path:
    """fakevlm and fakevlm_explain as deploy/ ships them, the weights where their `checkpoint` parameters point."""
    repo = run_dir / "repository"
    for name in ("fakevlm", "fakevlm_explain"):
        shutil.copytree(ROOT / "triton_models" / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    make_weights(repo / "fakevlm" / "weights", tiny)
    return repo


def start_triton(run_dir: Path, repo: Path, gpu: bool) -> tuple[int, servers.Launch, str]:
    (grpc, http, metrics), _ = servers.choose_ports(3, 0)
    launch = servers.triton(run_dir, repo, grpc, http, metrics)
    if gpu:
        launch["argv"].append("--model-config-name=gpu")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return servers.spawn(launch), launch, launch["address"]


async def closed_loop(detector: Any, crops: np.ndarray, concurrency: int, seconds: float) -> float:
    """img/s with `concurrency` requests always in flight."""
    done, deadline = 0, time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await detector.detect(crops[(i + done) % len(crops)])
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return done / (time.perf_counter() - start)


async def open_loop(call: Callable[[np.ndarray], Any], crops: np.ndarray, rate: float, seconds: float) -> list[float]:
    """Latencies (s) of requests sent at `rate` per second for `seconds`, whatever the answers."""
    latencies: list[float] = []

    async def one(crop: np.ndarray) -> None:
        sent = time.perf_counter()
        await call(crop)
        latencies.append(time.perf_counter() - sent)

    tasks, start = [], time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(crops[i % len(crops)])))
    await asyncio.gather(*tasks)
    return latencies


def ms(latencies: list[float], q: float) -> float:
    """The q-quantile of latencies in seconds, in milliseconds."""
    if len(latencies) == 1:
        return round(1000 * latencies[0], 1)
    return round(1000 * statistics.quantiles(latencies, n=100, method="inclusive")[round(q * 100) - 1], 1)


async def through_triton(url: str, crops: np.ndarray, args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    settings = Settings(triton_url=url, triton_startup_timeout_s=args.startup_s)
    result: dict[str, Any] = {"img_s": {}}
    async with running(TritonDetector(settings)) as detector:
        for concurrency in args.concurrency:
            rate = await closed_loop(detector, crops, concurrency, args.seconds)
            result["img_s"][concurrency] = round(rate, 2)
            say(f"triton   verdicts, {concurrency:4d} in flight: {rate:8.2f} img/s")
        peak = max(result["img_s"].values())
        latencies = await open_loop(detector.detect, crops, 0.8 * peak, args.seconds)
        result |= {"p50_ms_at_80pct": ms(latencies, 0.5), "p99_ms_at_80pct": ms(latencies, 0.99)}
        say(f"triton   verdicts at 80% of peak ({0.8 * peak:.1f}/s): p50 {result['p50_ms_at_80pct']:.0f} ms, "
            f"p99 {result['p99_ms_at_80pct']:.0f} ms")  # fmt: skip
        explaining = asyncio.create_task(closed_loop_explain(detector, crops, args.explain_concurrency, args.seconds))
        latencies = await open_loop(detector.detect, crops, 0.8 * peak, args.seconds)
        explained = await explaining
        result |= {"p99_ms_with_explanations": ms(latencies, 0.99), "explain_img_s": explained}
        say(f"triton   verdict p99 with explanations running ({explained:.2f} img/s explained): "
            f"{result['p99_ms_with_explanations']:.0f} ms")  # fmt: skip
    return result


async def closed_loop_explain(detector: Any, crops: np.ndarray, concurrency: int, seconds: float) -> float:
    done, start = 0, time.perf_counter()

    async def client(i: int) -> None:
        nonlocal done
        while time.perf_counter() - start < seconds:
            await detector.explain(crops[(i + done) % len(crops)])
            done += 1

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return round(done / (time.perf_counter() - start), 3)


# What the GPU machine lacks for the client side (it has torch, transformers and numpy): the worker's Triton
# detector and its settings. Those that depend on numpy come without their dependencies: a numpy of ours on
# PYTHONPATH would shadow the one the machine's torch was built against.
CLIENT_WHEELS = (  # with tritonclient[grpc] 2.73's own ranges
    "pydantic>=2.7,<3",
    "pydantic-settings>=2.3",
    "opentelemetry-api",
    "grpcio>=1.81.1",
    "protobuf>=6.30,<7",
    "python-rapidjson>=0.9.1",
    "urllib3>=2.0.7",
)
CLIENT_WHEELS_NO_DEPS = ("tritonclient==2.73.0", "ml-dtypes<=0.5.4")


def pack(out: Path, python_version: str) -> None:
    """tritonserver from nvidia-pytriton as a tarball (its libpython left out: the Python backend stub loads the
    running interpreter's) and the client's wheels for the GPU machine's Python, into `out`."""
    import pytriton

    site = Path(pytriton.__file__).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "tritonserver.tar.xz", "w:xz") as tar:
        tar.add(site / "pytriton", arcname="pytriton", filter=lambda t: None if "__pycache__" in t.name else t)
        for lib in (site / "nvidia_pytriton.libs").iterdir():
            if not lib.name.startswith("libpython"):
                tar.add(lib, arcname=f"nvidia_pytriton.libs/{lib.name}")
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:", "--dest"]
    download += [str(out / "wheels"), "--python-version", python_version, "--platform", "manylinux2014_x86_64"]
    subprocess.run([*download, *CLIENT_WHEELS], check=True)
    subprocess.run([*download, "--no-deps", *CLIENT_WHEELS_NO_DEPS], check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"{out}: {size:.1f} MiB to carry (the device tool takes 64 MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run; figures mean nothing)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 128, 256])
    parser.add_argument("--explain-concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--startup-s", type=float, default=360.0, help="Triton's load and warm-up (compiles)")
    parser.add_argument("--pack", type=Path, help="only pack tritonserver and the client's wheels into this folder")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for --pack")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.pack:
        pack(args.pack, args.python_version)
        return
    gpu = args.device.startswith("cuda")
    name = torch.cuda.get_device_name().lower().replace(" ", "-") if gpu else f"{platform.machine()}-cpu"
    output = args.output or RESULTS / f"triton_gpu-{name}{'-tiny' if args.tiny else ''}.txt"
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"# triton_gpu: {name}, torch {torch.__version__}, {'tiny' if args.tiny else 'FakeVLM 7B shape'}, "
        f"random bf16 weights, configs {'gpu' if gpu else 'cpu (default)'}")  # fmt: skip
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, size=(64, 336, 336, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="triton-gpu-") as tmp:
        run_dir = Path(tmp)
        repo = repository(run_dir, args.tiny)
        baseline = in_process(repo / "fakevlm" / "weights", args.device, crops, args.seconds)
        say(f"inproc   verdicts, same model and fast path: {baseline:8.2f} img/s")
        pid, launch, url = start_triton(run_dir, repo, gpu)
        try:
            result = asyncio.run(through_triton(url, crops, args, say))
        finally:
            servers.stop({"triton": (pid, launch)})
            shutil.copy2(launch["log"], output.with_suffix(".triton.log"))
    peak = max(result["img_s"].values())
    summary = {"bench": "triton_gpu", "device": name, "tiny": args.tiny, "in_process_img_s": round(baseline, 2),
               "triton_img_s_peak": peak, "ratio": round(peak / baseline, 3), **result}  # fmt: skip
    if gpu and not args.tiny:
        summary["targets_met"] = peak >= TARGET_IMG_S and peak / baseline >= TARGET_RATIO
    say(json.dumps(summary))
    output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
