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
    from moderation.detector import _tls_options

    (tmp_path / "ca.pem").write_bytes(b"CA")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    plain = Settings()
    assert _tls_options(plain) == {}
    tls = Settings(
        triton_ssl=True, triton_ssl_root_certificates=tmp_path / "ca.pem", triton_ssl_private_key=tmp_path / "key.pem"
    )
    assert _tls_options(tls) == {"ssl": True, "root_certificates": b"CA", "private_key": b"KEY"}
