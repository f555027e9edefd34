"""FakeVLM's vision engine in a Python model, as tensorrtllm_backend v0.19.0's multimodal_encoders runs LLaVA's.

NVIDIA's -trtllm-python-py3 images have no tensorrt_plan backend, so the engine (built by
triton_models/build/build_engines.sh) is run with TensorRT-LLM's runtime `Session` on GPU 0, as upstream does:
`model.engine` and `config.json` (builder_config: model_type llava, precision) in `multimodal_model_path`.
One pass per dynamic batch, every request's rows together; one response per request, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import triton_python_backend_utils as pb_utils
from tensorrt_llm._utils import torch_dtype_to_trt, trt_dtype_to_torch
from tensorrt_llm.runtime import Session, TensorInfo
from torch.utils.dlpack import from_dlpack, to_dlpack

IMAGE_TOKENS = 576


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        engine_dir = Path(config["parameters"]["multimodal_model_path"]["string_value"])
        builder = json.loads((engine_dir / "config.json").read_text())["builder_config"]
        if builder["model_type"] != "llava":
            raise RuntimeError(f"{engine_dir}: a {builder['model_type']} engine, not llava (FakeVLM's vision tower)")
        self._session = Session.from_serialized_engine((engine_dir / "model.engine").read_bytes())
        self._stream = torch.cuda.current_stream()

    def execute(self, requests: list[Any]) -> list[Any]:
        images = [from_dlpack(pb_utils.get_input_tensor_by_name(r, "IMAGE").to_dlpack()) for r in requests]
        try:
            features = self._encode(torch.cat([i.reshape(-1, 3, 336, 336).to("cuda") for i in images]))
        except Exception as exc:  # one failed pass fails its requests, never the server
            error = pb_utils.TritonError(f"multimodal_encoders: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for image in images:
            rows = features[start : start + image.shape[0]].contiguous()
            start += image.shape[0]
            vocab = torch.full((image.shape[0], 1), IMAGE_TOKENS, dtype=torch.int32).numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor.from_dlpack("OUT_PROMPT_EMBEDDING_TABLE", to_dlpack(rows)),
                        pb_utils.Tensor("OUT_PROMPT_VOCAB_SIZE", vocab),
                    ]
                )
            )
        return responses

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        inputs = {"input": pixels.half().contiguous()}
        shapes = self._session.infer_shapes([TensorInfo("input", torch_dtype_to_trt(torch.float16), pixels.shape)])
        outputs = {
            t.name: torch.empty(tuple(t.shape), dtype=trt_dtype_to_torch(t.dtype), device="cuda") for t in shapes
        }
        with torch.cuda.stream(self._stream):
            if not self._session.run(inputs, outputs, self._stream.cuda_stream):
                raise RuntimeError("the vision engine's run failed")
        self._stream.synchronize()
        return outputs["encoder_output"].half()

    def finalize(self) -> None:
        self._session = None
