"""Every Triton model configuration in triton_models/ (the CPU model the stack serves and the GPU production
layout), as Triton's own model-config protobuf parses it, and the GPU layout's BLS glue against stand-ins
for the two engines."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from moderation.devkit import localstack, pb_utils
from moderation.devkit.pb_utils import InferenceResponse, Tensor, TritonError, outputs
from moderation.devkit.tinymodel import IMAGE_SEQ_LENGTH
from moderation.model import bls_calls
from moderation.model.imaging import normalise
from moderation.model.manifest import write_manifest

ROOT = Path(__file__).resolve().parents[2] / "triton_models"
GPU = ROOT / "gpu"
# config.pbtxt of each model, and the alternatives Triton selects with --model-config-name (configs/*.pbtxt).
CONFIGS = sorted(ROOT.rglob("*.pbtxt"))
DataType = model_config_pb2.DataType
Kind = model_config_pb2.ModelInstanceGroup


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_the_repository_has_the_cpu_model_and_the_gpu_layout() -> None:
    assert {p.relative_to(ROOT).as_posix() for p in CONFIGS} >= {
        "fakevlm/config.pbtxt",
        "fakevlm_explain/config.pbtxt",
        "gpu/fakevlm/config.pbtxt",
        "gpu/fakevlm_explain/config.pbtxt",
        "gpu/multimodal_encoders/config.pbtxt",
        "gpu/tensorrt_llm/config.pbtxt",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(ROOT).as_posix() for p in CONFIGS])
def test_every_config_parses_with_tritons_model_config_protobuf(path: Path) -> None:
    config = parse(path)  # text_format raises on unknown fields, bad enums and syntax errors
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert path.name == "config.pbtxt" or path.parent.name == "configs"
    assert config.name == model_dir.name, "Triton requires the model name to match its directory"
    assert config.backend or config.platform
    assert (model_dir / "1").is_dir(), "Triton loads version 1 of each model"
    assert config.input and config.output


def _io(config: model_config_pb2.ModelConfig) -> tuple[list[Any], list[Any]]:
    def rows(tensors: Any) -> list[Any]:
        return [(t.name, t.data_type, list(t.dims), getattr(t, "optional", False)) for t in tensors]

    return rows(config.input), rows(config.output)


@pytest.mark.parametrize(("name", "role"), [("fakevlm", "verdict"), ("fakevlm_explain", "explain")])
def test_the_gpu_models_keep_the_cpu_models_contract(name: str, role: str) -> None:
    cpu, gpu = parse(ROOT / name / "config.pbtxt"), parse(GPU / name / "config.pbtxt")
    assert _io(gpu) == _io(cpu)  # the worker cannot tell which layout serves it
    assert (gpu.name, gpu.backend) == (name, "python")
    # One BLS model.py for both roles.
    assert (GPU / name / "1" / "model.py").read_text() == (GPU / "fakevlm" / "1" / "model.py").read_text()
    params = {k: v.string_value for k, v in gpu.parameters.items()}
    assert params["role"] == role
    assert params["encoder_model"] == "multimodal_encoders" and params["llm_model"] == "tensorrt_llm"
    assert "vocab_size" not in params  # read from the LLM engine's config.json, never written down
    assert params["engines"] == ENGINES
    policy = gpu.dynamic_batching.default_queue_policy
    assert policy.max_queue_size > 0
    if role == "explain":  # a request that waited too long is refused, not computed for a worker that gave up
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert 0 < policy.default_timeout_microseconds < 300 * 1_000_000


def _build_defaults() -> dict[str, int]:
    script = (ROOT / "build" / "build_engines.sh").read_text()
    return {name: int(value) for name, value in re.findall(r"^(\w+)=\$\{\1:-(\d+)\}", script, re.MULTILINE)}


ENGINES = "/models/engines"  # build_engines.sh's ENGINES: manifest.json, llm/, vision/


def test_the_vision_engine_runs_in_a_python_model_as_upstreams_multimodal_encoders() -> None:
    """NVIDIA's -trtllm-python-py3 images have no tensorrt_plan backend (tensorrtllm_backend issues 401, 471)."""
    config = parse(GPU / "multimodal_encoders" / "config.pbtxt")
    assert (config.backend, config.platform) == ("python", "")
    assert not any(parse(p).platform == "tensorrt_plan" for p in GPU.rglob("config.pbtxt"))
    assert [g.kind for g in config.instance_group] == [Kind.KIND_CPU]  # upstream's: the model places the engine
    assert config.parameters["multimodal_model_path"].string_value == f"{ENGINES}/vision"
    assert config.max_batch_size == _build_defaults()["MAX_BATCH"]  # the engine's optimisation profile
    assert config.max_batch_size >= parse(GPU / "fakevlm" / "config.pbtxt").max_batch_size
    script = (ROOT / "build" / "build_engines.sh").read_text()
    assert '--saveEngine="$ENGINES/vision/model.engine"' in script and '"model_type": "llava"' in script
    source = (GPU / "multimodal_encoders" / "1" / "model.py").read_text()
    assert "Session.from_serialized_engine" in source and '"model.engine"' in source


