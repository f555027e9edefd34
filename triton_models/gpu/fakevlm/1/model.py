"""FakeVLM on GPU: a BLS (business logic scripting) Python model over two engines.

Same contract as the CPU models (triton_models/fakevlm and fakevlm_explain): IMAGE [n, 336, 336, 3] UINT8 in;
SCORE, LABEL, WEIGHTS out, and EXPLANATION, ANSWER_LABEL for the explain role; so the worker does not know
which layout serves it. The `role` parameter says which model this is: `verdict` (gpu/fakevlm) never
generates, `explain` (gpu/fakevlm_explain, the same file) explains every row; two models, so an explanation
never delays a verdict. Per dynamic batch:

1. The uint8 crops go to the GPU and are normalised there (`moderation.model.fakevlm.normalise_crops`, the
   CPU model's float32 operations), then cast to FP16.
   `multimodal_encoders` (the vision tower + projector engine in a Python model, as upstream's): all rows
   in one request, giving OUT_PROMPT_EMBEDDING_TABLE [n, 576, 4096] that stays on the GPU (DLPack).
2. `tensorrt_llm` (TensorRT-LLM, inflight fused batching), one request per image, all in flight at
   once: the prompt `<image>Does the image looks real/fake?` + `This is a`, its 576 image tokens
   replaced by the prompt-table ids vocab_size .. vocab_size + 575 (vocab_size read from the LLM engine's
   config.json, as upstream's preprocessing model reads it) and the image's features as the
   prompt_embedding_table. The verdict request generates ONE token and returns its logits:
   P(fake) = softmax(logit " fake", logit " real"), as moderation.model.fakevlm does.
3. The explain role only, every row: a second request, greedy, max_new_tokens tokens.
   KV-cache reuse serves its prefill from the verdict request's blocks: the image tokens carry
   prompt_table_extra_ids (a hash of the image), so two images never share blocks.

Every request it sends is built through `moderation.model.bls_calls` (ENCODER, LLM), where the calls are
declared once and checked against the called models' configs by the tests.

Parameters: role, tokenizer (a FakeVLM checkpoint directory: its config.json and tokenizer files are read),
engines (the build's directory: manifest.json, llm/ and vision/), encoder_model, llm_model, threshold,
max_new_tokens. The WEIGHTS identity is the engines' manifest (`moderation.model.identity`): a rebuilt engine
changes it; the tokenizer must be the one the manifest records.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from moderation.model import triton_io
from moderation.model.bls_calls import ENCODER, LLM
from moderation.model.fakevlm import build_prompt, checkpoint_relative_to, label_from_answer, normalise_crops
from moderation.model.identity import weights_identity
from moderation.model.manifest import verify_tokenizer


@dataclass(frozen=True)
class _Row:
    score: float
    label: str
    explanation: str
    answer_label: str


class PromptIds:
    """moderation.model.fakevlm's prompt for TensorRT-LLM: the image tokens become prompt-table ids."""

    def __init__(self, tokenizer: Any, config: Any, vocab_size: int) -> None:
        prompt = build_prompt(tokenizer, config)  # the same ids as the in-process model, 576 checked
        ids = np.asarray(prompt.ids, dtype=np.int32)
        self.image_positions = np.asarray(prompt.image_positions)
        self.image_tokens = len(self.image_positions)
        ids[self.image_positions] = vocab_size + np.arange(self.image_tokens)  # rows of the prompt table
        self.input_ids = ids
        self.answer = prompt.answer
        self.fake, self.real = prompt.fake, prompt.real
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)

    def extra_ids(self, image_key: int) -> np.ndarray:
        """prompt_table_extra_ids: 0 for text tokens, the image's key for its 576 tokens (KV reuse per image)."""
        extra = np.zeros(len(self.input_ids), dtype=np.uint64)
        extra[self.image_positions] = image_key
        return extra


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from transformers import AutoConfig, AutoTokenizer

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self._role = triton_io.role_of(params)
        self._device = (
            f"cuda:{args.get('model_instance_device_id', '0')}" if args.get("model_instance_kind") == "GPU" else "cpu"
        )
        self._encoder = params.get(ENCODER.model_parameter, "multimodal_encoders")
        self._llm = params.get(LLM.model_parameter, "tensorrt_llm")
        self._threshold = float(params.get("threshold", "0.5"))
        self._max_new_tokens = int(params.get("max_new_tokens", "128"))
        repository = Path(args["model_repository"])
        tokenizer_dir = checkpoint_relative_to(params.get("tokenizer", "weights"), repository)
        engines = Path(checkpoint_relative_to(params.get("engines", "/models/engines"), repository))
        self._tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir)
        model_config = AutoConfig.from_pretrained(tokenizer_dir)  # image_seq_length, image_token_id
        self._prompt = PromptIds(self._tokenizer, model_config, engine_vocab_size(engines / "llm"))
        # The answers depend on the engines and the tokenizer they were built with: the manifest names both
        # (the same identity for both roles, which call the same engines).
        verify_tokenizer(engines, Path(tokenizer_dir))
        self._weights = weights_identity(engines)
        pb_utils.Logger.log_info(
            f"fakevlm (GPU BLS, {self._role}): {len(self._prompt.input_ids)} prompt tokens, "
            f"{self._prompt.image_tokens} from the image; {self._encoder} -> {self._llm}; {self._weights}"
        )

    async def execute(self, requests: list[Any]) -> list[Any]:
        decoded = [triton_io.decode(pb_utils, request, _numpy) for request in requests]
        try:
            rows: list[_Row] | Exception = await self._score(triton_io.crops(decoded))
        except Exception as exc:  # one failed batch fails its requests, never the server
            rows = exc
        return triton_io.responses(pb_utils, decoded, rows, self._weights, self._role)

    def finalize(self) -> None:
        self._tokenizer = None

    async def _score(self, crops: np.ndarray) -> list[_Row]:
        if not len(crops):
            return []
        features = self._encode(crops)
        keys = [_image_key(row) for row in crops]
        verdicts = await asyncio.gather(*(self._generate(features, i, keys[i], 1) for i in range(len(crops))))
        scores = [self._verdict_score(response) for response in verdicts]
        wanted = list(range(len(crops))) if self._role == "explain" else []
        explained = await asyncio.gather(*(self._generate(features, i, keys[i], self._max_new_tokens) for i in wanted))
        texts = dict(zip(wanted, (self._text(response) for response in explained), strict=True))
        return [self._row(score, texts.get(i)) for i, score in enumerate(scores)]

    def _encode(self, crops: np.ndarray) -> Any:
        # Normalised on the GPU: only the uint8 crops crossed the network and the host.
        pixels = normalise_crops(crops, self._device).to(torch.float16).unsqueeze(1).contiguous()  # one image a row
        inputs = ENCODER.request_inputs({"IMAGE": pixels})
        request = pb_utils.InferenceRequest(
            model_name=self._encoder,
            requested_output_names=ENCODER.output_names,
            inputs=[_tensor(name, value) for name, value in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self._encoder}: {response.error().message()}")
        return _torch(pb_utils.get_output_tensor_by_name(response, "OUT_PROMPT_EMBEDDING_TABLE"))

    async def _generate(self, features: Any, row: int, key: int, new_tokens: int) -> Any:
        prompt = self._prompt
        ids = prompt.input_ids
        inputs: dict[str, Any] = {
            "input_ids": ids.reshape(1, -1),
            "input_lengths": np.array([[len(ids)]], dtype=np.int32),
            "request_output_len": np.array([[new_tokens]], dtype=np.int32),
            "end_id": np.array([[prompt.eos]], dtype=np.int32),
            "pad_id": np.array([[prompt.pad]], dtype=np.int32),
            "beam_width": np.array([[1]], dtype=np.int32),
            "runtime_top_k": np.array([[1]], dtype=np.int32),  # greedy, as FakeVLM's eval
            "prompt_vocab_size": np.array([[prompt.image_tokens]], dtype=np.int32),
            "prompt_table_extra_ids": prompt.extra_ids(key).reshape(1, -1),
            "return_generation_logits": np.array([[new_tokens == 1]], dtype=np.bool_),
        }
        inputs["prompt_embedding_table"] = features[row : row + 1].contiguous()  # (1, 576, hidden) fp16, on the GPU
        request = pb_utils.InferenceRequest(
            model_name=self._llm,
            requested_output_names=LLM.output_names,
            inputs=[_tensor(name, value) for name, value in LLM.request_inputs(inputs).items()],
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"{self._llm}: {response.error().message()}")
        return response

    def _verdict_score(self, response: Any) -> float:
        # P(fake) must come from the logits at the LAST PROMPT POSITION (after "This is a"), the ones
        # that chose the first generated token. TensorRT-LLM returns those as generation_logits[0]
        # since NVIDIA/TensorRT-LLM#3205 (April 2025); before it, generation logits began one step
        # later (tensorrtllm_backend#530). The greedy token says which row this is: its argmax.
        logits = _numpy(pb_utils.get_output_tensor_by_name(response, "generation_logits"))
        last = logits.reshape(-1, logits.shape[-1])[0].astype(np.float64)  # beam 0, the first generated token
        chosen = int(_numpy(pb_utils.get_output_tensor_by_name(response, "output_ids")).reshape(-1)[0])
        if last[chosen] < last.max() - 1e-3 * max(1.0, abs(last.max())):
            raise RuntimeError(
                f"{self._llm}: generation_logits[0] did not choose the first generated token {chosen}: they are "
                "not the last prompt position's logits (TensorRT-LLM before #3205?); refusing to score"
            )
        pair = last[[self._prompt.fake, self._prompt.real]]
        pair = np.exp(pair - pair.max())
        return float(pair[0] / pair.sum())

    def _text(self, response: Any) -> str:
        ids = _numpy(pb_utils.get_output_tensor_by_name(response, "output_ids")).reshape(-1)
        length = int(_numpy(pb_utils.get_output_tensor_by_name(response, "sequence_length")).reshape(-1)[0])
        new_ids = [int(t) for t in ids[:length]]  # exclude_input_in_output: the generated tokens only
        if self._prompt.eos in new_ids:
            new_ids = new_ids[: new_ids.index(self._prompt.eos)]
        return str(self._tokenizer.decode(self._prompt.answer + new_ids, skip_special_tokens=True)).strip()

    def _row(self, score: float, explanation: str | None) -> _Row:
        answer = label_from_answer(explanation) if explanation is not None else None
        return _Row(
            score=score,
            label="fake" if score >= self._threshold else "real",
            explanation=explanation or "",
            answer_label=answer or "",
        )


def engine_vocab_size(engine_dir: Path) -> int:
    """The LLM engine's vocabulary (its config.json, as upstream's preprocessing model reads it): the first
    prompt-table id."""
    return int(json.loads((engine_dir / "config.json").read_text())["pretrained_config"]["vocab_size"])


def _tensor(name: str, value: Any) -> Any:
    """A request tensor: numpy as it is, torch (on the GPU) without a copy."""
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    return pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(value))


def _image_key(crop: np.ndarray) -> int:
    """A non-zero 63-bit key per distinct image: KV blocks are shared only between requests for the same image."""
    return (int.from_bytes(hashlib.blake2b(crop.tobytes(), digest_size=8).digest(), "little") >> 1) or 1


def _torch(tensor: Any) -> torch.Tensor:
    """An output tensor of another model as torch, without a copy when it lives on the GPU."""
    return torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else dlpack.from_dlpack(tensor.to_dlpack())


def _numpy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.as_numpy()) if tensor.is_cpu() else _torch(tensor).cpu().numpy()
