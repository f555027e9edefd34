"""FakeVLM scoring: the one implementation behind every backend (Triton model, in-process, evaluation).

Verdict first: one batched forward pass over `<image>Does the image looks real/fake?` plus the forced
answer prefix `This is a` gives P(fake) from the next-token logits of ` fake` vs ` real`. Only the images
the caller asks about are then explained, by greedy generation that continues from that prefill.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from moderation.errors import ModelError
from moderation.model.imaging import CLIP_MEAN, CLIP_STD, CROP_SIZE, RESCALE_FACTOR

# Verbatim from FakeVLM's eval: raw, with no chat template (wrapping it costs accuracy).
PROMPT = "<image>Does the image looks real/fake?"
ANSWER_PREFIX = "This is a"

Label = Literal["fake", "real"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONFIG_FILES = ("config.json",)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


@dataclass(frozen=True)
class FastPath:
    """How the model runs on a GPU (the defaults are the eager path the CPU and the tests use).

    compile: torch.compile the verdict pass with static shapes (`dynamic=False`): one graph per batch bucket,
      compiled by the model's warm-up, never by a busy batch. `compile_mode` "reduce-overhead" adds CUDA graphs.
    batch_buckets: a batch is padded up to the smallest bucket that holds it (repeats of its last row, whose
      results are dropped), so a compiled pass only ever sees these shapes.
    static_cache: explanations decode with transformers' static KV cache (compiled decode step on CUDA); the
      verdict pass then keeps no cache and explained rows are prefilled again inside `generate`.
    """

    compile: bool = False
    compile_mode: str = "default"
    batch_buckets: tuple[int, ...] = ()
    static_cache: bool = False

    def bucket(self, rows: int) -> int:
        """The batch a pass of `rows` rows runs at: the smallest bucket that holds it, else `rows` itself."""
        return min((b for b in self.batch_buckets if b >= rows), default=rows)


@dataclass(frozen=True)
class Scored:
    score: float  # P(fake), 0..1
    label: str  # "fake" | "real", from score vs threshold
    explanation: str | None  # "This is a ..." when generated
    answer_label: str | None  # what the explanation itself says, by FakeVLM's eval rule


def label_from_answer(text: str) -> Label | None:
    """FakeVLM's eval.py rule: after the last '?', the first sentence decides, else the second."""
    answer = text.rsplit("?", 1)[-1].lower()
    for sentence in answer.split(".")[:2]:
        if "real" in sentence:
            return "real"
        if "fake" in sentence:
            return "fake"
    return None


