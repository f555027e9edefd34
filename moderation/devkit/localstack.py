"""The embedded local stack: Tansu (Kafka protocol), SeaweedFS (S3) and Triton, real servers from wheels.

`up` starts them on free 127.0.0.1 ports under `run_dir` and writes `stack.json` (addresses, keys,
pids, launch commands; owner-only) and `stack.env` (MODERATION_* lines). `down`, `status`,
`stop_server` and `start_server` work from `stack.json` alone, so the CLI, the demo and the test
session share a stack by its directory. `up` on a directory whose stack still runs raises
`StackError`: call `down` first, or `load` + `status` to reuse it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moderation.adapters.s3 import s3_client_args
from moderation.devkit import servers
from moderation.devkit.servers import PROJECT_ROOT, Launch, StackError
from moderation.settings import Settings

__all__ = [
    "DEFAULT_TOPICS",
    "ServerStatus",
    "StackError",
    "StackInfo",
    "create_bucket",
    "create_topics",
    "down",
    "load",
    "model_repository_for",
    "prepare_model_repository",
    "start_server",
    "status",
    "stop_server",
    "up",
]

DEFAULT_TOPICS = (
    "moderation.uploads",
    "moderation.verdicts",
    "moderation.flagged",
    "moderation.dlq",
    "moderation.review",
    "moderation.decisions",
    "moderation.verdict-cache",
    "moderation.hash-bank",
    "moderation.explain-requests",
    "moderation.explanations",
)
COMPACTED_TOPICS = (
    "moderation.verdict-cache",
    "moderation.hash-bank",
)  # keyed tables: the latest record per key is what counts
KAFKA, S3, TRITON = "kafka", "s3", "triton"
READY_TIMEOUT_S = {KAFKA: 30.0, S3: 30.0, TRITON: 300.0}
TANSU_BUCKET = "tansu"
_CHECKPOINT = re.compile(r'(key:\s*"checkpoint"\s*value:\s*\{\s*string_value:\s*)"(?:[^"\\]|\\.)*"')
Progress = Callable[[str], None]


@dataclass(frozen=True)
class StackInfo:
    run_dir: Path
    kafka_bootstrap: str  # "127.0.0.1:PORT"
    s3_endpoint: str  # "http://127.0.0.1:PORT"
    s3_region: str
    s3_access_key: str
    s3_secret_key: str = field(repr=False)
    bucket: str
    triton_url: str | None  # gRPC "127.0.0.1:PORT"; None when started with_triton=False
    triton_http_url: str | None
    triton_metrics_url: str | None
    model_name: str
    pids: dict[str, int]  # server name -> pid of its process-group leader

    def env(self) -> dict[str, str]:
        """Settings for a worker or client of this stack, with consumer-group timings that suit Tansu."""
        env = {
            "MODERATION_KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "MODERATION_KAFKA_REBALANCE_TIMEOUT_S": "5",
            "MODERATION_KAFKA_ACCEPT_REBALANCE_OVERLAP": "true",  # Tansu holds a JoinGroup for the whole timeout
            "MODERATION_KAFKA_SESSION_TIMEOUT_S": "10",
            "MODERATION_KAFKA_HEARTBEAT_INTERVAL_S": "1",
            "MODERATION_S3_ENDPOINT_URL": self.s3_endpoint,
            "MODERATION_S3_REGION": self.s3_region,
            "MODERATION_S3_ACCESS_KEY_ID": self.s3_access_key,
            "MODERATION_S3_SECRET_ACCESS_KEY": self.s3_secret_key,
            "MODERATION_S3_ALLOWED_BUCKETS": self.bucket,
            "MODERATION_TRITON_MODEL": self.model_name,
        }
        if self.triton_url:
            env["MODERATION_TRITON_URL"] = self.triton_url
        return env


@dataclass(frozen=True)
class ServerStatus:
    name: str
    pid: int | None
    alive: bool  # the process is there
    ready: bool  # it answers a real client
    address: str
    log_file: Path
    detail: str = ""  # why it is not ready


def up(
    run_dir: Path,
    *,
    model_repository: Path | None = None,
    topics: Sequence[str] = DEFAULT_TOPICS,
    partitions: int = 4,
    compacted: Collection[str] = COMPACTED_TOPICS,
    bucket: str = "uploads",
    with_triton: bool = True,
    model_name: str = "fakevlm",
    durable_kafka: bool = False,
    triton_timeout_s: float = READY_TIMEOUT_S[TRITON],
    progress: Progress | None = None,
) -> StackInfo:
    """Start the stack, wait until each server answers, create topics and bucket, write stack.json/.env.

    `model_repository` (see `prepare_model_repository`) is needed only with Triton; the real weights
    on a CPU may need more than the default `triton_timeout_s` to load. `durable_kafka`
    keeps Tansu's log in this stack's S3 (bucket "tansu") instead of memory, so a broker restart keeps
    topics, messages and committed offsets. On any failure whatever was started is stopped again and
    the `StackError` carries the log tail of the server that failed.
    """
    say = progress or (lambda _msg: None)
    run_dir = Path(run_dir).resolve()
    if with_triton and (model_repository is None or not Path(model_repository).is_dir()):
        raise StackError(f"Triton needs an existing model_repository, got {model_repository}")
    if (run_dir / "stack.json").exists():
        running = [s.name for s in status(run_dir, probe=False) if s.alive]
        if running:
            raise StackError(
                f"a stack still runs in {run_dir} ({', '.join(running)}): "
                "stop it first (down() or `moderation dev down`)"
            )
    shutil.rmtree(run_dir / "s3data", ignore_errors=True)
    (run_dir / "stack.env").unlink(missing_ok=True)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    for old in (run_dir / "logs").glob("*.log"):
        old.unlink()

    (kafka, grpc, http, metrics), pairs = servers.choose_ports(singles=4, pairs=5)
    info = StackInfo(
        run_dir=run_dir,
        kafka_bootstrap=f"127.0.0.1:{kafka}",
        s3_endpoint=f"http://127.0.0.1:{pairs[0]}",
        s3_region="us-east-1",
        s3_access_key="AK" + secrets.token_hex(9).upper(),
        s3_secret_key=secrets.token_urlsafe(30),
        bucket=bucket,
        triton_url=f"127.0.0.1:{grpc}" if with_triton else None,
        triton_http_url=f"http://127.0.0.1:{http}" if with_triton else None,
        triton_metrics_url=f"http://127.0.0.1:{metrics}/metrics" if with_triton else None,
        model_name=model_name,
        pids={},
    )
    tansu_s3 = {
        "AWS_ACCESS_KEY_ID": info.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": info.s3_secret_key,
        "AWS_DEFAULT_REGION": info.s3_region,
        "AWS_ENDPOINT": info.s3_endpoint,
        "AWS_ALLOW_HTTP": "true",
    }
    launch = {
        S3: servers.weed(run_dir, pairs, info.s3_access_key, info.s3_secret_key),
        KAFKA: servers.tansu(run_dir, info.kafka_bootstrap, tansu_s3 if durable_kafka else None, TANSU_BUCKET),
    }
    if model_repository is not None and with_triton:
        launch[TRITON] = servers.triton(run_dir, Path(model_repository).resolve(), grpc, http, metrics)
        launch[TRITON]["ready_timeout_s"] = triton_timeout_s
    _write_state(info, launch)
    try:
        if with_triton:  # the slowest to load: start it first, wait for it last
            _start(run_dir, TRITON, say)
        _start(run_dir, S3, say)
        _wait_ready(run_dir, S3, say)
        _check_s3_refuses_wrong_keys(info)
        if durable_kafka:
            create_bucket(info, TANSU_BUCKET)
        _start(run_dir, KAFKA, say)
        _wait_ready(run_dir, KAFKA, say)
        create_bucket(info, bucket)
        servers.run_sync(create_topics(info.kafka_bootstrap, topics, partitions, compacted=compacted))
        if with_triton:
            _wait_ready(run_dir, TRITON, say)
    except BaseException:
        down(run_dir)
        raise
    info = load(run_dir)
    _write_private(run_dir / "stack.env", "".join(f"{k}={shlex.quote(v)}\n" for k, v in info.env().items()))
    return info


def down(run_dir: Path) -> list[str]:
    """Stop the processes this stack started (SIGTERM, SIGKILL to the group after a grace period).
    Returns the names of those that were running; nothing to do (no stack, or stopped) is fine."""
    if not (Path(run_dir) / "stack.json").exists():
        return []
    return _stop(Path(run_dir), [TRITON, KAFKA, S3])


def status(run_dir: Path, *, probe: bool = True) -> list[ServerStatus]:
    """Per server: is its process there, does it answer (Kafka metadata, S3 list, Triton model ready)."""
    state = _read_state(Path(run_dir))
    info, result = _info(state), []
    for name, launch in state["launch"].items():
        pid = state["pids"].get(name)
        alive = pid is not None and servers.alive(pid, launch)
        why = (_probe(name, info) if probe else "not probed") if alive else "not running"
        ready = alive and why is None
        result.append(ServerStatus(name, pid, alive, ready, launch["address"], Path(launch["log"]), why or ""))
    return result


def load(run_dir: Path) -> StackInfo:
    """The StackInfo that `up` wrote to run_dir/stack.json."""
    return _info(_read_state(Path(run_dir)))


def stop_server(run_dir: Path, name: str) -> bool:
    """Stop one server (fault injection); True when it was running."""
    _launch(_read_state(Path(run_dir)), name)
    return bool(_stop(Path(run_dir), [name]))


def start_server(run_dir: Path, name: str, *, progress: Progress | None = None) -> int:
    """Start one stopped server again on the same ports, keys and data; wait until ready; return its pid."""
    run_dir = Path(run_dir).resolve()
    state = _read_state(run_dir)
    pid = state["pids"].get(name)
    if pid is not None and servers.alive(pid, _launch(state, name)):
        raise StackError(f"{name} is already running (pid {pid})")
    say = progress or (lambda _msg: None)
    pid = _start(run_dir, name, say)
    try:
        _wait_ready(run_dir, name, say)
    except BaseException:
        _stop(run_dir, [name])
        raise
    return pid


async def create_topics(
    bootstrap: str,
    topics: Sequence[str],
    partitions: int,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int = 1,
    compacted: Collection[str] = (),
) -> None:
    """Create the topics, those in `compacted` with cleanup.policy=compact; ones that already exist are fine
    (and left as they are). Replication 1 suits the one local broker; a cluster's come from the settings
    MODERATION_KAFKA_REPLICATION_FACTOR and MODERATION_KAFKA_MIN_INSYNC_REPLICAS."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    def new(topic: str) -> NewTopic:
        configs = {"min.insync.replicas": str(min_insync_replicas)}
        if topic in compacted:
            configs["cleanup.policy"] = "compact"
        return NewTopic(topic, partitions, replication_factor, topic_configs=configs)

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        response = await admin.create_topics([new(t) for t in topics])
        failed = [e for e in response.topic_errors if e[1] not in (0, TopicAlreadyExistsError.errno)]
    except TopicAlreadyExistsError:  # for aiokafka versions that raise instead of returning codes
        failed = []
    finally:
        await admin.close()
    if failed:
        raise StackError(f"could not create topics on {bootstrap}: {failed}")


