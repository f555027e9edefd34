"""triton_models/build/export_vision_onnx.py: the vision tower + projector in ONNX, checked against PyTorch
with onnxruntime on the tiny checkpoint (the same graph as the real weights, smaller widths)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from transformers import LlavaConfig

from moderation.devkit.tinymodel import IMAGE_SEQ_LENGTH
from moderation.model.fakevlm import FakeVLM

onnx = pytest.importorskip("onnx", reason="needs the onnx extra (onnx, onnxruntime, onnxscript)")
ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra (onnx, onnxruntime, onnxscript)")
pytest.importorskip("onnxscript", reason="needs the onnx extra (onnx, onnxruntime, onnxscript)")

SCRIPT = Path(__file__).resolve().parents[2] / "triton_models" / "build" / "export_vision_onnx.py"


@pytest.fixture(scope="module")
def exporter() -> ModuleType:
    spec = importlib.util.spec_from_file_location("export_vision_onnx", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(exporter: ModuleType, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-out") / "vision_encoder.onnx"
    return exporter.export(tiny_checkpoint, out, dtype=torch.float32)


def _dims(value: object) -> list[object]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # type: ignore[attr-defined]


def test_the_graph_has_the_engine_contract(tiny_checkpoint: Path, exported: Path) -> None:
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "encoder_output")
    batch = _dims(inp)[0]
    assert isinstance(batch, str) and batch  # a named, dynamic batch dimension
    assert _dims(inp) == [batch, 3, 336, 336]
    hidden = LlavaConfig.from_pretrained(tiny_checkpoint).text_config.hidden_size  # 4096 for FakeVLM
    assert _dims(out) == [batch, IMAGE_SEQ_LENGTH, hidden]


def test_onnxruntime_matches_pytorch_at_several_batch_sizes(
    exporter: ModuleType, tiny_checkpoint: Path, exported: Path
) -> None:
    assert exporter.verify(tiny_checkpoint, exported, batches=(1, 3, 5)) < 1e-4


def test_the_features_are_the_ones_fakevlm_feeds_its_language_model(tiny_checkpoint: Path, exported: Path) -> None:
    vlm = FakeVLM.load(tiny_checkpoint)
    pixels = np.random.default_rng(7).standard_normal((2, 3, 336, 336)).astype(np.float32)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (ours,) = session.run(["encoder_output"], {"input": pixels})
    with torch.inference_mode():
        features = vlm.model.get_image_features(
            pixel_values=torch.from_numpy(pixels),
            vision_feature_layer=vlm.model.config.vision_feature_layer,
            vision_feature_select_strategy=vlm.model.config.vision_feature_select_strategy,
        ).pooler_output
    np.testing.assert_allclose(ours, torch.stack(list(features)).numpy(), atol=1e-4)


def test_an_fp16_export_keeps_fp16_at_its_edges(exporter: ModuleType, tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = exporter.export(tiny_checkpoint, tmp_path / "fp16.onnx", dtype=torch.float16)
    model = onnx.load(str(path))
    fp16 = onnx.TensorProto.FLOAT16
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [fp16, fp16]
    assert exporter.verify(tiny_checkpoint, path, batches=(2,)) < 5e-3
