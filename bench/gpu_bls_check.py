"""The GPU Python model's scores against the in-process CPU scores, on the trained tiny FakeVLM.

A device lent here has a GPU but no tritonserver and no TensorRT-LLM, so this drives the GPU model's own
code (triton_models/gpu/fakevlm/1/model.py, as both gpu/fakevlm (role verdict) and gpu/fakevlm_explain
(role explain): the uint8 crops normalised on the GPU, its prompt ids, prompt-table ids, DLPack hand-offs,
verdict from the logits, explanation decoding) with the stand-in for triton_python_backend_utils
(moderation.devkit.pb_utils, which the tests use too) whose two engines are the checkpoint's own PyTorch modules
on the GPU:
- multimodal_encoders: `get_image_features` in fp16 (the vision engine is built --fp16), output left on the GPU;
- tensorrt_llm: the language model in --dtype, image tokens (ids >= vocab_size) looked up in the
  request's prompt_embedding_table, greedy decoding, generation_logits[0] = the logits at the last
  prompt position (TensorRT-LLM's behaviour since NVIDIA/TensorRT-LLM#3205).
What this cannot show: TensorRT-LLM's own kernels, paged KV reuse and in-flight batching.

Checks, each printed with PASS or FAIL, then a JSON summary (also written to bench/results/):
1. the in-process model on the GPU (the `configs/gpu.pbtxt` path) scores as on the CPU (fp32);
2. the GPU BLS model scores as the in-process CPU model, within --tolerance, with the same labels, in both
   roles (the verdict model never generates; the explain model's explanations are compared too);
3. an engine whose generation_logits start one step late (TensorRT-LLM before #3205) is refused, not
   scored: the GPU model checks that generation_logits[0] chose the first generated token;
4. `moderation.offline.modelcheck`: verdict-first against free generation (eval.py's settings) on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderation.devkit import pb_utils
from moderation.devkit.pb_utils import InferenceResponse, Tensor, outputs
from moderation.devkit.synthetic import samples
from moderation.devkit.tinymodel import build_tiny_checkpoint
from moderation.devkit.training import TRAINED_CHECKPOINT
from moderation.model.fakevlm import FakeVLM
from moderation.model.imaging import crop
from moderation.model.manifest import write_manifest
from moderation.offline.modelcheck import check

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GPU_MODEL = ROOT / "triton_models" / "gpu" / "fakevlm" / "1" / "model.py"
SEED = 20_251_129  # neither the training stream nor the held-out one


class Engines:
    """The two engines of the GPU layout, as PyTorch modules of one checkpoint."""

    def __init__(self, vlm: FakeVLM, *, late_logits: bool = False) -> None:
        self.model: Any = vlm.model
        self.device = vlm.device
        self.vocab = int(self.model.config.text_config.vocab_size)
        self.late_logits = late_logits
        self.vision_batches: list[int] = []
        self.llm_requests = 0

    def answer(self, model: str, inputs: dict[str, Any]) -> InferenceResponse:
        with torch.inference_mode():
            if model == "multimodal_encoders":
                return self._vision(torch.as_tensor(inputs["IMAGE"]).flatten(0, 1))  # one image per row
            return self._llm(inputs)

    def _vision(self, pixels: Any) -> InferenceResponse:
        self.vision_batches.append(len(pixels))
        config = self.model.config
        on_gpu = self.device.type == "cuda"  # fp16 as the TensorRT plan; a CPU run (a dry run) keeps the model's dtype
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=on_gpu):
            out = self.model.model.get_image_features(
                pixel_values=torch.as_tensor(pixels).to(self.device, self.model.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        features = torch.stack(list(out.pooler_output)).to(torch.float16)
        vocab = np.full((len(features), 1), features.shape[1], np.int32)
        # The table stays on the GPU, as the engine's output does.
        return InferenceResponse(
            [Tensor("OUT_PROMPT_EMBEDDING_TABLE", features), Tensor("OUT_PROMPT_VOCAB_SIZE", vocab)]
        )

    def _llm(self, inputs: dict[str, Any]) -> InferenceResponse:
        self.llm_requests += 1
        ids = torch.as_tensor(np.asarray(inputs["input_ids"]).reshape(-1).astype(np.int64)).to(self.device)
        table = torch.as_tensor(inputs["prompt_embedding_table"]).to(self.device)[0]
        new_tokens = int(np.asarray(inputs["request_output_len"]).reshape(-1)[0])
        end_id = int(np.asarray(inputs["end_id"]).reshape(-1)[0])
        embed = self.model.get_input_embeddings()
        is_image = ids >= self.vocab
        embeds = embed(torch.where(is_image, 0, ids))
        embeds[is_image] = table[ids[is_image] - self.vocab].to(embeds.dtype)
        language, head = self.model.model.language_model, self.model.lm_head
        out = language(inputs_embeds=embeds[None], use_cache=True)
        rows, generated = [], []
        for _ in range(new_tokens + (1 if self.late_logits else 0)):
            logits = head(out.last_hidden_state[:, -1]).float()[0]
            rows.append(logits)
            token = int(logits.argmax())
            if len(generated) == new_tokens:
                break
            generated.append(token)
            if token == end_id:
                break
            step = embed(torch.tensor([[token]], device=ids.device))
            out = language(inputs_embeds=step, past_key_values=out.past_key_values, use_cache=True)
        rows = rows[1:] if self.late_logits else rows[: len(generated)]
        logits = torch.stack(rows)[None, None].cpu().numpy()
        padded = np.full((1, 1, new_tokens), end_id, dtype=np.int32)
        padded[0, 0, : len(generated)] = generated
        return InferenceResponse(
            [
                Tensor("output_ids", padded),
                Tensor("sequence_length", np.array([[len(generated)]], dtype=np.int32)),
                Tensor("generation_logits", logits),
            ]
        )


def engines_dir(engines: Engines, checkpoint: Path) -> Path:
    """What build_engines.sh would leave: llm/config.json (the vocabulary the BLS reads) and the manifest."""
    directory = Path(tempfile.mkdtemp(prefix="fakevlm-engines-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    (directory / "llm").mkdir()
    (directory / "llm" / "config.json").write_text(json.dumps({"pretrained_config": {"vocab_size": engines.vocab}}))
    write_manifest(directory, dtype=str(engines.model.dtype).removeprefix("torch."), gpu="none", tokenizer=checkpoint)
    return directory


def load_gpu_model(engines: Engines, checkpoint: Path, max_new_tokens: int, role: str = "verdict") -> Any:
    pb = pb_utils.stand_in(engines.answer, log=print)
    module = pb_utils.load_model(GPU_MODEL, pb, f"fakevlm_gpu_bls_{id(engines)}")
    model = module.TritonPythonModel()
    params = {
        "role": role,
        "tokenizer": str(checkpoint),
        "engines": str(engines_dir(engines, checkpoint)),
        "max_new_tokens": str(max_new_tokens),
        "threshold": "0.5",
    }
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    device = engines.device
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(GPU_MODEL.parent.parent),
            "model_instance_kind": "GPU" if device.type == "cuda" else "CPU",
            "model_instance_device_id": str(device.index or 0),
        }
    )
    return model


def bls_score(model: Any, crops: np.ndarray, per_request: int) -> list[dict[str, Any]]:
    """One Triton batch of requests of `per_request` uint8 crops each; rows back in order, or the error."""
    requests = [
        {"IMAGE": Tensor("IMAGE", crops[start : start + per_request])} for start in range(0, len(crops), per_request)
    ]
    rows: list[dict[str, Any]] = []
    for response in asyncio.run(model.execute(requests)):
        if response.has_error():
            rows.append({"error": response.error().message()})
            continue
        out = {name: value[:, 0] for name, value in outputs(response).items()}
        for i in range(len(out["SCORE"])):
            explanation = out["EXPLANATION"][i].decode() if "EXPLANATION" in out else None
            rows.append({"score": float(out["SCORE"][i]), "explanation": explanation})
    return rows


def _agreement(scores: np.ndarray, reference: np.ndarray, tolerance: float) -> tuple[bool, str]:
    diff = np.abs(scores - reference)
    flips = int(np.sum((scores >= 0.5) != (reference >= 0.5)))
    odds = np.abs(_log_odds(scores) - _log_odds(reference))
    detail = (
        f"max |dP(fake)| {diff.max():.5f} (tolerance {tolerance}), mean {diff.mean():.5f}, "
        f"max |d log-odds| {odds.max():.4f}, label flips {flips}"
    )
    return bool(diff.max() <= tolerance and flips == 0), detail


def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=TRAINED_CHECKPOINT)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32, help="explanation tokens compared")
    parser.add_argument("--tolerance", type=float, default=0.02, help="max |P(fake) GPU - P(fake) CPU fp32|")
    parser.add_argument("--check-images", type=int, default=16, help="images for moderation.offline.modelcheck")
    parser.add_argument("--skip-random", action="store_true", help="only the trained checkpoint (a quicker dry run)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    card = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    output = args.output or RESULTS / f"gpu_bls_check-{slug}.txt"
    lines: list[str] = []
    failures: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    def verdict(name: str, ok: bool, detail: str) -> None:
        say(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    started = time.perf_counter()
    say(f"# gpu_bls_check: {card}, torch {torch.__version__}, {args.checkpoint.name}, {args.dtype} on the GPU")
    say("# no tritonserver / TensorRT-LLM here: the GPU model's code runs against PyTorch stand-ins (see docstring)")
    batch = list(samples(args.images, SEED))
    pixels = np.stack([crop(s.image) for s in batch])
    truth = [s.label for s in batch]

    def compare(checkpoint: Path, name: str) -> FakeVLM:
        """Checks 1 and 2 on one checkpoint; returns its GPU model."""
        cpu = FakeVLM.load(checkpoint, device="cpu", dtype=torch.float32)
        reference = cpu.score(pixels, [0.0] * len(pixels), max_new_tokens=args.new_tokens)
        ref = np.array([r.score for r in reference])
        accuracy = np.mean([r.label == t for r, t in zip(reference, truth, strict=True)])
        spread = f"P(fake) {ref.min():.4f}..{ref.max():.4f}"
        say(f"# {name}: CPU fp32 reference on {len(pixels)} images, {spread}, accuracy {accuracy:.3f}")
        gpu = FakeVLM.load(checkpoint, device=args.device, dtype=args.dtype)
        inproc = np.array([r.score for r in gpu.score(pixels, [float("inf")] * len(pixels))])
        verdict(f"{name}: in-process on GPU vs CPU", *_agreement(inproc, ref, args.tolerance))
        for role in ("verdict", "explain"):
            engines = Engines(gpu)
            bls = load_gpu_model(engines, checkpoint, args.new_tokens, role)
            rows = bls_score(bls, pixels, per_request=5)
            bls.finalize()
            errors = [r["error"] for r in rows if "error" in r]
            if errors:
                verdict(f"{name}: GPU BLS {role} model vs CPU", False, f"{len(errors)} requests failed: {errors[0]}")
                return gpu
            ok, detail = _agreement(np.array([r["score"] for r in rows]), ref, args.tolerance)
            one_pass = engines.vision_batches == [len(pixels)]
            requests = len(pixels) * (2 if role == "explain" else 1)  # a verdict request, then a generation
            detail += f"; vision passes {engines.vision_batches}, {engines.llm_requests} LLM requests"
            verdict(
                f"{name}: GPU BLS {role} model vs CPU", ok and one_pass and engines.llm_requests == requests, detail
            )
        same = sum(r["explanation"] == c.explanation for r, c in zip(rows, reference, strict=True))
        say(f"# {name}: explanations ({args.new_tokens} tokens, greedy) identical to the CPU's: {same}/{len(rows)}")
        say(f"#   GPU: {rows[0]['explanation'][:100]!r}")
        say(f"#   CPU: {(reference[0].explanation or '')[:100]!r}")
        return gpu

    gpu = compare(args.checkpoint, args.checkpoint.name)
    with tempfile.TemporaryDirectory() as tmp:  # untrained: P(fake) near 0.5, where precision shows
        if not args.skip_random:
            compare(build_tiny_checkpoint(Path(tmp) / "fakevlm-tiny-random"), "fakevlm-tiny-random")

    late = Engines(gpu, late_logits=True)
    stale = load_gpu_model(late, args.checkpoint, args.new_tokens)
    rows = bls_score(stale, pixels[:8], per_request=4)
    refused = [r for r in rows if "error" in r and "did not choose" in r["error"]]
    verdict(
        "late generation_logits refused",
        len(refused) == len(rows),
        f"{len(refused)}/{len(rows)} requests refused" + (f": {refused[0]['error'][:110]}" if refused else ""),
    )

    report = check(gpu, pixels[: args.check_images])
    verdict(
        "model check (verdict-first vs free answer)",
        report.agreement is not None and report.agreement >= 0.99,
        f"{report.images} images, prefix share {report.prefix_share:.3f}, agreement {report.agreement}, "
        f"disagreements {report.disagreements}, margin max {report.margin_max}",
    )
    summary = {
        "bench": "gpu_bls_check",
        "device": card,
        "checkpoint": args.checkpoint.name,
        "dtype": args.dtype,
        "images": len(pixels),
        "tolerance": args.tolerance,
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 1),
    }
    say(json.dumps(summary))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"# written to {output}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
