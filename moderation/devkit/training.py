"""Train the tiny FakeVLM on synthetic images with known answers, on a CPU, in minutes, deterministically.

The model starts as `build_tiny_checkpoint` (FakeVLM's architecture at tiny widths) and learns, by
teacher forcing, to answer FakeVLM's raw prompt about `moderation.devkit.synthetic` images exactly as
FakeVLM answers: `This is a fake image. <which artifact, where>` or `This is a real image. <why>`,
then EOS. The input layout is the one `FakeVLM.score` feeds: the processor's prompt ids (`<image>`
expanded to 576 tokens) followed by the answer, so the verdict it learns is the very next-token
choice between ` fake` and ` real` that scoring reads after `This is a`.

Recipe (the two choices that make *where* learnable in minutes): the vision tower's position
embeddings start as a 2D sine-cosine table instead of CLIP's near-zero init, and the patch embedding
learns at a tenth of the rate, so it does not outgrow the position signal under the pre-LayerNorm.
AdamW, warm-up then cosine decay, batches of 8 fresh images (half fake), the verdict token weighted.

The result is small enough to commit (`models/fakevlm-tiny-trained`): tests and `moderation demo`
load it with `FakeVLM.load` and get verdicts and explanations that are right about the images.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderation.devkit.synthetic import Sample, make_sample
from moderation.devkit.tinymodel import build_tiny_checkpoint
from moderation.errors import ModelError
from moderation.model.fakevlm import ANSWER_PREFIX, FakeVLM
from moderation.model.imaging import crop, preprocess

TRAINED_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "fakevlm-tiny-trained"
METRICS_FILE = "training-metrics.json"  # written last: its presence means the checkpoint is complete
DEFAULT_STEPS = 500
BATCH_SIZE = 8
HELD_OUT_IMAGES = 256
HELD_OUT_STREAM = 1_000_003  # held-out images come from seed + this, never from the training stream
LEARNING_RATE = 3e-3
WARMUP_STEPS = 20
VERDICT_WEIGHT = 8.0  # the verdict token counts this many answer tokens in the loss
THREADS = 2
PATCH_LR_FACTOR = 0.1  # Adam grows scale-invariant weights; slower, they leave room for positions
POSITION_SCALE = 0.6  # sin-cos position table: per-patch norm ~2.4, like the patch embeddings'
_VERDICT_POSITION = len(ANSWER_PREFIX.split())  # "This is a" then the verdict token " fake" / " real"


@dataclass(frozen=True)
class TrainProgress:
    phase: str  # "train" | "evaluate"
    done: int
    total: int
    loss: float | None = None  # weighted loss over the answer tokens
    verdict_loss: float | None = None  # cross-entropy of the " fake" / " real" token alone


@dataclass(frozen=True)
class HeldOutMetrics:
    images: int
    accuracy: float  # verdict-first label vs the truth
    agreement: float  # verdict-first label vs label_from_answer(generated explanation), FakeVLM's rule
    exact_answers: float  # generated explanation == the reference answer, word for word
    fakes_located: float  # of the fakes: the explanation names the right artifact and region
    undecided: int  # explanations the official rule could not read a label from


def train_tiny_fakevlm(
    out_dir: Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = BATCH_SIZE,
    held_out: int = HELD_OUT_IMAGES,
    progress: Callable[[TrainProgress], None] | None = None,
) -> Path:
    """Train from `build_tiny_checkpoint(seed)`, evaluate on held-out images, save to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda _: None)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        with _deterministic(THREADS):
            vlm = FakeVLM.load(build_tiny_checkpoint(staging / "init", seed=seed))
            started = time.monotonic()
            losses = _train(vlm, seed=seed, steps=steps, batch_size=batch_size, report=report)
            train_seconds = time.monotonic() - started
            metrics = evaluate(vlm, held_out_samples(seed, held_out), report=report)
        final = staging / "checkpoint"
        vlm.model.save_pretrained(final)
        vlm.processor.save_pretrained(final)
        record = {
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": LEARNING_RATE,
            "train_images": steps * batch_size,
            "train_seconds": round(train_seconds, 1),
            "threads": THREADS,
            "first_loss": round(losses[0], 4),
            "last_loss": round(float(np.mean(losses[-10:])), 4),
            "held_out_stream": seed + HELD_OUT_STREAM,
            "held_out": asdict(metrics),
            "parameters": sum(p.numel() for p in vlm.model.parameters()),
        }
        (final / METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        final.chmod(0o755)  # mkdtemp made it private; a checkpoint is for every user (and Triton) to read
        for file in final.iterdir():
            file.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        final.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def trained_checkpoint() -> Path:
    """The committed trained tiny checkpoint, or a ModelError saying how to build it."""
    required = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", METRICS_FILE)
    missing = [name for name in required if not (TRAINED_CHECKPOINT / name).is_file()]
    if missing:
        raise ModelError(
            f"the trained tiny FakeVLM at {TRAINED_CHECKPOINT} is missing {', '.join(missing)}; "
            "build it with `moderation model train-tiny`"
        )
    return TRAINED_CHECKPOINT


def read_metrics(checkpoint: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((Path(checkpoint) / METRICS_FILE).read_text())
    return result


def held_out_samples(seed: int, n: int) -> list[Sample]:
    return [make_sample(seed + HELD_OUT_STREAM, i) for i in range(n)]


def evaluate(
    vlm: FakeVLM,
    held_out: Sequence[Sample],
    *,
    batch_size: int = 32,
    report: Callable[[TrainProgress], None] | None = None,
) -> HeldOutMetrics:
    """Verdict-first accuracy and its agreement with the generated answer, on `held_out`."""
    correct = agree = exact = located = undecided = 0
    for start in range(0, len(held_out), batch_size):
        chunk = held_out[start : start + batch_size]
        pixels = np.stack([crop(s.image) for s in chunk])
        for sample, result in zip(chunk, vlm.score(pixels, [0.0] * len(chunk), max_new_tokens=48), strict=True):
            correct += result.label == sample.label
            agree += result.label == result.answer_label
            exact += result.explanation == sample.answer
            located += sample.label == "fake" and _last_sentence(result.explanation) == _last_sentence(sample.answer)
            undecided += result.answer_label is None
        if report is not None:
            report(TrainProgress("evaluate", start + len(chunk), len(held_out)))
    n, fakes = max(1, len(held_out)), max(1, sum(s.label == "fake" for s in held_out))
    return HeldOutMetrics(len(held_out), correct / n, agree / n, exact / n, located / fakes, undecided)


def _last_sentence(text: str | None) -> str:
    return (text or "").rstrip(".").rsplit(". ", 1)[-1]


def _train(
    vlm: FakeVLM, *, seed: int, steps: int, batch_size: int, report: Callable[[TrainProgress], None]
) -> list[float]:
    torch.manual_seed(seed)
    model = vlm.model.train()
    _init_positions(model)
    prefix = prompt_ids(vlm)
    patch = model.model.vision_tower.embeddings.patch_embedding.weight
    others = [p for p in model.parameters() if p is not patch]
    groups: list[dict[str, Any]] = [
        {"params": others},
        {"params": [patch], "lr": LEARNING_RATE * PATCH_LR_FACTOR},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    losses: list[float] = []
    for step, batch in enumerate(_prefetched(seed, steps, batch_size)):
        answers = [[*_answer_ids(vlm, s.answer), vlm.tokenizer.eos_token_id] for s in batch]
        input_ids, targets, weights = _layout(prefix, answers, vlm.tokenizer.pad_token_id)
        pixels = torch.from_numpy(np.stack([preprocess(s.image) for s in batch]))
        keep = targets.shape[1] + 1  # logits of the last prompt token and of every answer token
        # Right padding needs no attention mask: causal attention never lets a real token see the pads
        # after it, and pads carry no loss. Without a mask, attention takes its fast causal path.
        logits = model(input_ids=input_ids, pixel_values=pixels, logits_to_keep=keep).logits[:, :-1]
        per_token = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
        ).reshape(targets.shape)
        loss = (per_token * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        verdict_loss = float(per_token.detach()[:, _VERDICT_POSITION].mean())
        report(TrainProgress("train", step + 1, steps, losses[-1], verdict_loss))
    model.eval()
    return losses


def _init_positions(model: Any) -> None:
    """Start the vision tower's position embeddings as a 2D sine-cosine table (as MAE does).

    CLIP's random init makes them ~20x smaller than the patch embeddings, so the language model would
    first have to discover *where* a patch is before it could say where an artifact lies. Here each
    patch starts with its row and column encoded at periods from 48 patches (twice the grid: its sign
    says upper or lower half, left or right) down to 2, at the patch embeddings' scale; all of it
    stays trainable.
    """
    embedding = model.model.vision_tower.embeddings.position_embedding.weight
    width = embedding.shape[1]
    side = math.isqrt(embedding.shape[0] - 1)  # 24 patches a side; row 0 of the table is CLS
    frequencies = width // 4
    periods = 2.0 * side * side ** (-torch.arange(frequencies, dtype=torch.float32) / (frequencies - 1))
    omega = 2 * math.pi / periods
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")
    table = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        phase = coordinate[:, None] * omega[None, :]
        table += [torch.sin(phase), torch.cos(phase)]
    with torch.no_grad():
        embedding[0] = 0.0
        embedding[1:] = POSITION_SCALE * torch.cat(table, dim=1)


def _prefetched(seed: int, steps: int, batch_size: int) -> Iterator[list[Sample]]:
    """The training stream, batch by batch; the next batch is drawn in a thread during this step.

    Each sample is a pure function of (seed, index), so drawing ahead changes nothing but the time.
    """

    def draw(step: int) -> list[Sample]:
        return [make_sample(seed, step * batch_size + i) for i in range(batch_size)]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthetic") as pool:
        pending = pool.submit(draw, 0)
        for step in range(steps):
            batch = pending.result()
            if step + 1 < steps:
                pending = pool.submit(draw, step + 1)
            yield batch


def prompt_ids(vlm: FakeVLM) -> torch.Tensor:
    """FakeVLM's raw prompt from the one prompt builder: BOS, the `<image>` run, the question (no answer prefix)."""
    prompt = vlm.prompt
    return torch.tensor(prompt.ids[: len(prompt.ids) - len(prompt.answer)])


def _answer_ids(vlm: FakeVLM, text: str) -> list[int]:
    """The answer as the model generates it after the prompt: starting with the scoring prefix's ids."""
    ids: list[int] = vlm.tokenizer.encode(text, add_special_tokens=False)
    start = vlm.tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    if ids[: len(start)] != start:
        raise ModelError(f"the answer {text!r} does not start with the tokens of {ANSWER_PREFIX!r}")
    return ids


def _layout(
    prefix: torch.Tensor, answers: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + answer rows, right-padded; targets and loss weights cover only the answer tokens."""
    rows, width = len(answers), max(len(a) for a in answers)
    input_ids = torch.full((rows, prefix.shape[0] + width), pad_id, dtype=torch.long)
    targets = torch.full((rows, width), pad_id, dtype=torch.long)
    weights = torch.zeros((rows, width))
    for row, answer in enumerate(answers):
        end = prefix.shape[0] + len(answer)
        input_ids[row, : prefix.shape[0]] = prefix
        input_ids[row, prefix.shape[0] : end] = torch.tensor(answer)
        targets[row, : len(answer)] = torch.tensor(answer)
        weights[row, : len(answer)] = 1.0
        weights[row, _VERDICT_POSITION] = VERDICT_WEIGHT
    return input_ids, targets, weights


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    warmup = min(WARMUP_STEPS, max(1, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class _deterministic:
    """Seeded, single-configuration torch for the duration of a training run (restored after)."""

    def __init__(self, threads: int) -> None:
        self._threads = threads

    def __enter__(self) -> None:
        self._saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        torch.set_num_threads(self._threads)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._saved[0])
        torch.use_deterministic_algorithms(self._saved[1])
