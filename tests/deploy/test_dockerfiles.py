"""docker/: the Dockerfiles agree with the manifests (users, entry points, ports, base images, what they copy)."""

from __future__ import annotations

import re

from tests.deploy.manifests import DEPLOY, ROOT, TRITON, WORKER, dockerfile, find, pod_spec, render


def test_dockerfiles_match_the_manifests() -> None:
    prod = render(DEPLOY / "overlays" / "prod")
    worker_pod, triton_pod = pod_spec(find(prod, "Deployment", WORKER)), pod_spec(find(prod, "Deployment", TRITON))
    worker, triton = dockerfile("worker"), dockerfile("triton")
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim", worker, re.MULTILINE)
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", worker, re.MULTILINE)
    assert f"USER {worker_pod['securityContext']['runAsUser']}:" in worker
    assert 'ENTRYPOINT ["moderation"]' in worker and 'CMD ["worker"]' in worker
    assert "EXPOSE 8080" in worker
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_TAG\}-pyt-python-py3$", triton, re.MULTILINE)
    tag = re.search(r"^ARG TRITON_TAG=(\d+)\.(\d+)$", triton, re.MULTILINE)
    assert tag and (int(tag[1]), int(tag[2])) >= (25, 1), "24.xx Triton images have Python 3.10"
    assert f"USER {triton_pod['securityContext']['runAsUser']}:" in triton
    assert "COPY triton_models/fakevlm /models/fakevlm" in triton
    assert "COPY triton_models/fakevlm_explain /models/fakevlm_explain" in triton
    assert "mkdir -p /models/fakevlm/weights" in triton
    assert "--model-config-name=gpu" in triton
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1 :][:4] == ["!pyproject.toml", "!README.md", "!moderation/", "!triton_models/"]
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "cannot be built on this project's development and CI machines" in readme
