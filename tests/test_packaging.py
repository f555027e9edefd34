"""Slim installs, proven without building a second environment: the worker and the client import and start
with torch and transformers refused, the Triton model code imports from a copy of only moderation/model,
and the images' hashed locks (docker/requirements/) pin what pyproject.toml asks for."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKS = ROOT / "docker" / "requirements"
MODEL_EXTRA = "pip install 'moderation[model]'"


def refusing(*names: str) -> str:
    """Python source that installs a meta path finder refusing `names` and their submodules, as a slim install
    (one without them) would: `import torch` raises ModuleNotFoundError."""
    return textwrap.dedent(f"""
        import sys
        REFUSED = {names!r}
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in REFUSED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the test)", name=name)
                return None
        sys.meta_path.insert(0, Refuse())
    """)


def run_python(source: str, *, cwd: Path, pythonpath: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", source],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


# The `model` extra's packages, and boto3 and huggingface_hub, which the worker image has no need of either.
NOT_IN_A_SLIM_INSTALL = ("torch", "transformers", "tokenizers", "safetensors", "boto3")


def test_the_worker_and_the_client_import_without_torch_or_transformers(tmp_path: Path) -> None:
    source = refusing(*NOT_IN_A_SLIM_INSTALL) + textwrap.dedent("""
        import moderation.cli.main, moderation.worker.app, moderation.client
        from moderation.settings import Settings
        from moderation.worker.app import create_app
        create_app(Settings())  # the Triton detector, the exact preprocessing path: the production worker
        print("imported")
    """)
    result = run_python(source, cwd=ROOT, pythonpath=str(ROOT), MODERATION_DATA_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


# The `worker` extra's packages: the review console's image (docker/requirements/review.txt) has none of them.
WORKER_ONLY = ("faust", "mode", "uvloop")


def test_the_review_console_serves_without_faust(tmp_path: Path) -> None:
    """`moderation review serve` as the console's image runs it: Faust, mode and uvloop unimportable (the
    server's run replaced by a print: the app it is handed is built, settings, stores and routes)."""
    source = refusing(*WORKER_ONLY, *NOT_IN_A_SLIM_INSTALL) + textwrap.dedent("""
        import uvicorn
        uvicorn.run = lambda app, **options: print("serving", type(app).__name__, options["port"])
        from typer.testing import CliRunner
        from moderation.cli.main import app
        result = CliRunner().invoke(app, ["review", "serve", "--port", "8999"])
        print(result.output, result.exit_code)
        print("faust modules:", sorted(n for n in sys.modules if n.split(".")[0] in REFUSED[:3]))
    """)
    result = run_python(source, cwd=ROOT, pythonpath=str(ROOT), MODERATION_REVIEW_TOKENS="alice:0123456789abcdef0123")
    assert result.returncode == 0, result.stderr
    assert "serving Starlette 8999" in result.stdout and "faust modules: []" in result.stdout, result.stdout


@pytest.mark.parametrize("command", ["worker", "explainer"])
def test_a_stream_process_without_the_worker_extra_names_it(command: str, tmp_path: Path) -> None:
    source = refusing(*WORKER_ONLY) + f"from moderation.cli.main import main; sys.argv[1:] = [{command!r}]; main()"
    result = run_python(source, cwd=ROOT, pythonpath=str(ROOT), MODERATION_DATA_DIR=str(tmp_path))
    message = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert result.returncode == 2, message
    assert "pip install 'moderation[worker]'" in message and "Traceback" not in message, message


def test_the_review_console_lock_has_no_faust() -> None:
    pins = pinned(LOCKS / "review.txt")
    assert {"starlette", "uvicorn", "aiokafka", "aiobotocore"} <= set(pins)
    assert not {"faust-streaming", "mode-streaming", "uvloop"} & set(pins), sorted(pins)