def test_the_llm_config_is_upstreams_template_field_by_field() -> None:
    """triton_models/gpu/tensorrt_llm/config.pbtxt is tensorrtllm_backend v0.19.0's template, every field,
    filled from tensorrt_llm.fill as its fill_template.py fills it."""
    render = subprocess.run(
        [sys.executable, str(ROOT / "build" / "render_tensorrt_llm_config.py"), "--check"], check=False
    )
    assert render.returncode == 0, "regenerate: python triton_models/build/render_tensorrt_llm_config.py"
    template = (ROOT / "build" / "upstream" / "tensorrt_llm-config.pbtxt.in").read_text()
    config = parse(GPU / "tensorrt_llm" / "config.pbtxt")
    upstream = set(re.findall(r'name: "(\w+)"', template)) - {config.name}  # every input and output
    assert {t.name for t in (*config.input, *config.output)} == upstream
    inputs = {t.name: t for t in config.input}
    assert list(inputs["request_output_len"].reshape.shape) == [] and inputs["request_output_len"].HasField("reshape")


def test_the_llm_config_matches_the_engine_build() -> None:
    config = parse(GPU / "tensorrt_llm" / "config.pbtxt")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert config.backend == "tensorrtllm"
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == f"{ENGINES}/llm"
    assert [g.kind for g in config.instance_group] == [Kind.KIND_CPU]  # the backend places the engine itself
    assert config.model_transaction_policy.decoupled is False
    inputs = {t.name: t for t in config.input}
    assert inputs["prompt_embedding_table"].data_type == DataType.TYPE_FP16
    assert {t.name: t.data_type for t in config.output}["generation_logits"] == DataType.TYPE_FP32
    defaults = _build_defaults()
    assert config.max_batch_size == defaults["MAX_BATCH"]
    script = (ROOT / "build" / "build_engines.sh").read_text()
    assert "MAX_MULTIMODAL_LEN=$((MAX_BATCH * IMAGE_TOKENS))" in script and "IMAGE_TOKENS=576" in script
    for flag in ("--max_multimodal_len", "--max_batch_size", "--max_input_len", "--gather_generation_logits"):
        assert flag in script
    assert '--output_dir "$ENGINES/llm"' in script
    assert "TRTLLM_VERSION=0.19.0" in script  # the pinned release, at or after NVIDIA/TensorRT-LLM#3205
    assert 'python3 -m moderation.model.manifest "$ENGINES" --tokenizer "$HF_MODEL"' in script
    assert params["exclude_input_in_output"] == "True"
    assert params["enable_kv_cache_reuse"] == "True" and "--use_paged_context_fmha enable" in script


_NUMPY_TO_TRITON = {
    "float16": DataType.TYPE_FP16,
    "float32": DataType.TYPE_FP32,
    "int32": DataType.TYPE_INT32,
    "uint64": DataType.TYPE_UINT64,
    "bool": DataType.TYPE_BOOL,
}


def _request_shape(tensor: Any, config: model_config_pb2.ModelConfig) -> list[int]:
    """The shape a request sends for this config tensor: the batch dimension first, then dims."""
    return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)


