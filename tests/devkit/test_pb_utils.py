"""The stand-in for Triton's triton_python_backend_utils that the model tests and bench/gpu_bls_check.py load
triton_models/*/1/model.py with: the real API's calls, BLS requests answered, and sys.modules left as found."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moderation.devkit import pb_utils
from moderation.devkit.pb_utils import InferenceResponse, Tensor, TritonError, outputs


def test_a_tensor_crosses_by_dlpack_both_ways() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = Tensor("X", array)
    assert tensor.name() == "X" and tensor.is_cpu() and tensor.as_numpy() is array
    moved = Tensor.from_dlpack("Y", tensor.to_dlpack())
    assert isinstance(moved.value, torch.Tensor) and moved.is_cpu()  # kept as torch, as a GPU tensor would be
    np.testing.assert_array_equal(moved.as_numpy(), array)


def test_a_response_holds_its_outputs_or_its_error() -> None:
    score = Tensor("SCORE", np.array([[0.9]], np.float32))
    ok = InferenceResponse(output_tensors=[score])
    assert not ok.has_error() and ok.error() is None
    assert pb_utils.get_output_tensor_by_name(ok, "SCORE") is score
    assert pb_utils.get_output_tensor_by_name(ok, "LABEL") is None
    np.testing.assert_allclose(outputs(ok)["SCORE"], [[0.9]])
    failed = InferenceResponse(error=TritonError("bad image", TritonError.INVALID_ARG))
    error = failed.error()
    assert failed.has_error() and error is not None
    assert (error.message(), error.code()) == ("bad image", "INVALID_ARG")
    assert TritonError("x").code() == TritonError.INTERNAL  # Triton's default code


def test_bls_calls_go_to_the_answer_with_their_inputs_by_name() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def answer(model: str, inputs: dict[str, Any]) -> InferenceResponse:
        calls.append((model, inputs))
        return InferenceResponse([Tensor("OUT", inputs["IN"] * 2)])

    pb = pb_utils.stand_in(answer)
    request = pb.InferenceRequest(model_name="engine", requested_output_names=["OUT"], inputs=[Tensor("IN", 3)])
    assert pb.get_output_tensor_by_name(request.exec(), "OUT").as_numpy() == 6
    assert asyncio.run(request.async_exec()).output_tensors()[0].as_numpy() == 6
    assert calls == [("engine", {"IN": 3})] * 2
    assert pb.get_input_tensor_by_name({"IN": request.inputs()[0]}, "IN").name() == "IN"
    with pytest.raises(RuntimeError, match="BLS call to engine"):
        pb_utils.stand_in().InferenceRequest("engine", ["OUT"], []).exec()


def test_log_lines_go_where_asked_or_nowhere(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    pb_utils.stand_in(log=lines.append).Logger.log_warn("slow engine")
    pb_utils.stand_in().Logger.log_error("silent")
    assert lines == ["slow engine"] and capsys.readouterr().out == ""


def test_a_model_loads_with_the_stand_in_and_sys_modules_stay_as_found(tmp_path: Path) -> None:
    model_py = tmp_path / "model.py"
    model_py.write_text(
        "import triton_python_backend_utils as pb_utils\n\n"
        "class TritonPythonModel:\n"
        "    def execute(self, requests):\n"
        "        return [pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, 'X')]) for r in requests]\n"
    )
    before = set(sys.modules)
    pb = pb_utils.stand_in()
    module = pb_utils.load_model(model_py, pb, "stand_in_test_model")
    assert module.pb_utils is pb and set(sys.modules) == before
    [response] = module.TritonPythonModel().execute([{"X": Tensor("X", np.ones(2))}])
    assert outputs(response)["X"].tolist() == [1.0, 1.0]