class FakeVLM:
    """A loaded FakeVLM (or the tiny checkpoint of the same shape) that scores uint8 crops (`imaging.crop`)."""

    def __init__(
        self, model: LlavaForConditionalGeneration, processor: Any, *, model_id: str, fast: FastPath = FastPath()
    ) -> None:
        # Any: transformers' decorated methods (to, generate) do not type-check under mypy.
        self.model: Any = model
        self.fast = fast
        if fast.compile:
            _compile_towers(model, fast.compile_mode)
        if fast.static_cache:
            model.generation_config.cache_implementation = "static"
        self.processor = processor
        self.model_id = model_id
        self.tokenizer = processor.tokenizer
        self.prompt = build_prompt(self.tokenizer, model.config)
        self._prefix_ids = torch.tensor([self.prompt.ids], device=self.device)
        self._answer_ids = self.prompt.answer
        self._fake_id, self._real_id = self.prompt.fake, self.prompt.real
        self._eos_ids = _eos_ids(model)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | str | None = None,
        fast: FastPath = FastPath(),
    ) -> FakeVLM:
        """Load from a local directory or a hub id; dtype (or its name) defaults to bf16 on CUDA, else fp32.

        fast: compilation, batch buckets, static KV cache (worth it on a GPU; the first batch of each bucket
        pays a compilation of tens of seconds, which the Triton model's warm-up takes before ready)."""
        source = _resolve(checkpoint)
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        try:
            model: Any = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype)
            processor = AutoProcessor.from_pretrained(source)
            model.to(device).eval()
        except Exception as exc:  # OSError, ValueError, KeyError, CUDA errors... on bad files or devices
            raise ModelError(f"cannot load FakeVLM from {source!r} on {device}: {exc}") from exc
        model_id = Path(source).name if Path(source).is_dir() else source
        return cls(model, processor, model_id=model_id, fast=fast)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def score(
        self,
        crops: np.ndarray | torch.Tensor,
        explain_above: Sequence[float],
        *,
        threshold: float = 0.5,
        max_new_tokens: int = 128,
    ) -> list[Scored]:
        """Score N uint8 crops (N, 336, 336, 3); explain those with score >= explain_above[i]."""
        pixels = self.pixel_values(crops)
        if len(explain_above) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(explain_above)} explain_above values")
        if pixels.shape[0] == 0:
            return []
        with torch.inference_mode():
            # Scores never exceed 1, so a threshold above it (or inf: never explain) needs no cache.
            reuse = not (self.fast.compile or self.fast.static_cache)
            keep_cache = reuse and any(limit <= 1.0 for limit in explain_above)
            scores, next_ids, cache = self._verdict(pixels, keep_cache=keep_cache)
            wanted = [i for i, s in enumerate(scores) if s >= explain_above[i]]
            texts = self._explain(wanted, next_ids, pixels, cache, max_new_tokens) if wanted else []
        explanations: dict[int, str] = dict(zip(wanted, texts, strict=True))
        return [_scored(s, threshold, explanations.get(i)) for i, s in enumerate(scores)]

    def _verdict(self, pixels: torch.Tensor, *, keep_cache: bool) -> tuple[list[float], torch.Tensor, Any]:
        rows = pixels.shape[0]
        padded = _pad_rows(pixels, self.fast.bucket(rows))
        input_ids = self._prefix_ids.expand(padded.shape[0], -1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=padded,
            use_cache=keep_cache,
            logits_to_keep=1,  # the verdict needs only the last position, not 600 x vocab logits
        )
        last = out.logits[:rows, -1, :].float()
        pair = last[:, [self._fake_id, self._real_id]]
        scores = torch.softmax(pair, dim=-1)[:, 0].tolist()
        return scores, last.argmax(dim=-1), out.past_key_values

    def _explain(
        self, rows: list[int], next_ids: torch.Tensor, pixels: torch.Tensor, cache: Any, max_new_tokens: int
    ) -> list[str]:
        # Re-use the verdict pass's KV cache when it kept one: keep the rows to explain, append the
        # greedy token its logits already chose, and let generate() feed only that one new token on
        # top of the cache. Without one (a compiled verdict pass), generate() prefills these rows again.
        index = torch.tensor(rows, device=self.device)
        first = next_ids[index].unsqueeze(1)
        if max_new_tokens <= 1:
            return [self._decode(ids) for ids in first.tolist()]
        image_inputs: dict[str, Any] = {"pixel_values": pixels[index]}
        if cache is not None:
            cache.batch_select_indices(index)
            image_inputs = {"past_key_values": cache}
        input_ids = torch.cat([self._prefix_ids.expand(len(rows), -1), first], dim=1)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **image_inputs,
            max_new_tokens=max_new_tokens - 1,
            do_sample=False,
            pad_token_id=self._pad_id(),
        )
        new_tokens = out[:, self._prefix_ids.shape[1] :].tolist()
        return [self._decode(ids) for ids in new_tokens]

    def _decode(self, new_ids: list[int]) -> str:
        # generate() keeps emitting pad after a row's EOS (and a row whose first token was EOS keeps
        # going); cut at the first EOS. Decoding together with the answer prefix keeps the spacing
        # the tokenizer would produce for the whole answer.
        for pos, token in enumerate(new_ids):
            if token in self._eos_ids:
                new_ids = new_ids[:pos]
                break
        return self.tokenizer.decode(self._answer_ids + new_ids, skip_special_tokens=True).strip()

    def pixel_values(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 crops (N, 336, 336, 3) -> the model's pixel_values (N, 3, 336, 336) in its dtype, on its device.

        Normalised by `normalise_crops` (as `imaging.normalise` does, in float32), then cast."""
        return normalise_crops(crops, self.device).to(self.model.dtype)

    def _pad_id(self) -> int | None:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id


def _compile_towers(model: Any, mode: str) -> None:
    """torch.compile the vision tower and the language model in place, each with static shapes.

    It fuses the norms and activations that take 29% of the verdict pass's GPU time: 57.7 -> 68.7 img/s at
    batch 64 on an H200 (bench/results/gpu_verdict_profile-nvidia-h200.txt, which compiles these two modules).
    Compiling the whole LlavaForConditionalGeneration instead sends dynamo through transformers' shared
    decorator frames, which hit its recompile limit at the first batch and fall back to eager."""
    inner = model.model
    inner.vision_tower = torch.compile(inner.vision_tower, dynamic=False, mode=mode)
    inner.language_model = torch.compile(inner.language_model, dynamic=False, mode=mode)


def _pad_rows(pixels: torch.Tensor, rows: int) -> torch.Tensor:
    """`pixels` grown to `rows` rows by repeating its last one (never read back: only shapes must match).

    Contiguous either way: a compiled pass is specialised on strides too, and `normalise_crops` hands over
    channels-last strides (its HWC -> CHW permute), which torch.cat keeps, so a full bucket and a padded one
    would otherwise compile twice."""
    missing = max(rows - pixels.shape[0], 0)
    return torch.cat([pixels, pixels[-1:].expand(missing, -1, -1, -1)]).contiguous()


def normalise_crops(crops: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 crops (N, 336, 336, 3) -> float32 pixel_values (N, 3, 336, 336) on `device`, for every model that
    takes Triton's IMAGE (in-process, Triton CPU, the GPU BLS): `imaging.normalise`'s float32 operations in its
    order (x * (1/255), minus CLIP's mean, over its std), so the scores match the numpy path's. Only the uint8
    crop crosses to the device; a ValueError for anything else."""
    pixels = torch.as_tensor(crops)
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (CROP_SIZE, CROP_SIZE, 3):
        expected = f"uint8 (N, {CROP_SIZE}, {CROP_SIZE}, 3)"
        raise ValueError(f"crops must be {expected}, got {pixels.dtype} {tuple(pixels.shape)}")
    chw = pixels.to(device).permute(0, 3, 1, 2).to(torch.float32)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=chw.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=chw.device).view(1, 3, 1, 1)
    return (chw * torch.tensor(RESCALE_FACTOR, dtype=torch.float32, device=chw.device) - mean) / std