@pytest.mark.parametrize("bls", ["fakevlm", "fakevlm_explain"])
@pytest.mark.parametrize("call", bls_calls.CALLS, ids=lambda c: c.model_parameter)
def test_every_model_a_bls_calls_exists_with_what_it_sends_and_reads(bls: str, call: bls_calls.Call) -> None:
    target_name = parse(GPU / bls / "config.pbtxt").parameters[call.model_parameter].string_value
    target = parse(GPU / target_name / "config.pbtxt")
    assert target.name == target_name
    for sent, declared in ((call.inputs, target.input), (call.outputs, target.output)):
        tensors = {t.name: t for t in declared}
        for spec in sent:
            assert spec.name in tensors, f"{target_name} has no {spec.name}"
            tensor = tensors[spec.name]
            assert tensor.data_type == _NUMPY_TO_TRITON[spec.dtype], f"{target_name}.{spec.name}"
            shape = _request_shape(tensor, target)
            assert len(shape) == len(spec.shape) and all(
                -1 in (want, have) or want == have for want, have in zip(spec.shape, shape, strict=True)
            ), f"{target_name}.{spec.name}: sends {spec.shape}, the config takes {shape}"
    required = {t.name for t in target.input if not t.optional}
    assert required <= {t.name for t in call.inputs}, f"{target_name} needs {required}"


def test_a_bls_request_that_strays_from_its_declaration_is_refused() -> None:
    image = np.zeros((2, 1, 3, 336, 336), np.float16)
    assert bls_calls.ENCODER.request_inputs({"IMAGE": image})["IMAGE"] is image
    with pytest.raises(ValueError, match="declared"):
        bls_calls.ENCODER.request_inputs({"IMAGE": image.astype(np.float32)})
    with pytest.raises(ValueError, match="sends"):
        bls_calls.ENCODER.request_inputs({"IMAGE": image, "pixel_values": image})


def test_the_local_stack_copies_only_the_cpu_models(tmp_path: Path) -> None:
    repository = localstack.prepare_model_repository(tmp_path / "repo", tmp_path / "ckpt")
    assert sorted(p.name for p in repository.iterdir()) == ["fakevlm", "fakevlm_explain"]
    for name in ("fakevlm", "fakevlm_explain"):
        config = parse(repository / name / "config.pbtxt")
        assert config.backend == "python" and [g.kind for g in config.instance_group] == [Kind.KIND_CPU]
        # Both serve the same checkpoint.
        assert config.parameters["checkpoint"].string_value == str((tmp_path / "ckpt").resolve())


# The BLS model against the stand-in for triton_python_backend_utils (moderation.devkit.pb_utils), its BLS
# calls answered by stand-ins for the two engines.


class _Engines:
    """multimodal_encoders: features = the image's first pixel everywhere; tensorrt_llm: logit(fake) = that value."""

    def __init__(self, vocab: int, fake_id: int, real_id: int, answer: list[int], eos: int) -> None:
        self.vocab, self.fake_id, self.real_id, self.answer, self.eos = vocab, fake_id, real_id, answer, eos
        self.vision_calls: list[np.ndarray] = []
        self.llm_calls: list[dict[str, np.ndarray]] = []
        self.fail_llm = False
        self.late_logits = False  # generation_logits one step late, as TensorRT-LLM before #3205

    def answer_request(self, model: str, values: dict[str, Any]) -> InferenceResponse:
        inputs = {name: np.asarray(value) for name, value in values.items()}  # DLPack hands torch tensors over
        if model == "multimodal_encoders":
            pixels = inputs["IMAGE"]
            self.vision_calls.append(pixels)
            features = np.broadcast_to(pixels[:, 0, :1, :1, :1].reshape(-1, 1, 1), (len(pixels), IMAGE_SEQ_LENGTH, 8))
            vocab = np.full((len(pixels), 1), IMAGE_SEQ_LENGTH, np.int32)
            table = Tensor("OUT_PROMPT_EMBEDDING_TABLE", features.astype(np.float16))
            return InferenceResponse([table, Tensor("OUT_PROMPT_VOCAB_SIZE", vocab)])
        self.llm_calls.append(inputs)
        if self.fail_llm:
            return InferenceResponse(error=TritonError("engine fell over"))
        new_tokens = int(inputs["request_output_len"].reshape(-1)[0])
        logits = np.zeros((1, 1, 1, self.vocab), dtype=np.float32)
        logits[..., self.fake_id] = float(inputs["prompt_embedding_table"].reshape(-1)[0])
        first = int(logits.reshape(-1).argmax())  # greedy: the first token is the argmax of those logits
        if self.late_logits:
            logits = np.roll(logits, 1, axis=-1)  # the next step's logits: they did not choose `first`
        ids = [first, *([*self.answer, self.fake_id] * new_tokens)[: new_tokens - 2], self.eos][:new_tokens]
        return InferenceResponse(
            [
                Tensor("output_ids", np.array([[[*ids, 0, 0]]], dtype=np.int32)),
                Tensor("sequence_length", np.array([[len(ids)]], dtype=np.int32)),
                Tensor("generation_logits", logits),
            ]
        )