def create_bucket(info: StackInfo, bucket: str) -> None:
    """Create the bucket; one that already exists is fine."""
    from botocore.exceptions import ClientError

    try:
        _s3(info).create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise


def prepare_model_repository(dest: Path, checkpoint: Path | str, source: Path = PROJECT_ROOT / "triton_models") -> Path:
    """Copy each model of `source` (a folder with config.pbtxt) into `dest`, its "checkpoint" parameter
    pointing at `checkpoint`: a Path or an existing local path made absolute, another str (a hub id)
    as it is. Other files of `source` (engine build scripts) stay behind."""
    local = Path(checkpoint)
    value = str(local.resolve()) if isinstance(checkpoint, Path) or local.exists() else str(checkpoint)
    rewritten = 0
    for config in sorted(Path(source).glob("*/config.pbtxt")):
        target = Path(dest) / config.parent.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(config.parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        text, count = _CHECKPOINT.subn(lambda m: m.group(1) + json.dumps(value), config.read_text())
        (target / "config.pbtxt").write_text(text)
        rewritten += count
    if not rewritten:
        raise StackError(f"no config.pbtxt under {source} has a 'checkpoint' parameter to point at {value}")
    return Path(dest)


def model_repository_for(home: Path, checkpoint: Path | str | None) -> Path:
    """`home`/model_repository serving `checkpoint`, or the tiny random checkpoint when None."""
    if checkpoint is None:
        from moderation.devkit.tinymodel import build_tiny_checkpoint

        checkpoint = build_tiny_checkpoint(Path(home) / "tiny-checkpoint")
    return prepare_model_repository(Path(home) / "model_repository", checkpoint)


def _start(run_dir: Path, name: str, say: Progress) -> int:
    state = _read_state(run_dir)
    launch = _launch(state, name)
    say(f"starting {name} on {launch['address']} (log {launch['log']})")
    state["pids"][name] = servers.spawn(launch)
    _write_state(_info(state), state["launch"])  # recorded at once, so down() can clean up
    return int(state["pids"][name])


def _wait_ready(run_dir: Path, name: str, say: Progress) -> None:
    state = _read_state(run_dir)
    info, launch, pid = _info(state), _launch(state, name), state["pids"][name]
    started = said = time.monotonic()
    while True:
        if not servers.alive(pid, launch):
            raise StackError(f"{name} exited while starting; {servers.log_tail(launch['log'])}")
        why = _probe(name, info)
        elapsed = time.monotonic() - started
        if why is None:
            say(f"{name} ready in {elapsed:.1f} s")
            return
        if elapsed > launch.get("ready_timeout_s", READY_TIMEOUT_S[name]):
            raise StackError(f"{name} not ready after {elapsed:.0f} s ({why}); {servers.log_tail(launch['log'])}")
        if time.monotonic() - said >= 10:
            last = servers.log_tail(launch["log"], 1).splitlines()[-1][:200]
            say(f"waiting for {name} ({elapsed:.0f} s): {why}; its log: {last}")
            said = time.monotonic()
        time.sleep(0.2)


def _stop(run_dir: Path, names: list[str]) -> list[str]:
    state = _read_state(run_dir)
    targets = {n: (state["pids"][n], state["launch"][n]) for n in names if n in state["pids"]}
    return servers.stop(targets)


READY_PROBE_KEY = "_stack/ready-probe"


def _probe(name: str, info: StackInfo) -> str | None:
    """None when the server answers a real client, else why not."""
    address = {KAFKA: info.kafka_bootstrap, S3: info.s3_endpoint, TRITON: info.triton_url or ""}[name]
    refused = servers.port_open(address)  # first, so that the clients do not log connection errors
    if refused:
        return refused
    try:
        if name == KAFKA:
            servers.run_sync(servers.kafka_metadata(info.kafka_bootstrap))
        elif name == S3:
            _s3_round_trip(info)
        else:
            return servers.triton_ready(address, info.model_name)
    except Exception as exc:  # any failure means "not ready (yet)"
        return f"{type(exc).__name__}: {exc}"
    return None


def _s3_round_trip(info: StackInfo) -> None:
    # Listing buckets answers before SeaweedFS's volume server has registered; reads of stored objects
    # fail with InternalError until it has, so ready means an object written and read back.
    client = _s3(info)
    if info.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=info.bucket)
    client.put_object(Bucket=info.bucket, Key=READY_PROBE_KEY, Body=b"ready")
    client.get_object(Bucket=info.bucket, Key=READY_PROBE_KEY)["Body"].read()


