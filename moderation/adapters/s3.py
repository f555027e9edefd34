"""Fetch upload bytes from S3: allowlisted buckets only, capped in size before the body is read."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from moderation.errors import Reason, Rejected
from moderation.settings import Settings

_MISSING = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}


class ImageStore(Protocol):
    async def fetch(self, bucket: str, key: str) -> bytes: ...


class S3Store:
    """aiobotocore client opened once per worker; the credentials come from settings or the AWS chain."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._allowed = frozenset(settings.s3_allowed_buckets)
        self._exit_stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        args = s3_client_args(self._settings, AioConfig)
        self._client = await self._exit_stack.enter_async_context(get_session().create_client("s3", **args))

    async def stop(self) -> None:
        await self._exit_stack.aclose()

    async def reachable(self) -> bool:
        """Every allowed bucket answers a HEAD with our credentials."""
        try:
            for bucket in self._allowed:
                await self._client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError, OSError, TimeoutError):
            return False
        return True

    async def fetch(self, bucket: str, key: str) -> bytes:
        if bucket not in self._allowed:
            raise Rejected(Reason.FORBIDDEN_BUCKET, f"bucket {bucket!r} is not in MODERATION_S3_ALLOWED_BUCKETS")
        if has_dot_segments(key):
            raise Rejected(Reason.UNSAFE_KEY, f"object key {key[:200]!r} has a '.' or '..' path segment")
        cap = self._settings.s3_max_object_bytes
        try:
            response = await self._client.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as body:
                size = response.get("ContentLength")
                if size is not None and size > cap:
                    raise Rejected(Reason.TOO_LARGE, f"object is {size} bytes, the cap is {cap}")
                # With a Content-Length the HTTP client reads no further than it (and botocore checks that it
                # got that much): one read. Without one (chunked), never more than the cap.
                data = await (body.read() if size is not None else _read_capped(body, cap))
        except ClientError as exc:
            raise _classify(exc, bucket, key) from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise Rejected(Reason.STORAGE_UNAVAILABLE, f"S3 did not answer: {type(exc).__name__}: {exc}") from exc
        if len(data) > cap:
            raise Rejected(Reason.TOO_LARGE, f"object exceeds the cap of {cap} bytes")
        return data


def has_dot_segments(key: str) -> bool:
    """Whether a `/`-separated segment of the key is `.` or `..` (RFC 3986 dot segments, which URL handling
    removes: `a/../b` would be fetched as `b`)."""
    return any(segment in (".", "..") for segment in key.split("/"))


def _classify(exc: ClientError, bucket: str, key: str) -> Rejected:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _MISSING:
        return Rejected(Reason.OBJECT_MISSING, f"s3://{bucket}/{key} does not exist ({code})")
    if code in _DENIED:
        return Rejected(Reason.ACCESS_DENIED, f"S3 refused s3://{bucket}/{key} ({code})")
    if status >= 500 or code in {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"}:
        return Rejected(Reason.STORAGE_UNAVAILABLE, f"S3 error {code} (HTTP {status})")
    return Rejected(Reason.INVALID_EVENT, f"S3 refused the request for s3://{bucket}/{key}: {code} (HTTP {status})")


async def _read_capped(body: Any, cap: int) -> bytes:
    """Read the whole body but never more than cap + 1 bytes: a lying Content-Length cannot exhaust memory."""
    chunks, size = [], 0
    while size <= cap and (chunk := await body.read(min(1 << 20, cap + 1 - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def s3_client_args(settings: Settings, config: Callable[..., Config] = Config) -> dict[str, Any]:
    """An S3 client's arguments (aiobotocore's with `config=AioConfig`, boto3's by default) from the
    MODERATION_S3_* settings: the one place that maps them. SigV4, bounded timeouts and retries, and
    path-style addressing off AWS (a local endpoint has no bucket subdomains)."""
    secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
    return {
        "endpoint_url": settings.s3_endpoint_url,
        "region_name": settings.s3_region,
        "aws_access_key_id": settings.s3_access_key_id,
        "aws_secret_access_key": secret,
        "config": config(
            signature_version="s3v4",
            connect_timeout=settings.s3_timeout_s,
            read_timeout=settings.s3_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
        ),
    }