def engines_dir(directory: Path, tiny_checkpoint: Path, vocab: int, engine: bytes = b"llm") -> Path:
    """What build_engines.sh leaves in ENGINES, with stand-in engine files, and its manifest."""
    (directory / "llm").mkdir(parents=True, exist_ok=True)
    (directory / "vision").mkdir(exist_ok=True)
    (directory / "llm" / "config.json").write_text(json.dumps({"pretrained_config": {"vocab_size": vocab}}))
    (directory / "llm" / "rank0.engine").write_bytes(engine)
    (directory / "vision" / "model.engine").write_bytes(b"vision")
    write_manifest(directory, dtype="float16", gpu="none", tokenizer=tiny_checkpoint)
    return directory


def _load_bls(tiny_checkpoint: Path, role: str, engines: Path | None = None) -> tuple[Any, _Engines]:
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_checkpoint).tokenizer
    vocab = 2048  # past the tiny tokenizer's ids, as 32064 is for FakeVLM's
    fake_id = tokenizer.encode("This is a fake", add_special_tokens=False)[-1]
    real_id = tokenizer.encode("This is a real", add_special_tokens=False)[-1]
    answer = tokenizer.encode(" image.", add_special_tokens=False)
    built = engines or engines_dir(tiny_checkpoint.parent / "engines", tiny_checkpoint, vocab)
    stand_ins = _Engines(vocab, fake_id, real_id, answer, tokenizer.eos_token_id)
    pb = pb_utils.stand_in(stand_ins.answer_request)
    module = pb_utils.load_model(GPU / "fakevlm" / "1" / "model.py", pb, f"fakevlm_gpu_bls_{role}")
    model = module.TritonPythonModel()
    params = {
        "role": role,
        "tokenizer": str(tiny_checkpoint),
        "engines": str(built),
        "max_new_tokens": "6",
        "threshold": "0.5",
    }
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    model.initialize({"model_config": json.dumps(config), "model_repository": str(GPU / "fakevlm")})
    return model, stand_ins


@pytest.fixture(scope="module")
def bls(tiny_checkpoint: Path) -> Any:
    model, engines = _load_bls(tiny_checkpoint, "verdict")
    yield model, engines
    model.finalize()


@pytest.fixture(scope="module")
def bls_explain(tiny_checkpoint: Path) -> Any:
    model, engines = _load_bls(tiny_checkpoint, "explain")
    yield model, engines
    model.finalize()


def _request(values: list[int]) -> dict[str, Tensor]:
    """Images whose every pixel is `value`: the stand-in engines make logit(fake) their normalised red."""
    crops = np.stack([np.full((336, 336, 3), v, dtype=np.uint8) for v in values])
    return {"IMAGE": Tensor("IMAGE", crops)}


def _expected(values: list[int]) -> list[float]:
    """sigmoid(the normalised red channel): P(fake) from the stand-in engines, normalised as imaging does."""
    reds = [float(normalise(np.full((1, 1, 3), v, np.uint8))[0, 0, 0]) for v in values]
    return [1 / (1 + math.exp(-red)) for red in reds]


