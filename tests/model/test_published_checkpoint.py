"""A checkpoint as lingcco/fakeVLM publishes it (saved by transformers 4.45.2, FakeVLM's pin) loads and scores
exactly like the same weights saved today, through the in-process model and `moderation scan`; the
prompt's token ids are pinned.

The fixture is the trained tiny model rewritten into the 4.45-era file set and fields of a llava-hf
LLaVA-1.5 checkpoint: processor_config.json WITHOUT num_additional_image_tokens (and no nested image
processor), the image processor in preprocessor_config.json, tokenizer_config.json with
tokenizer_class LlamaTokenizer / legacy / added_tokens_decoder, special_tokens_map.json,
added_tokens.json, config.json and generation_config.json with torch_dtype and transformers_version
4.45.2, weights under 4.45's names (vision_tower.vision_model.*, language_model.model.*).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.devkit import localstack
from moderation.devkit.demo import settings_for
from moderation.devkit.synthetic import samples, write_images
from moderation.devkit.training import trained_checkpoint
from moderation.errors import ModelError
from moderation.model.detectors import TritonDetector
from moderation.model.fakevlm import PROMPT, FakeVLM, build_prompt
from moderation.model.imaging import CROP_SIZE, crop

_SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>"}
# Llama-2's tokenizer.json (as meta-llama and llava-hf ship it): no pre-tokenizer, a normalizer that
# prepends "▁" to every text segment, so the word after `<image>` is "▁Does", as FakeVLM was trained.
_LLAMA2_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "▁"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
    ],
}
QUESTION = ["▁the", "▁image", "▁looks", "▁real", "/", "fake", "?", "▁This", "▁is", "▁a"]


def publish_like_445(src: Path, dst: Path, *, llama2_tokenizer: bool = False) -> Path:
    """Copy checkpoint `src` into `dst` in the file layout transformers 4.45.2 saves (see the module doc)."""
    dst.mkdir(parents=True)
    weights = load_file(src / "model.safetensors")
    renamed = {
        ("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k): v
        for k, v in weights.items()
    }
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    if llama2_tokenizer:
        tokenizer["normalizer"], tokenizer["pre_tokenizer"] = _LLAMA2_NORMALIZER, None
    _write(dst / "tokenizer.json", tokenizer)
    processor = json.loads((src / "processor_config.json").read_text())
    _write(dst / "preprocessor_config.json", {**processor["image_processor"], "processor_class": "LlavaProcessor"})
    _write(
        dst / "processor_config.json",
        {"image_token": "<image>", "patch_size": 14, "processor_class": "LlavaProcessor"}
        | {"vision_feature_select_strategy": "default"},
    )
    added = {token["content"]: token["id"] for token in tokenizer["added_tokens"] if token["id"] not in _SPECIAL}
    tokens = {**_SPECIAL, **{i: t for t, i in added.items()}}
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write(
        dst / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {str(i): {"content": t, **flags, "special": True} for i, t in tokens.items()},
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 1000000000000000019884624838656,
            "pad_token": "<pad>",
            "padding_side": "left",
            "processor_class": "LlavaProcessor",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
    )
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write(dst / "special_tokens_map.json", {k: {"content": v, **flags} for k, v in names.items()})
    _write(dst / "added_tokens.json", {t: i for t, i in added.items() if t != "<pad>"} | {"<pad>": added["<pad>"]})
    config = json.loads((src / "config.json").read_text())
    for part in (config, config["text_config"], config["vision_config"]):
        part["torch_dtype"] = part.pop("dtype", "float32")
    _write(dst / "config.json", config | {"transformers_version": "4.45.2"})
    generation = json.loads((src / "generation_config.json").read_text())
    generation.pop("do_sample", None)
    _write(dst / "generation_config.json", generation | {"_from_model_config": True, "transformers_version": "4.45.2"})
    return dst


def _write(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return publish_like_445(trained_checkpoint(), tmp_path_factory.mktemp("published") / "fakeVLM")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.stack([crop(s.image) for s in samples(8, 20_251_129)])


def test_the_fixture_has_the_4_45_file_set(published: Path) -> None:
    assert sorted(p.name for p in published.iterdir()) == [
        "added_tokens.json",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert "num_additional_image_tokens" not in json.loads((published / "processor_config.json").read_text())
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(published / "model.safetensors"))


def test_its_processor_alone_would_expand_image_to_575_tokens(published: Path) -> None:
    """Why the prompt builder never lets the processor expand `<image>` (transformers 5 defaults the field to 0)."""
    processor = AutoProcessor.from_pretrained(published)
    blank = Image.new("RGB", (CROP_SIZE, CROP_SIZE))
    ids = processor(text=PROMPT, images=blank)["input_ids"][0]
    assert list(ids).count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 575


def test_it_loads_and_scores_exactly_like_the_checkpoint_saved_today(published: Path, pixels: np.ndarray) -> None:
    today, then = FakeVLM.load(trained_checkpoint()), FakeVLM.load(published)
    assert then.prompt == today.prompt
    assert then.prompt.ids.count(then.model.config.image_token_id) == 576
    state = today.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in then.model.state_dict().items())
    limits = [0.0] * len(pixels)
    expected, got = today.score(pixels, limits, max_new_tokens=16), then.score(pixels, limits, max_new_tokens=16)
    assert got == expected


def test_scan_on_the_published_layout(published: Path, tmp_path: Path) -> None:
    images = write_images(tmp_path / "images", 4, seed=7)
    out = tmp_path / "scan.jsonl"
    args = ["scan", str(images[0].parent), "--out", str(out), "--checkpoint", str(published)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and all("error" not in line and 0.0 <= line["score"] <= 1.0 for line in lines)


def test_eval_on_the_published_layout(published: Path, tmp_path: Path) -> None:
    """`moderation eval` (verdict-first and eval.py's free generation) reads the 4.45 layout as well."""
    from moderation.devkit.synthetic import write_fakeclue

    data = write_fakeclue(tmp_path / "set", 8, seed=4545)
    out = tmp_path / "report.json"
    args = ["eval", str(data), "--images", str(data.parent), "--model", str(published), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--batch-size", "8", "--max-new-tokens", "32"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 8 and report["failed"] == 0 and report["overall"]["accuracy"] >= 0.75
    assert report["free_generation"]["answered"] == 8


def test_prompt_token_ids_are_pinned(published: Path, tmp_path: Path) -> None:
    """The reference sequences: BOS, the 576-token `<image>` run, the question, "This is a"; verdict words."""
    today = FakeVLM.load(trained_checkpoint()).prompt
    image, bos = 910, 1
    assert today.ids[:577] == [bos] + [image] * 576
    assert today.ids[577:] == [294, 704, 369, 375, 395, 542, 273, 612, 289, 381, 378, 355]
    assert today.image_positions == list(range(1, 577))
    assert (today.fake, today.real, today.answer) == (386, 542, [381, 378, 355])  # ▁fake ▁real; ▁This ▁is ▁a

    # The Llama-2 tokenizer.json of the released checkpoint: "▁Does" after `<image>`, kept by transformers 5.
    llama2 = publish_like_445(trained_checkpoint(), tmp_path / "llama2", llama2_tokenizer=True)
    vlm = FakeVLM.load(llama2)
    tokens = vlm.tokenizer.convert_ids_to_tokens(vlm.prompt.ids)
    assert tokens == ["<s>"] + ["<image>"] * 576 + ["▁Does", *QUESTION]
    assert vlm.tokenizer.convert_ids_to_tokens([vlm.prompt.fake, vlm.prompt.real]) == ["▁fake", "▁real"]


def test_a_config_whose_image_run_disagrees_with_its_vision_tower_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(trained_checkpoint(), broken)
    config = json.loads((broken / "config.json").read_text())
    _write(broken / "config.json", config | {"image_seq_length": 575})
    with pytest.raises(ModelError, match=r"image_seq_length 575.*576 image features"):
        FakeVLM.load(broken)


def test_a_tokenizer_without_the_models_image_token_is_refused() -> None:
    vlm = FakeVLM.load(trained_checkpoint())
    config = vlm.model.config
    config.image_token_id, saved = 3, config.image_token_id
    try:
        with pytest.raises(ModelError, match="<image> is id 910"):
            build_prompt(vlm.tokenizer, config)
    finally:
        config.image_token_id = saved


@pytest.mark.integration
async def test_triton_cpu_serves_the_published_layout(published: Path, pixels: np.ndarray, tmp_path: Path) -> None:
    run_dir = tmp_path / "stack"
    info = localstack.up(run_dir, model_repository=localstack.prepare_model_repository(tmp_path / "repo", published))
    try:
        triton = TritonDetector(settings_for(info))
        await triton.start()
        try:
            served = await triton.detect_batch(pixels, explain_above=[2.0] * len(pixels))
        finally:
            await triton.stop()
    finally:
        localstack.down(run_dir)
    expected = FakeVLM.load(trained_checkpoint()).score(pixels, [2.0] * len(pixels))
    assert [d.score for d in served] == pytest.approx([r.score for r in expected], abs=1e-4)
    assert [d.label for d in served] == [r.label for r in expected]
