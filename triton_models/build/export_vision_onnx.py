"""Export FakeVLM's vision tower + projector to ONNX: the input of the GPU layout's vision engine (multimodal_encoders).

The graph is what `LlavaForConditionalGeneration.get_image_features` computes for FakeVLM's config:
CLIP ViT-L/14-336, hidden states of layer `vision_feature_layer` (-2), CLS dropped ("default"
strategy), then the 2-layer gelu projector. Contract of the production layout (triton_models/gpu):

    input           [batch, 3, 336, 336]   preprocessed pixels (moderation.model.imaging), dynamic batch
    encoder_output  [batch, 576, hidden]   image features in the LLM's embedding space (hidden 4096)

ONNX opset 17, as tensorrtllm_backend's multimodal flow uses. `--verify` runs the exported file with
onnxruntime on random pixels and compares it with PyTorch (tests/model/test_onnx_export.py does this on the
tiny checkpoint). Runs on a CPU; for the production fp16 export of the real weights a GPU is faster
but not needed (`--dtype float16 --device cuda`).

    python triton_models/build/export_vision_onnx.py CHECKPOINT_DIR vision.onnx [--dtype float16] [--verify]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

INPUT, OUTPUT = "input", "encoder_output"
OPSET = 17
IMAGE_SIZE = 336
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class VisionEncoder(nn.Module):
    """pixels -> projected image features, exactly as LlavaModel.get_image_features for one feature layer."""

    def __init__(self, llava: Any) -> None:
        super().__init__()
        config = llava.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"only one vision_feature_layer is supported, got {config.vision_feature_layer}")
        self.vision_tower = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        self.feature_layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
        features = hidden[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]
        return self.projector(features)


def load_encoder(checkpoint: str | Path, *, dtype: torch.dtype, device: str) -> VisionEncoder:
    from transformers import LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=dtype)
    return VisionEncoder(llava).to(device).eval()


def export(
    checkpoint: str | Path,
    output: Path,
    *,
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
    opset: int = OPSET,
    max_batch: int = 256,
) -> Path:
    """Write the ONNX file (weights inside it: ~0.6 GB in fp16 for FakeVLM, under protobuf's 2 GB) and return it."""
    encoder = load_encoder(checkpoint, dtype=dtype, device=device)
    example = torch.zeros((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=dtype, device=device)
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        torch.onnx.export(
            encoder,
            (example,),
            str(output),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=max_batch)}},
            external_data=False,
        )
    return output


def verify(checkpoint: str | Path, onnx_path: Path, *, batches: tuple[int, ...] = (1, 3), seed: int = 0) -> float:
    """Max abs difference between onnxruntime (CPU) and PyTorch (fp32) over random pixels at each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_type = session.get_inputs()[0].type  # tensor(float) or tensor(float16)
    np_dtype = np.float16 if "float16" in input_type else np.float32
    encoder = load_encoder(checkpoint, dtype=torch.float32, device="cpu")
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in batches:
        pixels = rng.standard_normal((batch, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np_dtype)
        (ours,) = session.run([OUTPUT], {INPUT: pixels})
        with torch.inference_mode():
            reference = encoder(torch.from_numpy(pixels.astype(np.float32))).numpy()
        if ours.shape != reference.shape:
            raise AssertionError(f"onnxruntime gave {ours.shape}, PyTorch {reference.shape}")
        worst = max(worst, float(np.abs(ours.astype(np.float32) - reference).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a FakeVLM checkpoint directory (lingcco/fakeVLM, or the tiny one)")
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--max-batch", type=int, default=256, help="upper bound of the dynamic batch dimension")
    parser.add_argument("--verify", action="store_true", help="compare onnxruntime with PyTorch afterwards")
    args = parser.parse_args(argv)
    path = export(
        args.checkpoint,
        args.output,
        dtype=DTYPES[args.dtype],
        device=args.device,
        opset=args.opset,
        max_batch=args.max_batch,
    )
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opset {args.opset}, {args.dtype})")
    if args.verify:
        print(f"onnxruntime vs PyTorch: max abs diff {verify(args.checkpoint, path):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
