"""FakeVLM on GPU: a BLS (business logic scripting) Python model over two engines.

Same contract as the CPU models (triton_models/fakevlm and fakevlm_explain): IMAGE [n, 336, 336, 3] UINT8 in;
SCORE, LABEL, WEIGHTS out, and EXPLANATION, ANSWER_LABEL for the explain role; so the worker does not know
which layout serves it. The `role` parameter says which model this is: `verdict` (gpu/fakevlm) never
generates, `explain` (gpu/fakevlm_explain, the same file) explains every row; two models, so an explanation
never delays a verdict. Per dynamic batch:

1. The uint8 crops go to the GPU and are normalised there (`moderation.model.fakevlm.normalise_crops`, the
   CPU model's float32 operations), then cast to FP16.
   `vision_encoder` (TensorRT plan of the vision tower + projector): all rows at once, giving
   encoder_output [n, 576, 4096] that stays on the GPU (DLPack).
2. `tensorrt_llm` (TensorRT-LLM, inflight fused batching), one request per image, all in flight at
   once: the prompt `<image>Does the image looks real/fake?` + `This is a`, its 576 image tokens
   replaced by the prompt-table ids vocab_size .. vocab_size + 575 and the image's features as the
   prompt_embedding_table. The verdict request generates ONE token and returns its logits:
   P(fake) = softmax(logit " fake", logit " real"), as moderation.model.fakevlm does.
3. The explain role only, every row: a second request, greedy, max_new_tokens tokens.
   KV-cache reuse serves its prefill from the verdict request's blocks: the image tokens carry
   prompt_table_extra_ids (a hash of the image), so two images never share blocks.

Parameters: role, tokenizer (a FakeVLM checkpoint directory: its config.json and tokenizer files are read),
vocab_size (the LLM's, 32064), vision_model, llm_model, threshold, max_new_tokens.
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
from moderation.model.fakevlm import build_prompt, checkpoint_relative_to, label_from_answer, normalise_crops
from moderation.model.identity import combined_identity


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
        self._vision = params.get("vision_model", "vision_encoder")
        self._llm = params.get("llm_model", "tensorrt_llm")
        self._threshold = float(params.get("threshold", "0.5"))
        self._max_new_tokens = int(params.get("max_new_tokens", "128"))
        tokenizer_dir = checkpoint_relative_to(params.get("tokenizer", "weights"), Path(args["model_repository"]))
        self._tokenizer: Any = AutoTokenizer.from_pretrained(tokenizer_dir)
        model_config = AutoConfig.from_pretrained(tokenizer_dir)  # image_seq_length, image_token_id
        self._prompt = PromptIds(self._tokenizer, model_config, int(params.get("vocab_size", "32064")))
        # The answers depend on the tokenizer and on both engines: all three make the weights' identity (the
        # same for both roles, which call the same engines).
        repository = Path(args["model_repository"]).parent
        self._weights = combined_identity(
            [tokenizer_dir, repository / self._vision / "1", repository / self._llm / "1"]
        )
        pb_utils.Logger.log_info(
            f"fakevlm (GPU BLS, {self._role}): {len(self._prompt.input_ids)} prompt tokens, "
            f"{self._prompt.image_tokens} from the image; {self._vision} -> {self._llm}"
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
        pixels = normalise_crops(crops, self._device).to(torch.float16).contiguous()
        request = pb_utils.InferenceRequest(
            model_name=self._vision,
            requested_output_names=["encoder_output"],
            inputs=[pb_utils.Tensor.from_dlpack("input", dlpack.to_dlpack(pixels))],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self._vision}: {response.error().message()}")
        return _torch(pb_utils.get_output_tensor_by_name(response, "encoder_output"))

    async def _generate(self, features: Any, row: int, key: int, new_tokens: int) -> Any:
        prompt = self._prompt
        ids = prompt.input_ids
        inputs = {
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
        tensors = [pb_utils.Tensor(name, value) for name, value in inputs.items()]
        table = features[row : row + 1].contiguous()  # (1, 576, hidden) fp16, on the GPU
        tensors.append(pb_utils.Tensor.from_dlpack("prompt_embedding_table", dlpack.to_dlpack(table)))
        request = pb_utils.InferenceRequest(
            model_name=self._llm,
            requested_output_names=["output_ids", "sequence_length", "generation_logits"],
            inputs=tensors,
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


def _image_key(crop: np.ndarray) -> int:
    """A non-zero 63-bit key per distinct image: KV blocks are shared only between requests for the same image."""
    return (int.from_bytes(hashlib.blake2b(crop.tobytes(), digest_size=8).digest(), "little") >> 1) or 1


def _torch(tensor: Any) -> torch.Tensor:
    """An output tensor of another model as torch, without a copy when it lives on the GPU."""
    return torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else dlpack.from_dlpack(tensor.to_dlpack())


def _numpy(tensor: Any) -> np.ndarray:
    return np.asarray(tensor.as_numpy()) if tensor.is_cpu() else _torch(tensor).cpu().numpy()