@dataclass(frozen=True)
class Prompt:
    """FakeVLM's verdict prompt as token ids: what every backend feeds the language model."""

    ids: list[int]  # BOS, the `<image>` run, the question, then the answer prefix
    answer: list[int]  # the answer prefix alone, as the model would generate it
    image_positions: list[int]  # where the image features go, in order
    fake: int  # the verdict words' single token ids after the answer prefix
    real: int


def build_prompt(tokenizer: Any, config: Any) -> Prompt:
    """The one prompt builder (in-process, Triton CPU and GPU models): `<image>` is expanded here, to the
    model's own image_seq_length, never by the processor. A processor_config.json saved by transformers
    4.45 (FakeVLM's pin) lacks num_additional_image_tokens, and transformers 5 then expands to 575, not 576.
    """
    image_id, image_tokens = int(config.image_token_id), int(config.image_seq_length)
    features = _image_features(config)
    if image_tokens != features:
        raise ModelError(
            f"config.json says image_seq_length {image_tokens}, but its vision tower gives {features} "
            "image features per image: the checkpoint's config is inconsistent"
        )
    tokenizer_image_id = tokenizer.convert_tokens_to_ids("<image>")
    if tokenizer_image_id != image_id:
        raise ModelError(f"the tokenizer's <image> is id {tokenizer_image_id}, the model's image_token_id {image_id}")
    question = list(tokenizer.encode(PROMPT, add_special_tokens=True))
    if question.count(image_id) != 1:
        raise ModelError(f"the tokenizer encodes {PROMPT!r} with {question.count(image_id)} <image> tokens, not 1")
    at = question.index(image_id)
    # Encoded on its own, as the model would generate it: "▁This ▁is ▁a", not "?This".
    answer = list(tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False))
    ids = [*question[:at], *[image_id] * image_tokens, *question[at + 1 :], *answer]
    positions = list(range(at, at + image_tokens))
    return Prompt(ids, answer, positions, _verdict_token(tokenizer, "fake"), _verdict_token(tokenizer, "real"))


def _image_features(config: Any) -> int:
    """Image features the vision tower hands the language model: a patch grid, plus CLS unless dropped."""
    vision = config.vision_config
    grid = (int(vision.image_size) // int(vision.patch_size)) ** 2
    return grid + (1 if config.vision_feature_select_strategy == "full" else 0)


def _verdict_token(tokenizer: Any, word: str) -> int:
    base = tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    full = tokenizer.encode(f"{ANSWER_PREFIX} {word}", add_special_tokens=False)
    if full[: len(base)] != base or len(full) != len(base) + 1:
        raise ModelError(f"the tokenizer does not encode ' {word}' after {ANSWER_PREFIX!r} as one token")
    return int(full[-1])


def _scored(score: float, threshold: float, explanation: str | None) -> Scored:
    return Scored(
        score=score,
        label="fake" if score >= threshold else "real",
        explanation=explanation,
        answer_label=label_from_answer(explanation) if explanation is not None else None,
    )


def _eos_ids(model: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.text_config.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def checkpoint_relative_to(value: str, base: Path) -> str:
    """A checkpoint setting read from a file: absolute paths and hub ids as they are, else under `base`."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    local = base / path
    return value if _HUB_ID.match(value) and not local.exists() else str(local)


def _resolve(checkpoint: str | Path) -> str:
    """A complete local directory or a hub id; anything else is a clear ModelError, not a download."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        missing = [
            " or ".join(group)
            for group in (_CONFIG_FILES, _WEIGHT_FILES, _TOKENIZER_FILES, _PROCESSOR_FILES)
            if not any((path / name).is_file() for name in group)
        ]
        if missing:
            raise ModelError(f"incomplete FakeVLM checkpoint {path}: missing {', '.join(missing)}")
        return str(path)
    if path.exists():
        raise ModelError(f"FakeVLM checkpoint {path} is not a directory")
    if isinstance(checkpoint, str) and _HUB_ID.match(checkpoint) and not checkpoint.startswith("."):
        return checkpoint
    raise ModelError(f"FakeVLM checkpoint {checkpoint} does not exist (neither a directory nor a hub id)")