def test_bls_one_vision_pass_then_one_verdict_request_per_image(bls: Any) -> None:
    model, engines = bls
    engines.vision_calls.clear()
    engines.llm_calls.clear()
    as_float = {"IMAGE": Tensor("IMAGE", np.zeros((1, 336, 336, 3), np.float32))}
    requests = [_request([200, 40]), as_float, _request([150]), _request([250])]
    responses = asyncio.run(model.execute(requests))
    assert len(responses) == 4
    first, bad, third, fourth = responses
    assert bad.error().code() == "INVALID_ARG" and "UINT8" in bad.error().message()
    # ONE vision pass over the valid rows, normalised, in fp16.
    (pixels,) = engines.vision_calls
    assert pixels.shape == (4, 1, 3, 336, 336) and pixels.dtype == np.float16  # one image per row
    verdicts = [c for c in engines.llm_calls if int(c["request_output_len"].reshape(-1)[0]) == 1]
    assert len(verdicts) == len(engines.llm_calls) == 4  # the verdict model never generates
    prompt = verdicts[0]["input_ids"].reshape(-1)
    image = np.flatnonzero(prompt >= 2048)
    assert list(prompt[image]) == list(range(2048, 2048 + IMAGE_SEQ_LENGTH))  # the prompt-table ids, in order
    for call in verdicts:
        assert call["prompt_embedding_table"].shape == (1, IMAGE_SEQ_LENGTH, 8)
        assert int(call["prompt_vocab_size"].reshape(-1)[0]) == IMAGE_SEQ_LENGTH
        assert bool(call["return_generation_logits"].reshape(-1)[0])
        extra = call["prompt_table_extra_ids"].reshape(-1)
        assert (extra[image] != 0).all() and (np.delete(extra, image) == 0).all()
    keys = {int(c["prompt_table_extra_ids"].reshape(-1)[image[0]]) for c in verdicts}
    assert len(keys) == 4  # four different images, four different KV-reuse keys
    scores = [outputs(r)["SCORE"][:, 0] for r in (first, third, fourth)]
    np.testing.assert_allclose(np.concatenate(scores), _expected([200, 40, 150, 250]), rtol=1e-2)  # fp16 features
    assert [v.decode() for v in outputs(first)["LABEL"][:, 0]] == ["fake", "real"]
    assert set(outputs(first)) == {"SCORE", "LABEL", "WEIGHTS"}


def test_bls_explain_role_explains_every_row(bls_explain: Any) -> None:
    model, engines = bls_explain
    engines.llm_calls.clear()
    (response,) = asyncio.run(model.execute([_request([200, 40, 250])]))
    explanations = [v.decode() for v in outputs(response)["EXPLANATION"][:, 0]]
    generating = [c for c in engines.llm_calls if int(c["request_output_len"].reshape(-1)[0]) == 6]
    assert len(generating) == 3  # every row, whatever its score
    assert all(text.startswith("This is a") for text in explanations)
    assert [v.decode() for v in outputs(response)["ANSWER_LABEL"][:, 0]] == ["fake", "fake", "fake"]
    np.testing.assert_allclose(outputs(response)["SCORE"][:, 0], _expected([200, 40, 250]), rtol=1e-2)
    verdict_key = engines.llm_calls[0]["prompt_table_extra_ids"]
    np.testing.assert_array_equal(generating[0]["prompt_table_extra_ids"], verdict_key)  # reuse its prefill


def test_bls_a_failing_engine_fails_the_batch_not_the_server(bls: Any) -> None:
    model, engines = bls
    engines.fail_llm = True
    try:
        responses = asyncio.run(model.execute([_request([100]), _request([200])]))
    finally:
        engines.fail_llm = False
    assert [r.error().code() for r in responses] == ["UNAVAILABLE", "UNAVAILABLE"]


def test_bls_refuses_logits_that_did_not_choose_the_first_token(bls: Any) -> None:
    """P(fake) comes from the last prompt position's logits; an engine returning a later step's is refused."""
    model, engines = bls
    engines.late_logits = True
    try:
        (response,) = asyncio.run(model.execute([_request([200, 150])]))
    finally:
        engines.late_logits = False
    assert response.error().code() == "UNAVAILABLE"
    assert "not the last prompt position's logits" in response.error().message()


def test_bls_weights_are_the_engines_manifest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A rebuilt engine (another manifest) is another identity; a tokenizer the engines were not built with
    fails the load."""
    first, _ = _load_bls(tiny_checkpoint, "verdict", engines_dir(tmp_path / "a", tiny_checkpoint, 2048))
    rebuilt, _ = _load_bls(tiny_checkpoint, "verdict", engines_dir(tmp_path / "b", tiny_checkpoint, 2048, b"fp8"))
    assert first._weights.startswith("sha256:") and first._weights != rebuilt._weights
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["tokenizer"]["tokenizer.json"] = "0" * 64
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match=r"tokenizer\.json differ"):
        _load_bls(tiny_checkpoint, "verdict", tmp_path / "a")
