"""S3Store against the real SeaweedFS: allowlist, byte cap, missing objects, wrong credentials."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from moderation.adapters.s3 import S3Store
from moderation.devkit.demo import put_objects
from moderation.errors import Reason, Rejected

pytestmark = pytest.mark.integration


async def fetch(settings, bucket: str, key: str) -> bytes:  # type: ignore[no-untyped-def]
    store = S3Store(settings)
    await store.start()
    try:
        return await store.fetch(bucket, key)
    finally:
        await store.stop()


def reason(settings, bucket: str, key: str) -> Reason:  # type: ignore[no-untyped-def]
    with pytest.raises(Rejected) as caught:
        asyncio.run(fetch(settings, bucket, key))
    return caught.value.reason


def test_fetch_honours_the_allowlist_the_cap_and_the_credentials(lane) -> None:
    settings = lane.settings.model_copy(update={"s3_max_object_bytes": 3_000_000})
    bucket = settings.s3_allowed_buckets[0]
    big = bytes(range(256)) * 10_000  # 2.56 MB, read in several chunks
    put_objects(settings, bucket, {"ok.bin": big, "over.bin": b"x" * 3_000_001, "cap.bin": b"y" * 3_000_000})

    assert asyncio.run(fetch(settings, bucket, "ok.bin")) == big
    assert len(asyncio.run(fetch(settings, bucket, "cap.bin"))) == 3_000_000
    assert reason(settings, bucket, "over.bin") == Reason.TOO_LARGE
    assert reason(settings, bucket, "absent.bin") == Reason.OBJECT_MISSING
    assert reason(settings, lane.info.bucket, "ok.bin") == Reason.FORBIDDEN_BUCKET, "only allowlisted buckets"
    wrong = settings.model_copy(update={"s3_secret_access_key": SecretStr("not-the-secret")})
    assert reason(wrong, bucket, "ok.bin") == Reason.ACCESS_DENIED
    down = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9", "s3_timeout_s": 1.0})
    assert reason(down, bucket, "ok.bin") == Reason.STORAGE_UNAVAILABLE


def test_a_body_without_a_length_is_read_no_further_than_the_cap() -> None:
    """A chunked answer (no Content-Length, which SeaweedFS never sends) is read in capped steps: an endless
    body costs cap + 1 bytes, which fetch then refuses as too large."""
    from moderation.adapters.s3 import _read_capped

    class Endless:
        reads = 0

        async def read(self, amount: int) -> bytes:
            self.reads += 1
            return b"z" * min(amount, 1000)

    body = Endless()
    assert len(asyncio.run(_read_capped(body, 5_500))) == 5_501 and body.reads == 6
