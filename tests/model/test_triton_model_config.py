"""The fakevlm Triton model: its config.pbtxt as Triton parses it, and model.py's request handling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from moderation.devkit import pb_utils
from moderation.devkit.pb_utils import Tensor, outputs

MODELS = Path(__file__).resolve().parents[2] / "triton_models"
MODEL_DIR = MODELS / "fakevlm"
EXPLAIN_DIR = MODELS / "fakevlm_explain"
CONFIG = MODEL_DIR / "config.pbtxt"
DataType = model_config_pb2.DataType
VERDICT_OUTPUTS = {"SCORE", "LABEL", "WEIGHTS"}
EXPLAIN_OUTPUTS = VERDICT_OUTPUTS | {"EXPLANATION", "ANSWER_LABEL"}


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def config() -> model_config_pb2.ModelConfig:
    return parse(CONFIG)


@pytest.fixture(scope="module")
def explain_config() -> model_config_pb2.ModelConfig:
    return parse(EXPLAIN_DIR / "config.pbtxt")


def test_model_identity_and_batching(config: model_config_pb2.ModelConfig) -> None:
    assert config.name == "fakevlm" == MODEL_DIR.name
    assert config.backend == "python"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    # A bounded queue: past it Triton answers UNAVAILABLE at once, which the worker retries.
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 256


def test_the_explain_model_has_its_own_batcher_queue_and_deadline(
    config: model_config_pb2.ModelConfig, explain_config: model_config_pb2.ModelConfig
) -> None:
    assert explain_config.name == "fakevlm_explain" == EXPLAIN_DIR.name
    assert explain_config.backend == "python"
    batching, policy = explain_config.dynamic_batching, explain_config.dynamic_batching.default_queue_policy
    assert batching.max_queue_delay_microseconds > config.dynamic_batching.max_queue_delay_microseconds
    assert policy.max_queue_size > 0
    # A request that waited too long is refused, not computed for a worker that gave up.
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert 0 < policy.default_timeout_microseconds < 300 * 1_000_000  # MODERATION_TRITON_EXPLAIN_TIMEOUT_S
    for model_dir in (MODEL_DIR, EXPLAIN_DIR):
        comments = " ".join(line.lstrip("# ") for line in (model_dir / "config.pbtxt").read_text().splitlines())
        assert "separate models so that an explanation never delays a verdict" in comments
    # One model.py for both: the role parameter says which.
    assert (EXPLAIN_DIR / "1" / "model.py").read_text() == (MODEL_DIR / "1" / "model.py").read_text()


@pytest.mark.parametrize("model_dir", [MODEL_DIR, EXPLAIN_DIR], ids=lambda d: d.name)
def test_warmup_runs_one_image_and_a_full_batch(model_dir: Path) -> None:
    config = parse(model_dir / "config.pbtxt")
    inputs = {i.name: i for i in config.input}
    assert [w.batch_size for w in config.model_warmup] == [1, config.max_batch_size]
    for warmup in config.model_warmup:
        assert set(warmup.inputs) == set(inputs), warmup.name
        for name, sample in warmup.inputs.items():
            assert (sample.data_type, list(sample.dims)) == (inputs[name].data_type, list(inputs[name].dims))
            assert sample.zero_data, "zeros: a valid (black) image"
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    assert (model_dir / "1" / "model.py").is_file()


@pytest.mark.parametrize("model_dir", [MODEL_DIR, EXPLAIN_DIR], ids=lambda d: d.name)
def test_inputs_are_the_uint8_crop(model_dir: Path) -> None:
    [image] = parse(model_dir / "config.pbtxt").input
    assert (image.name, image.data_type, list(image.dims), image.optional) == (
        "IMAGE",
        DataType.TYPE_UINT8,
        [336, 336, 3],
        False,
    )


@pytest.mark.parametrize(("model_dir", "names"), [(MODEL_DIR, VERDICT_OUTPUTS), (EXPLAIN_DIR, EXPLAIN_OUTPUTS)])
def test_outputs(model_dir: Path, names: set[str]) -> None:
    outputs = {o.name: (o.data_type, list(o.dims)) for o in parse(model_dir / "config.pbtxt").output}
    assert set(outputs) == names
    assert outputs["SCORE"] == (DataType.TYPE_FP32, [1])
    assert all(dtype == (DataType.TYPE_STRING, [1]) for name, dtype in outputs.items() if name != "SCORE")


@pytest.mark.parametrize(
    ("model_dir", "checkpoint", "role", "yielding"),
    [
        (MODEL_DIR, "weights", "verdict", {}),
        (EXPLAIN_DIR, "../fakevlm/weights", "explain", {"nice": "10", "threads": "1"}),
    ],
)
def test_parameters(model_dir: Path, checkpoint: str, role: str, yielding: dict[str, str]) -> None:
    """The explain model yields the CPU to the verdict model (nice, one torch thread): its lower priority."""
    config = parse(model_dir / "config.pbtxt")
    params = {key: value.string_value for key, value in config.parameters.items()}
    expected = {"checkpoint": checkpoint, "role": role, "threshold": "0.5", "max_new_tokens": "128"} | yielding
    assert params == expected
    # The local stack rewrites the checkpoint by regex over this exact layout.
    assert f'key: "checkpoint"\n  value: {{ string_value: "{checkpoint}" }}' in (model_dir / "config.pbtxt").read_text()


# model.py against the stand-in for the stub's triton_python_backend_utils (moderation.devkit.pb_utils): enough
# to check that every request gets its own response, in order, and that errors stay with their request.


def _load(tiny_checkpoint: Path, role: str) -> Any:
    module = pb_utils.load_model(MODEL_DIR / "1" / "model.py", pb_utils.stand_in(), "fakevlm_triton_model")
    model = module.TritonPythonModel()
    parameters = {"checkpoint": str(tiny_checkpoint), "role": role, "threshold": "0.5", "max_new_tokens": "8"}
    model.initialize(
        {
            "model_config": json.dumps({"parameters": {k: {"string_value": v} for k, v in parameters.items()}}),
            "model_repository": str(MODEL_DIR),
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    return model


@pytest.fixture(scope="module")
def triton_model(tiny_checkpoint: Path) -> Any:
    model = _load(tiny_checkpoint, "verdict")
    yield model
    model.finalize()


@pytest.fixture(scope="module")
def explain_model(tiny_checkpoint: Path) -> Any:
    model = _load(tiny_checkpoint, "explain")
    yield model
    model.finalize()


def _request(rows: int, *, seed: int = 0) -> dict[str, Tensor]:
    crops = np.random.default_rng(seed).integers(0, 256, (rows, 336, 336, 3), dtype=np.uint8)
    return {"IMAGE": Tensor("IMAGE", crops)}


def test_execute_answers_each_request_in_order(triton_model: Any) -> None:
    as_float = {"IMAGE": Tensor("IMAGE", _request(1, seed=3)["IMAGE"].as_numpy().astype(np.float32))}
    chw = {"IMAGE": Tensor("IMAGE", np.zeros((1, 3, 336, 336), np.uint8))}
    requests = [_request(2, seed=1), as_float, _request(1, seed=2), chw, {}]
    responses = triton_model.execute(requests)
    assert len(responses) == 5
    first, bad_dtype, third, bad_shape, missing = responses
    assert not first.has_error() and outputs(first)["SCORE"].shape == (2, 1)
    assert set(outputs(first)) == VERDICT_OUTPUTS  # a verdict, never an explanation
    assert set(outputs(first)["LABEL"].ravel()) <= {b"fake", b"real"}
    for bad, why in ((bad_dtype, "UINT8"), (bad_shape, "[n, 336, 336, 3]"), (missing, "missing input IMAGE")):
        error = bad.error()
        assert error is not None and error.code() == "INVALID_ARG" and why in error.message()
    assert not third.has_error()
    alone = triton_model.execute([_request(1, seed=2)])[0]
    np.testing.assert_allclose(outputs(alone)["SCORE"], outputs(third)["SCORE"], atol=1e-4)


def test_the_explain_role_explains_every_row_with_the_verdict_score(triton_model: Any, explain_model: Any) -> None:
    [verdict] = triton_model.execute([_request(2, seed=7)])
    [explained] = explain_model.execute([_request(2, seed=7)])
    assert set(outputs(explained)) == EXPLAIN_OUTPUTS
    assert all(text.startswith(b"This is a") for text in outputs(explained)["EXPLANATION"][:, 0])
    np.testing.assert_allclose(outputs(explained)["SCORE"], outputs(verdict)["SCORE"], atol=1e-5)


def test_every_answer_names_the_weights_that_gave_it(triton_model: Any, explain_model: Any) -> None:
    [response] = triton_model.execute([_request(2, seed=6)])
    assert triton_model._weights.startswith("sha256:")  # the tiny checkpoint's digest, computed at load
    assert outputs(response)["WEIGHTS"][:, 0].tolist() == [triton_model._weights.encode()] * 2
    assert explain_model._weights == triton_model._weights


def test_a_failed_forward_pass_fails_its_batch_not_the_server(triton_model: Any, monkeypatch: Any) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(triton_model._model, "score", broken)
    responses = triton_model.execute([_request(1), _request(1, seed=5)])
    assert [r.error().code() for r in responses] == ["UNAVAILABLE", "UNAVAILABLE"]


def test_an_unknown_role_fails_the_load(tiny_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="role"):
        _load(tiny_checkpoint, "both")
