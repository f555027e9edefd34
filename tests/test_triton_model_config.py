"""The fakevlm Triton model: its config.pbtxt as Triton parses it, and model.py's request handling."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

MODEL_DIR = Path(__file__).resolve().parents[1] / "triton_models" / "fakevlm"
CONFIG = MODEL_DIR / "config.pbtxt"
DataType = model_config_pb2.DataType


@pytest.fixture(scope="module")
def config() -> model_config_pb2.ModelConfig:
    return text_format.Parse(CONFIG.read_text(), model_config_pb2.ModelConfig())


def test_model_identity_and_batching(config: model_config_pb2.ModelConfig) -> None:
    assert config.name == "fakevlm" == MODEL_DIR.name
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    # A bounded queue: past it Triton answers UNAVAILABLE at once, which the worker retries.
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256


def test_warmup_runs_both_paths_at_one_image_and_a_full_batch(config: model_config_pb2.ModelConfig) -> None:
    inputs = {i.name: i for i in config.input}
    assert [w.batch_size for w in config.model_warmup] == [1, config.max_batch_size]
    for warmup in config.model_warmup:
        assert set(warmup.inputs) == set(inputs), warmup.name
        for name, sample in warmup.inputs.items():
            assert (sample.data_type, list(sample.dims)) == (inputs[name].data_type, list(inputs[name].dims))
            assert sample.zero_data, "zeros: a valid image, and EXPLAIN_ABOVE 0 explains every row"
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert (MODEL_DIR / "1" / "model.py").is_file()


def test_inputs(config: model_config_pb2.ModelConfig) -> None:
    inputs = {i.name: i for i in config.input}
    assert set(inputs) == {"PIXEL_VALUES", "EXPLAIN_ABOVE"}
    pixels, explain = inputs["PIXEL_VALUES"], inputs["EXPLAIN_ABOVE"]
    assert (pixels.data_type, list(pixels.dims), pixels.optional) == (
        DataType.TYPE_FP32,
        [3, 336, 336],
        False,
    )
    assert (explain.data_type, list(explain.dims), explain.optional) == (DataType.TYPE_FP32, [1], True)


def test_outputs(config: model_config_pb2.ModelConfig) -> None:
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {
        "SCORE": (DataType.TYPE_FP32, [1]),
        "LABEL": (DataType.TYPE_STRING, [1]),
        "EXPLANATION": (DataType.TYPE_STRING, [1]),
        "ANSWER_LABEL": (DataType.TYPE_STRING, [1]),
        "WEIGHTS": (DataType.TYPE_STRING, [1]),
    }


def test_parameters(config: model_config_pb2.ModelConfig) -> None:
    params = {key: value.string_value for key, value in config.parameters.items()}
    assert params == {"checkpoint": "weights", "threshold": "0.5", "max_new_tokens": "128"}
    # The local stack rewrites the checkpoint by regex over this exact layout.
    assert 'key: "checkpoint"\n  value: { string_value: "weights" }' in CONFIG.read_text()


# model.py against a stand-in for the stub's triton_python_backend_utils: enough to check that
# every request gets its own response, in order, and that errors stay with their request.


class _TritonError:
    INVALID_ARG, UNAVAILABLE = "INVALID_ARG", "UNAVAILABLE"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self.message, self.code = message, code


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: Any = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


def _fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.TritonError = _TritonError  # type: ignore[attr-defined]
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request.get(name)  # type: ignore[attr-defined]
    module.Logger = types.SimpleNamespace(log_info=lambda msg: None, log_error=lambda msg: None)  # type: ignore[attr-defined]
    return module


@pytest.fixture(scope="module")
def triton_model(tiny_checkpoint: Path) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
        spec = importlib.util.spec_from_file_location("fakevlm_triton_model", MODEL_DIR / "1" / "model.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json.dumps(
        {
            "parameters": {
                "checkpoint": {"string_value": str(tiny_checkpoint)},
                "threshold": {"string_value": "0.5"},
                "max_new_tokens": {"string_value": "8"},
            }
        }
    )
    model.initialize(
        {
            "model_config": config,
            "model_repository": str(MODEL_DIR),
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    yield model
    model.finalize()


def _request(rows: int, explain: list[float] | None = None, *, seed: int = 0) -> dict[str, _Tensor]:
    pixels = np.random.default_rng(seed).standard_normal((rows, 3, 336, 336)).astype(np.float32)
    request = {"PIXEL_VALUES": _Tensor("PIXEL_VALUES", pixels)}
    if explain is not None:
        request["EXPLAIN_ABOVE"] = _Tensor("EXPLAIN_ABOVE", np.asarray(explain, np.float32).reshape(-1, 1))
    return request


def test_execute_answers_each_request_in_order(triton_model: Any) -> None:
    nan = _request(1, seed=3)
    nan["PIXEL_VALUES"].array[0, 0, 0, 0] = math.nan
    requests = [_request(2, [0.0, math.inf], seed=1), nan, _request(1, seed=2), _request(2, [0.0], seed=4)]
    responses = triton_model.execute(requests)
    assert len(responses) == 4
    first, bad, third, mismatched = responses
    assert first.error is None and first.outputs["SCORE"].shape == (2, 1)
    explanations = first.outputs["EXPLANATION"][:, 0]
    assert explanations[0].startswith(b"This is a") and explanations[1] == b""
    assert set(first.outputs["LABEL"].ravel()) <= {b"fake", b"real"}
    assert bad.error is not None and bad.error.code == "INVALID_ARG"
    assert third.error is None and third.outputs["EXPLANATION"][0, 0] == b""  # no EXPLAIN_ABOVE: never
    assert mismatched.error is not None and "EXPLAIN_ABOVE" in mismatched.error.message
    alone = triton_model.execute([_request(1, seed=2)])[0]
    np.testing.assert_allclose(alone.outputs["SCORE"], third.outputs["SCORE"], atol=1e-4)


def test_every_answer_names_the_weights_that_gave_it(triton_model: Any) -> None:
    [response] = triton_model.execute([_request(2, seed=6)])
    assert triton_model._weights.startswith("sha256:")  # the tiny checkpoint's digest, computed at load
    assert response.outputs["WEIGHTS"][:, 0].tolist() == [triton_model._weights.encode()] * 2


def test_a_failed_forward_pass_fails_its_batch_not_the_server(triton_model: Any, monkeypatch: Any) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(triton_model._model, "score", broken)
    responses = triton_model.execute([_request(1), _request(1, seed=5)])
    assert [r.error.code for r in responses] == ["UNAVAILABLE", "UNAVAILABLE"]
