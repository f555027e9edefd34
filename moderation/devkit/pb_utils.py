"""A stand-in for `triton_python_backend_utils` (pb_utils), the module Triton's Python backend hands a model.py,
so that triton_models/*/1/model.py runs outside Triton: in the tests on the CPU, and in bench/gpu_bls_check.py
on a GPU machine that has no tritonserver.

It has what our models use, under the real API's names: `Tensor` (`name()`, `as_numpy()`, `is_cpu()`,
`to_dlpack()`, `Tensor.from_dlpack`), `InferenceResponse` (`output_tensors()`, `has_error()`, `error()`),
`TritonError` (`message()`, `code()`), the BLS `InferenceRequest` (`exec()`, `async_exec()`),
`get_input_tensor_by_name`, `get_output_tensor_by_name` and `Logger`. A request handed to a model's `execute` is
a dict of its input tensors by name. BLS calls are answered by the `answer` given to `stand_in`: it gets the
called model's name and its inputs' values by name (numpy arrays, or torch tensors where the caller handed them
over by DLPack) and returns an InferenceResponse.

Imports numpy only, and torch where a tensor crosses by DLPack: the GPU machine's python3 runs it without the
worker's libraries.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODULE_NAME = "triton_python_backend_utils"

Answer = Callable[[str, dict[str, Any]], "InferenceResponse"]


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG = "UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG"
    UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = "UNAVAILABLE", "UNSUPPORTED", "ALREADY_EXISTS", "CANCELLED"

    def __init__(self, message: str, code: str = INTERNAL) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code})"


class Tensor:
    """A named numpy array, or a torch tensor (on any device) where it came by DLPack."""

    def __init__(self, name: str, value: Any) -> None:
        self._name, self.value = name, value

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self.value.cpu().numpy() if hasattr(self.value, "cpu") else np.asarray(self.value)

    def is_cpu(self) -> bool:
        return not getattr(self.value, "is_cuda", False)

    def to_dlpack(self) -> Any:
        import torch

        return torch.utils.dlpack.to_dlpack(torch.as_tensor(self.value))

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        import torch

        return Tensor(name, torch.utils.dlpack.from_dlpack(capsule))


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._outputs, self._error = list(output_tensors or []), error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(request: dict[str, Tensor], name: str) -> Tensor | None:
    return request.get(name)


def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
    return next((t for t in response.output_tensors() if t.name() == name), None)


def outputs(response: InferenceResponse) -> dict[str, np.ndarray]:
    """A response's outputs by name, as a Triton client receives them (not part of pb_utils)."""
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def stand_in(answer: Answer | None = None, log: Callable[[str], object] | None = None) -> types.ModuleType:
    """The stand-in module; its BLS calls go to `answer` (none allowed without it), its log lines to `log`."""

    class InferenceRequest:
        def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[Tensor]) -> None:
            self.model_name, self.requested_output_names, self._inputs = model_name, requested_output_names, inputs

        def inputs(self) -> list[Tensor]:
            return self._inputs

        def exec(self) -> InferenceResponse:
            if answer is None:
                raise RuntimeError(f"a BLS call to {self.model_name} where the stand-in answers none")
            return answer(self.model_name, {t.name(): t.value for t in self._inputs})

        async def async_exec(self) -> InferenceResponse:
            await asyncio.sleep(0)  # a real await: other requests' coroutines run meanwhile, as in Triton
            return self.exec()

    def quiet(message: str) -> None:
        pass

    logger = types.SimpleNamespace(**dict.fromkeys(("log_info", "log_warn", "log_error", "log_verbose"), log or quiet))
    module = types.ModuleType(MODULE_NAME, __doc__)
    module.__dict__.update(
        TritonError=TritonError,
        Tensor=Tensor,
        InferenceResponse=InferenceResponse,
        InferenceRequest=InferenceRequest,
        get_input_tensor_by_name=get_input_tensor_by_name,
        get_output_tensor_by_name=get_output_tensor_by_name,
        Logger=logger,
    )
    return module


def load_model(model_py: Path, pb_utils: types.ModuleType, name: str) -> types.ModuleType:
    """`model_py` imported as module `name`, with `pb_utils` as its triton_python_backend_utils. Both are in
    sys.modules only while it loads (dataclasses look their module up then)."""
    spec = importlib.util.spec_from_file_location(name, model_py)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {model_py}")
    module = importlib.util.module_from_spec(spec)
    before = {key: sys.modules.get(key) for key in (MODULE_NAME, name)}
    sys.modules.update({MODULE_NAME: pb_utils, name: module})
    try:
        spec.loader.exec_module(module)
    finally:
        for key, value in before.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return module