def _s3(info: StackInfo, secret: str | None = None) -> Any:
    import boto3

    settings = Settings.model_validate(
        {
            "s3_endpoint_url": info.s3_endpoint,
            "s3_region": info.s3_region,
            "s3_access_key_id": info.s3_access_key,
            "s3_secret_access_key": secret or info.s3_secret_key,
        }
    )
    return boto3.client("s3", **s3_client_args(settings))


def _check_s3_refuses_wrong_keys(info: StackInfo) -> None:
    from botocore.exceptions import ClientError

    try:
        _s3(info, secret="wrong-" + info.s3_secret_key).list_buckets()
    except ClientError:
        return
    raise StackError(f"S3 at {info.s3_endpoint} accepts a wrong secret key: its authentication is off")


def _write_state(info: StackInfo, launch: dict[str, Launch]) -> None:
    state = asdict(info) | {"run_dir": str(info.run_dir), "launch": launch}
    _write_private(info.run_dir / "stack.json", json.dumps(state, indent=2) + "\n")


def _read_state(run_dir: Path) -> Any:
    try:
        return json.loads((run_dir / "stack.json").read_text())
    except FileNotFoundError:
        raise StackError(f"no local stack in {run_dir} (no stack.json); start one with `moderation dev up`") from None


def _info(state: dict[str, Any]) -> StackInfo:
    return StackInfo(
        run_dir=Path(state["run_dir"]),
        kafka_bootstrap=state["kafka_bootstrap"],
        s3_endpoint=state["s3_endpoint"],
        s3_region=state["s3_region"],
        s3_access_key=state["s3_access_key"],
        s3_secret_key=state["s3_secret_key"],
        bucket=state["bucket"],
        triton_url=state.get("triton_url"),
        triton_http_url=state.get("triton_http_url"),
        triton_metrics_url=state.get("triton_metrics_url"),
        model_name=state["model_name"],
        pids=dict(state["pids"]),
    )


def _launch(state: dict[str, Any], name: str) -> Launch:
    if name not in state["launch"]:
        raise StackError(f"this stack has no server {name!r}; it has {', '.join(state['launch'])}")
    launch: Launch = state["launch"][name]
    return launch


def _write_private(path: Path, text: str) -> None:
    """Atomically, readable by the owner only: it holds the S3 secret."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(text)
    os.replace(tmp, path)
