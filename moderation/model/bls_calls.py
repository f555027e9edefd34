"""The calls the GPU layout's BLS model (triton_models/gpu/fakevlm/1/model.py) makes, declared once.

The BLS builds every request through `request_inputs` and asks for exactly `output_names`, so what it sends
and reads is what is declared here; tests/model/test_triton_layouts.py checks each declaration against the
config.pbtxt of the model the BLS config names (names, data types, and shapes against dims and reshape).
A shape is the whole request's, batch dimension first; -1 is any size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGE_TOKENS = 576  # FakeVLM's image_seq_length: (336 / 14)^2, CLS dropped


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy's name: "float16", "int32", "uint64", "bool"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Call:
    """One model the BLS calls: the BLS config parameter that names it, what it sends and what it reads."""

    model_parameter: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def request_inputs(self, values: dict[str, Any]) -> dict[str, Any]:
        """`values` (numpy arrays, or torch tensors left on the GPU) checked against the declaration: the same
        names, each in its declared dtype and shape."""
        if set(values) != {t.name for t in self.inputs}:
            raise ValueError(
                f"{self.model_parameter}: sends {sorted(values)}, declared {[t.name for t in self.inputs]}"
            )
        for spec in self.inputs:
            value = values[spec.name]
            if str(value.dtype).removeprefix("torch.") != spec.dtype or not _fits(tuple(value.shape), spec.shape):
                raise ValueError(f"{self.model_parameter}.{spec.name}: {value.dtype} {value.shape}, declared {spec}")
        return values


def _fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape, declared, strict=True))


def _scalar(name: str, dtype: str) -> TensorSpec:
    """One value per request, as tensorrtllm_backend's template declares it: dims [1], reshape [ ]."""
    return TensorSpec(name, dtype, (1, 1))


# The vision tower + projector engine in a Python model, as tensorrtllm_backend's multimodal_encoders: every
# row of the dynamic batch in ONE request, one image per row.
ENCODER = Call(
    "encoder_model",
    inputs=(TensorSpec("IMAGE", "float16", (-1, 1, 3, 336, 336)),),
    outputs=(
        TensorSpec("OUT_PROMPT_EMBEDDING_TABLE", "float16", (-1, IMAGE_TOKENS, -1)),
        TensorSpec("OUT_PROMPT_VOCAB_SIZE", "int32", (-1, 1)),
    ),
)

# The language model on the tensorrtllm backend: one request per image (inflight fused batching).
LLM = Call(
    "llm_model",
    inputs=(
        TensorSpec("input_ids", "int32", (1, -1)),
        _scalar("input_lengths", "int32"),
        _scalar("request_output_len", "int32"),
        _scalar("end_id", "int32"),
        _scalar("pad_id", "int32"),
        _scalar("beam_width", "int32"),
        _scalar("runtime_top_k", "int32"),
        TensorSpec("prompt_embedding_table", "float16", (1, IMAGE_TOKENS, -1)),
        _scalar("prompt_vocab_size", "int32"),
        TensorSpec("prompt_table_extra_ids", "uint64", (1, -1)),
        _scalar("return_generation_logits", "bool"),
    ),
    outputs=(
        TensorSpec("output_ids", "int32", (1, 1, -1)),
        TensorSpec("sequence_length", "int32", (1, 1)),
        TensorSpec("generation_logits", "float32", (1, 1, -1, -1)),
    ),
)

CALLS = (ENCODER, LLM)
