"""The embedded stack against real clients: aiokafka, boto3, tritonclient. Each test owns its stack."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from botocore.config import Config
from botocore.exceptions import ClientError

from moderation.devkit import localstack
from moderation.devkit.localstack import StackError, StackInfo

MODEL_PY = """
import json

import numpy as np
import triton_python_backend_utils as pb_utils

import moderation  # importable in the stub: the stack runs Triton from the project root


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        self.checkpoint = params["checkpoint"]["string_value"]

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            where = np.array([[self.checkpoint.encode()]] * len(x), dtype=object)
            doubled = pb_utils.Tensor("DOUBLED", (x * 2).astype(np.float32))
            responses.append(pb_utils.InferenceResponse([doubled, pb_utils.Tensor("CHECKPOINT", where)]))
        return responses
"""

CONFIG = """name: "fakevlm"
backend: "python"
max_batch_size: 4
input [ { name: "X", data_type: TYPE_FP32, dims: [ 2 ] } ]
output [
  { name: "DOUBLED", data_type: TYPE_FP32, dims: [ 2 ] },
  { name: "CHECKPOINT", data_type: TYPE_STRING, dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
parameters: {
  key: "checkpoint"
  value: { string_value: "weights" }
}
"""


def trivial_repository(tmp_path: Path) -> Path:
    (tmp_path / "src" / "fakevlm" / "1").mkdir(parents=True)
    (tmp_path / "src" / "fakevlm" / "config.pbtxt").write_text(CONFIG)
    (tmp_path / "src" / "fakevlm" / "1" / "model.py").write_text(MODEL_PY)
    (tmp_path / "src" / "build_engines.sh").write_text("# not a model\n")
    (tmp_path / "ckpt").mkdir()
    return localstack.prepare_model_repository(tmp_path / "repo", tmp_path / "ckpt", source=tmp_path / "src")


def s3(info: StackInfo, secret: str | None = None, key: str | None = None):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=info.s3_endpoint,
        region_name=info.s3_region,
        aws_access_key_id=key or info.s3_access_key,
        aws_secret_access_key=secret or info.s3_secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=value)
    finally:
        await producer.stop()


async def consume_and_commit(bootstrap: str, topic: str, group: str, count: int) -> tuple[list[bytes], int]:
    """Read `count` messages in a consumer group, commit, return values and the committed total."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        rebalance_timeout_ms=1000,  # Tansu holds a JoinGroup for the whole rebalance timeout
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    try:
        values = [(await asyncio.wait_for(consumer.getone(), 30)).value for _ in range(count)]
        await consumer.commit()
        partitions = consumer.assignment()
        committed = [await consumer.committed(tp) for tp in partitions]
    finally:
        await consumer.stop()
    return [v for v in values if v is not None], sum(c or 0 for c in committed)


async def topic_configs(bootstrap: str, topics: list[str]) -> dict[str, dict[str, str]]:
    """Each topic's configs as the broker describes them (DescribeConfigs)."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    finally:
        await admin.close()
    return {
        name: {entry[0]: entry[1] for entry in entries}
        for response in responses
        for _code, _message, _type, name, entries in response.resources
    }


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_prepare_model_repository_points_checkpoint(tmp_path: Path) -> None:
    repo = trivial_repository(tmp_path)
    config = (repo / "fakevlm" / "config.pbtxt").read_text()
    assert f'string_value: "{(tmp_path / "ckpt").resolve()}"' in config
    assert "weights" not in config
    assert (repo / "fakevlm" / "1" / "model.py").exists()
    assert not (repo / "build_engines.sh").exists()
    hub = localstack.prepare_model_repository(tmp_path / "hub", "lingcco/fakeVLM", source=tmp_path / "src")
    assert 'string_value: "lingcco/fakeVLM"' in (hub / "fakevlm" / "config.pbtxt").read_text()
    (tmp_path / "src" / "fakevlm" / "config.pbtxt").write_text('name: "fakevlm"\n')
    with pytest.raises(StackError, match="checkpoint"):
        localstack.prepare_model_repository(tmp_path / "none", tmp_path / "ckpt", source=tmp_path / "src")


def test_load_without_stack_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="no local stack"):
        localstack.load(tmp_path)
    assert localstack.down(tmp_path) == []


@pytest.mark.integration
def test_kafka_and_s3_stack(tmp_path: Path) -> None:
    run_dir, said = tmp_path / "stack", []
    info = localstack.up(run_dir, with_triton=False, progress=said.append)
    try:
        assert info == localstack.load(run_dir)
        assert info.triton_url is None and "MODERATION_TRITON_URL" not in info.env()
        assert info.s3_secret_key not in repr(info)
        assert {s.name: (s.alive, s.ready) for s in localstack.status(run_dir)} == {
            "kafka": (True, True),
            "s3": (True, True),
        }
        assert any("ready in" in line for line in said)
        assert stat.S_IMODE((run_dir / "stack.json").stat().st_mode) == 0o600
        assert f"MODERATION_KAFKA_BOOTSTRAP_SERVERS={info.kafka_bootstrap}" in (run_dir / "stack.env").read_text()
        with pytest.raises(StackError, match="still runs"):
            localstack.up(run_dir, with_triton=False)

        # Kafka: the default topics exist; a fresh topic, produce, consume in a group, commit.
        topic, group = f"t-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
        for _ in range(2):  # idempotent
            asyncio.run(localstack.create_topics(info.kafka_bootstrap, [topic], 2))
        asyncio.run(produce(info.kafka_bootstrap, topic, [b"a", b"b", b"c"]))
        values, committed = asyncio.run(consume_and_commit(info.kafka_bootstrap, topic, group, 3))
        assert sorted(values) == [b"a", b"b", b"c"] and committed == 3

        # Topics are made with explicit configs: the verdict cache compacted, min.insync.replicas set.
        configs = asyncio.run(topic_configs(info.kafka_bootstrap, list(localstack.DEFAULT_TOPICS)))
        for name in localstack.DEFAULT_TOPICS:
            expected = "compact" if name in localstack.COMPACTED_TOPICS else "delete"
            assert configs[name].get("cleanup.policy", "delete") == expected, name
        assert set(localstack.COMPACTED_TOPICS) == {"moderation.verdict-cache", "moderation.hash-bank"}
        assert {c["min.insync.replicas"] for c in configs.values()} == {"1"}
        # A cluster's replication settings reach the broker (Tansu takes them whatever its broker count).
        replicated = f"r-{uuid.uuid4().hex[:8]}"
        asyncio.run(
            localstack.create_topics(
                info.kafka_bootstrap,
                [replicated],
                1,
                replication_factor=3,
                min_insync_replicas=2,
                compacted=[replicated],
            )
        )
        assert asyncio.run(topic_configs(info.kafka_bootstrap, [replicated]))[replicated] == {
            "min.insync.replicas": "2",
            "cleanup.policy": "compact",
        }

        # S3: a fresh bucket, put/get with the stack's keys; wrong keys are refused.
        bucket = f"b-{uuid.uuid4().hex[:8]}"
        localstack.create_bucket(info, bucket)
        localstack.create_bucket(info, bucket)
        s3(info).put_object(Bucket=bucket, Key="x/y.bin", Body=b"\x00bytes")
        assert s3(info).get_object(Bucket=bucket, Key="x/y.bin")["Body"].read() == b"\x00bytes"
        assert {b["Name"] for b in s3(info).list_buckets()["Buckets"]} >= {info.bucket, bucket}
        for wrong in (s3(info, secret="wrong"), s3(info, key="AKNOBODY")):
            with pytest.raises(ClientError) as refused:
                wrong.get_object(Bucket=bucket, Key="x/y.bin")
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

        # Fault injection: S3 restarts on the same port with its data.
        old = info.pids["s3"]
        assert localstack.stop_server(run_dir, "s3") and gone(old)
        assert not localstack.stop_server(run_dir, "s3")
        assert [s.alive for s in localstack.status(run_dir) if s.name == "s3"] == [False]
        localstack.start_server(run_dir, "s3")
        assert s3(info).get_object(Bucket=bucket, Key="x/y.bin")["Body"].read() == b"\x00bytes"
    finally:
        pids = localstack.load(run_dir).pids
        assert sorted(localstack.down(run_dir)) == ["kafka", "s3"]
    assert all(gone(pid) for pid in pids.values())
    assert not any(s.alive or s.ready for s in localstack.status(run_dir))
    assert localstack.down(run_dir) == []


@pytest.mark.integration
def test_stack_with_triton_and_durable_kafka(tmp_path: Path) -> None:
    repo = trivial_repository(tmp_path)
    run_dir = tmp_path / "stack"
    info = localstack.up(run_dir, model_repository=repo, durable_kafka=True)
    try:
        assert all(s.ready for s in localstack.status(run_dir))
        assert info.triton_url and info.env()["MODERATION_TRITON_URL"] == info.triton_url

        def infer() -> tuple[np.ndarray, np.ndarray]:
            client = grpcclient.InferenceServerClient(info.triton_url)
            x = grpcclient.InferInput("X", [1, 2], "FP32")
            x.set_data_from_numpy(np.array([[1.0, 2.5]], dtype=np.float32))
            result = client.infer(info.model_name, [x])
            client.close()
            return result.as_numpy("DOUBLED"), result.as_numpy("CHECKPOINT")

        doubled, checkpoint = infer()
        assert doubled.tolist() == [[2.0, 5.0]]
        assert checkpoint.ravel()[0].decode() == str((tmp_path / "ckpt").resolve())

        # Fault injection: Triton and the broker restart on the same ports; Tansu's log is in S3.
        topic = f"t-{uuid.uuid4().hex[:8]}"
        asyncio.run(localstack.create_topics(info.kafka_bootstrap, [topic], 1))
        asyncio.run(produce(info.kafka_bootstrap, topic, [b"kept"]))
        for name in ("triton", "kafka"):
            assert localstack.stop_server(run_dir, name)
            assert not next(s for s in localstack.status(run_dir) if s.name == name).alive
            localstack.start_server(run_dir, name)
        assert infer()[0].tolist() == [[2.0, 5.0]]
        values, _ = asyncio.run(consume_and_commit(info.kafka_bootstrap, topic, "after-restart", 1))
        assert values == [b"kept"]
    finally:
        pids = localstack.load(run_dir).pids
        assert sorted(localstack.down(run_dir)) == ["kafka", "s3", "triton"]
    assert all(gone(pid) for pid in pids.values())
    assert not any(s.alive for s in localstack.status(run_dir))


@pytest.mark.integration
def test_failed_start_stops_everything_and_shows_the_log(tmp_path: Path) -> None:
    repo = trivial_repository(tmp_path)
    model = repo / "fakevlm" / "1" / "model.py"
    model.write_text(model.read_text().replace("self.checkpoint = ", "raise RuntimeError('no weights here'); x = "))
    run_dir = tmp_path / "stack"
    with pytest.raises(StackError, match="no weights here"):
        localstack.up(run_dir, model_repository=repo)
    state = localstack.load(run_dir)
    assert set(state.pids) == {"triton", "s3", "kafka"}
    assert all(gone(pid) for pid in state.pids.values())
    assert not any(s.alive for s in localstack.status(run_dir))
    # A dead stack's directory can be brought up again.
    info = localstack.up(run_dir, with_triton=False)
    try:
        assert all(s.ready for s in localstack.status(run_dir)) and info.pids != state.pids
    finally:
        localstack.down(run_dir)