def test_the_in_process_detector_without_the_model_extra_names_it() -> None:
    source = refusing(*NOT_IN_A_SLIM_INSTALL) + textwrap.dedent("""
        from moderation.errors import ModelError
        from moderation.settings import Settings
        from moderation.worker.clients import detector_from_settings
        try:
            detector_from_settings(Settings(detector="inprocess", checkpoint="/weights/fakevlm"))
        except ModelError as exc:
            print(exc)
    """)
    result = run_python(source, cwd=ROOT, pythonpath=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert "in-process detector" in result.stdout and MODEL_EXTRA in result.stdout, result.stdout


def test_a_worker_with_fast_preprocessing_and_no_torch_refuses_to_start(tmp_path: Path) -> None:
    source = (
        refusing(*NOT_IN_A_SLIM_INSTALL)
        + "import sys; from moderation.cli.main import main; sys.argv[1:] = ['worker']; main()"
    )
    result = run_python(
        source, cwd=ROOT, pythonpath=str(ROOT), MODERATION_DATA_DIR=str(tmp_path), MODERATION_FAST_PREPROCESS="true"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "MODERATION_FAST_PREPROCESS=true" in message and MODEL_EXTRA in message, message


def test_the_triton_model_imports_from_only_moderation_model(tmp_path: Path) -> None:
    """What docker/triton.Dockerfile copies (moderation/__init__.py, errors.py, model/) is all the Triton
    models' module-level imports need; the worker's libraries refused."""
    dockerfile = (ROOT / "docker" / "triton.Dockerfile").read_text()
    assert "COPY moderation/__init__.py moderation/errors.py /opt/moderation/moderation/" in dockerfile
    assert "COPY moderation/model /opt/moderation/moderation/model" in dockerfile
    copy = tmp_path / "moderation"
    copy.mkdir()
    for name in ("__init__.py", "errors.py"):
        shutil.copy(ROOT / "moderation" / name, copy / name)
    shutil.copytree(ROOT / "moderation" / "model", copy / "model", ignore=shutil.ignore_patterns("__pycache__"))
    imports = sorted(
        {
            name
            for model in ("fakevlm", "fakevlm_explain", "gpu/fakevlm", "gpu/fakevlm_explain")
            for name in module_imports(ROOT / "triton_models" / model)
        }
        - {"triton_python_backend_utils"}  # Triton's own, inside its Python backend only
    )
    assert {"moderation.model.fakevlm", "moderation.model.triton_model"} <= set(imports)
    source = refusing("pydantic", "pydantic_settings", "faust", "aiokafka", "aiobotocore", "tritonclient", "typer")
    source += textwrap.dedent(f"""
        import importlib
        for name in {imports!r}:
            importlib.import_module(name)
        outside = [m.__file__ for n, m in sys.modules.items() if n.startswith("moderation") and
                   getattr(m, "__file__", None) and not m.__file__.startswith({str(tmp_path)!r})]
        assert not outside, outside
        print("imported", len(sys.modules))
    """)
    # The copy first on the path, and not the repository (the test runs from the copy's parent).
    result = run_python(source, cwd=tmp_path, pythonpath=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


def module_imports(model_dir: Path) -> set[str]:
    tree = ast.parse((model_dir / "1" / "model.py").read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module != "__future__":
            names.add(node.module)
    return names


# Each lock: the extras it installs (plus the core dependencies when `core`), and what it leaves to the
# Dockerfile (torch from the CPU index) or to the base image (the NGC image's CUDA torch and numpy).
IMAGES = {
    "worker.txt": {"core": True, "extras": ("worker", "hub"), "left_out": ()},
    "worker-model.txt": {"core": True, "extras": ("worker", "hub", "model"), "left_out": ("torch",)},
    "review.txt": {"core": True, "extras": ("review",), "left_out": ()},
    "triton.txt": {"core": False, "extras": ("model",), "left_out": ("torch", "numpy")},
}


def pinned(lock: Path) -> dict[str, tuple[Version, int]]:
    """name -> (pinned version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    text = lock.read_text()
    found: dict[str, tuple[Version, int]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", block)
        if match:
            found[canonicalize_name(match[1])] = (Version(match[2]), block.count("--hash=sha256:"))
    return found


def wanted(image: dict) -> list[Requirement]:
    lines = list(PYPROJECT["project"]["dependencies"]) if image["core"] else []
    for extra in image["extras"]:
        lines += PYPROJECT["project"]["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("lock", sorted(IMAGES))
def test_the_image_locks_pin_what_pyproject_asks_for(lock: str) -> None:
    image = IMAGES[lock]
    pins = pinned(LOCKS / lock)
    assert pins, f"{lock} pins nothing"
    for name, (version, hashes) in pins.items():
        assert hashes, f"{lock}: {name}=={version} has no hash (--require-hashes would refuse it)"
    regenerate = "pyproject.toml and the lock drifted: docker/requirements/compile.sh (see docker/README.md)"
    for requirement in wanted(image):
        name = canonicalize_name(requirement.name)
        if requirement.marker and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        if name in image["left_out"]:
            assert name not in pins, f"{lock} pins {name}, which its image takes elsewhere"
            continue
        assert name in pins, f"{lock} lacks {requirement}: {regenerate}"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock}: {name}=={version} does not satisfy {requirement}: {regenerate}"
        )


def test_the_dockerfiles_install_from_the_locks() -> None:
    worker, triton = ((ROOT / "docker" / f"{name}.Dockerfile").read_text() for name in ("worker", "triton"))
    assert "ARG LOCK=worker\n" in worker
    assert 'pip install --no-deps --require-hashes -r "docker/requirements/${LOCK}.txt"' in worker
    assert "pip install --no-deps --require-hashes -r /tmp/triton.txt" in triton
    assert "COPY docker/requirements/triton.txt /tmp/triton.txt" in triton
    # LOCK=worker-model leaves torch out of its lock: the Dockerfile pins the CPU build, within the extra's range.
    match = re.search(r'"torch==([^"]+)"', worker)
    assert match, "worker.Dockerfile pins no torch for LOCK=worker-model"
    (spec,) = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["model"] if r.startswith("torch")]
    assert spec.specifier.contains(Version(match[1]).public), f"torch=={match[1]} is not {spec}"


# -- the TensorRT-LLM recipe image (docker/triton-trtllm.Dockerfile) ---------------------------------------

TRTLLM_LOCK = LOCKS / "triton-trtllm.txt"
TRTLLM_BASE = LOCKS / "base" / "tritonserver-trtllm-0.19.0.txt"
# What NVIDIA's image provides besides the listed pins: numpy and torch's own dependencies (compile.sh).
IMAGE_PROVIDES = {"numpy", "mpmath", "typing-extensions"}


def base_pins() -> dict[str, Version]:
    """name -> version of NVIDIA's image, as the committed list (with its sources) states them."""
    found = {}
    for line in TRTLLM_BASE.read_text().splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            found[canonicalize_name(requirement.name)] = Version(spec.version)
    return found


def test_the_trtllm_lock_adds_the_onnx_export_and_replaces_nothing_of_nvidias() -> None:
    pins, base = pinned(TRTLLM_LOCK), base_pins()
    assert base["tensorrt-llm"] == Version("0.19.0") and "transformers" in base and "torch" in base
    for name, (version, hashes) in pins.items():
        assert hashes, f"triton-trtllm.txt: {name}=={version} has no hash"
    # The export's own dependencies, at versions pyproject's `onnx` extra allows.
    for line in PYPROJECT["project"]["optional-dependencies"]["onnx"]:
        requirement = Requirement(line)
        if requirement.name in ("onnx", "onnxscript"):
            assert requirement.specifier.contains(pins[requirement.name][0]), f"{requirement}: {pins[requirement.name]}"
    # --no-deps installs exactly the lock: anything NVIDIA's image holds would be replaced, so none of it is there.
    assert not set(pins) & (set(base) | IMAGE_PROVIDES), "the lock replaces a package of NVIDIA's image"


def test_the_trtllm_lock_resolves_against_the_base_image_package_list(tmp_path: Path) -> None:
    """Re-resolve as compile.sh does (uv, PyPI) against the committed list of NVIDIA's pins: the same lock."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv not installed (pip install uv)")
    script = (LOCKS / "compile.sh").read_text()
    assert '--constraint "$base"' in script and "base=$out/base/tritonserver-trtllm-0.19.0.txt" in script
    provided = [a for name in sorted(set(base_pins()) | IMAGE_PROVIDES) for a in ("--no-emit-package", name)]
    (tmp_path / "numpy.txt").write_text("numpy<2\n")
    result = subprocess.run(
        [uv, "pip", "compile", "--quiet", "--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.12",
         "-", "--constraint", str(TRTLLM_BASE), "--constraint", str(tmp_path / "numpy.txt"), *provided],
        input="onnx>=1.16\nonnxscript>=0.2\n", capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if result.returncode and ("network" in result.stderr.lower() or "connect" in result.stderr.lower()):
        pytest.skip(f"PyPI unreachable: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr
    resolved = dict(re.findall(r"^([a-z0-9._-]+)==(\S+)", result.stdout, re.MULTILINE))
    assert {canonicalize_name(k): Version(v) for k, v in resolved.items()} == {
        name: version for name, (version, _) in pinned(TRTLLM_LOCK).items()
    }, "docker/requirements/compile.sh: the lock no longer resolves to itself against NVIDIA's pins"


def test_the_trtllm_dockerfile_is_pinned_checked_and_carries_the_gpu_layout() -> None:
    dockerfile = (ROOT / "docker" / "triton-trtllm.Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:25\.05-trtllm-python-py3$", dockerfile, re.MULTILINE)
    assert "t.__version__ == '0.19.0'" in dockerfile
    install = (
        "pip install --no-deps --require-hashes -r /tmp/triton-trtllm.txt && rm /tmp/triton-trtllm.txt && pip check"
    )
    assert install in dockerfile
    assert "COPY triton_models/gpu /opt/fakevlm/gpu" in dockerfile and "COPY triton_models/build" in dockerfile
    assert "pip check" in (ROOT / "docker" / "triton.Dockerfile").read_text()
