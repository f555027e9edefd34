"""The package layout states the architecture: sub-packages by what gets deployed, the adapters every one of
them uses and the contracts at the top, and import-linter's contracts (pyproject.toml [tool.importlinter])
keeping the imports pointing down."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moderation"

# Where a new module belongs, by what it is: the message a new flat module fails with.
SUB_PACKAGES = {
    "worker": "the stream worker: Faust app assembly and transport, acks, pipeline, routing, cache, bank, metrics",
    "adapters": "what every deployable uses to reach Kafka and S3 (no Faust): options, readers, publisher, headers",
    "model": "FakeVLM: scoring, imaging, Triton I/O, detector backends (what the Triton image installs)",
    "offline": "tools run by hand or in a Job: scan, evaluate, thresholds, model checks, dead-letter replay",
    "devkit": "the local stack, demo, samples, synthetic images, tiny models, training",
    "review": "the review console: its queue reader, reviewer identity, the ASGI app and its templates",
    "cli": "the `moderation` command: its root (main.py) and one module per command group",
}
TOP_LEVEL = {
    "__init__.py": "the package",
    "__main__.py": "`python -m moderation`",
    "events.py": "contract: the messages",
    "asyncapi.py": "contract: the topics, as an AsyncAPI document",
    "errors.py": "contract: the exception root and reason codes",
    "settings.py": "contract: every setting",
    "policy.py": "contract: the per-tenant policy (file format, rules, actions)",
    "client.py": "the producer-side client library",
    "logs.py": "logging configuration shared by the command and the worker",
}


def lint_imports() -> subprocess.CompletedProcess[str]:
    # The scripts directory of the running interpreter: the venv the tests run in, activated or not.
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert command, "lint-imports not found: pip install -e '.[test]' (import-linter)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([command, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_package_has_its_sub_packages_and_the_contracts_at_the_top() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(SUB_PACKAGES), f"sub-packages are {sorted(SUB_PACKAGES)}, found {sorted(packages)}"
    modules = {p.name for p in PACKAGE.glob("*.py")}
    unplaced = sorted(modules - set(TOP_LEVEL))
    where = "\n".join(f"  moderation/{name}/: {what}" for name, what in SUB_PACKAGES.items())
    assert not unplaced, f"{unplaced} at the top of moderation/: only the contracts live there; put it in\n{where}"
    assert modules == set(TOP_LEVEL), f"missing top-level modules: {sorted(set(TOP_LEVEL) - modules)}"


def test_every_directory_of_the_package_is_a_package() -> None:
    # A folder without __init__.py is a namespace package that import-linter and setuptools both skip.
    for directory in PACKAGE.rglob("*"):
        if directory.is_dir() and directory.name != "__pycache__" and any(directory.glob("*.py")):
            assert (directory / "__init__.py").exists(), f"{directory.relative_to(ROOT)} has no __init__.py"
