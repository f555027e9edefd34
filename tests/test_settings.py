from pathlib import Path

import pytest
from pydantic import ValidationError

from moderation.settings import Settings, env_table

README = Path(__file__).parent.parent / "README.md"


def test_readme_lists_every_setting_with_its_default() -> None:
    assert env_table() in README.read_text(), "README's configuration table drifted: `moderation settings --markdown`"


def test_allowed_buckets_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_S3_ALLOWED_BUCKETS", "uploads, avatars,")
    assert Settings().s3_allowed_buckets == ("uploads", "avatars")


def test_secrets_never_show_in_dumps_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_S3_SECRET_ACCESS_KEY", "s3-secret-value")
    monkeypatch.setenv("MODERATION_KAFKA_SASL_PASSWORD", "kafka-secret-value")
    settings = Settings()
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "secret-value" not in text
    assert settings.s3_secret_access_key.get_secret_value() == "s3-secret-value"


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValidationError):
        Settings(review_threshold=0.9, flag_threshold=0.5)


def test_triton_tls_options_read_the_certificate_files(tmp_path: Path) -> None:
    from moderation.model.detectors.triton import _tls_options

    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    plain = Settings()
    assert _tls_options(plain) == {}
    tls = Settings(
        triton_ssl=True, triton_ssl_root_certificates=tmp_path / "ca.pem", triton_ssl_private_key=tmp_path / "key.pem"
    )
    assert _tls_options(tls) == {"ssl": True, "root_certificates": b"CA", "private_key": b"KEY"}


def test_the_default_timeouts_agree_with_room_to_spare() -> None:
    settings = Settings()
    assert settings.worst_batch_s < settings.kafka_max_poll_interval_s
    assert settings.worst_batch_s < settings.kafka_rebalance_timeout_s
    assert settings.worst_batch_s < settings.ack_stall_s, "a worker waiting out an outage is not restarted"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # The old defaults: transient retries outlived the max poll interval and the rebalance timeout.
        (
            {"event_deadline_s": 600, "kafka_max_poll_interval_s": 300, "kafka_rebalance_timeout_s": 60},
            [
                "MODERATION_KAFKA_MAX_POLL_INTERVAL_S",
                "MODERATION_KAFKA_REBALANCE_TIMEOUT_S",
                "MODERATION_EVENT_DEADLINE_S",
            ],
        ),
        ({"triton_timeout_s": 1000}, ["MODERATION_KAFKA_MAX_POLL_INTERVAL_S", "MODERATION_TRITON_TIMEOUT_S"]),
        ({"kafka_rebalance_timeout_s": 60}, ["MODERATION_KAFKA_REBALANCE_TIMEOUT_S"]),
        ({"shutdown_grace_s": 1200}, ["MODERATION_SHUTDOWN_GRACE_S", "MODERATION_KAFKA_MAX_POLL_INTERVAL_S"]),
        ({"kafka_session_timeout_s": 120}, ["MODERATION_KAFKA_SESSION_TIMEOUT_S"]),
        ({"kafka_heartbeat_interval_s": 30}, ["MODERATION_KAFKA_HEARTBEAT_INTERVAL_S"]),
    ],
)
def test_timeouts_that_let_a_second_worker_redo_events_are_refused(overrides: dict, named: list[str]) -> None:
    with pytest.raises(ValidationError, match="timeouts that disagree") as refused:
        Settings(**overrides)
    for name in named:
        assert name in str(refused.value)


def test_a_short_rebalance_timeout_only_when_the_overlap_is_accepted_as_for_tansu() -> None:
    tansu = Settings(kafka_rebalance_timeout_s=5, kafka_accept_rebalance_overlap=True)
    assert tansu.kafka_rebalance_timeout_s < tansu.worst_batch_s
    with pytest.raises(ValidationError, match="MODERATION_KAFKA_MAX_POLL_INTERVAL_S"):
        Settings(kafka_max_poll_interval_s=60, kafka_accept_rebalance_overlap=True), "the max poll interval still holds"


def test_the_local_stack_settings_validate() -> None:
    from moderation.devkit.localstack import StackInfo

    info = StackInfo(
        Path("."),
        "127.0.0.1:9092",
        "http://127.0.0.1:1",
        "us-east-1",
        "a",
        "b",
        "uploads",
        None,
        None,
        None,
        "fakevlm",
        {},
    )
    fields = {name.upper(): name for name in Settings.model_fields}
    Settings.model_validate({fields[key.removeprefix("MODERATION_")]: value for key, value in info.env().items()})


def test_the_worst_batch_time_comes_from_what_bounds_each_part(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each constant behind `worst_batch_s`, checked against the code and the clients that set it."""
    import asyncio

    import faust

    from moderation import settings as module
    from moderation.adapters.s3 import S3Store
    from moderation.worker.app import faust_options

    # S3: botocore's total attempts and its standard-mode backoff cap (1, 2, 4 s before the 2nd, 3rd, 4th).
    async def s3_retries() -> dict[str, object]:
        store = S3Store(Settings(s3_endpoint_url="http://127.0.0.1:1"))
        await store.start()
        try:
            return dict(store._client.meta.config.retries)
        finally:
            await store.stop()

    retries = asyncio.run(s3_retries())
    assert retries == {"total_max_attempts": module.S3_TRIES, "mode": "standard"}
    assert sum(2**n for n in range(module.S3_TRIES - 1)) == module.S3_BACKOFF_S

    # Faust refuses a session timeout above its request timeout, which the worker leaves at Faust's default.
    assert "broker_request_timeout" not in faust_options(Settings())
    assert faust.Settings("x").broker_request_timeout == module.FAUST_REQUEST_TIMEOUT_S
