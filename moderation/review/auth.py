"""Who is deciding, and whether the request really came from the console's own page.

A reviewer is known by a trusted proxy's header (only when MODERATION_REVIEW_IDENTITY_HEADER names it:
the proxy must drop the header from what clients send), by a bearer token, or by a session cookie that
a login with such a token set (tokens: MODERATION_REVIEW_TOKENS, `reviewer:token` pairs). Nobody else
decides. The cookie and the proxy header are ambient credentials a browser attaches to any request, so
a form post must also come from our origin (Origin, else Referer) and carry the session's CSRF token;
a bearer token is never attached by a browser on its own, so it needs neither.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from moderation.errors import ModerationError
from moderation.settings import Settings

SESSION_TTL_S = 12 * 3600
MIN_TOKEN_CHARS = 16
MAX_REVIEWER_CHARS = 200  # Decision.reviewer's limit


class InvalidTokens(ModerationError):
    """MODERATION_REVIEW_TOKENS that the console cannot start with."""


@dataclass(frozen=True)
class Identity:
    reviewer: str
    via: Literal["header", "bearer", "session"]

    @property
    def ambient(self) -> bool:
        """Sent by the browser without the page asking: needs the same-origin and CSRF checks."""
        return self.via != "bearer"


class Reviewers:
    def __init__(self, tokens: Mapping[str, str], header: str | None = None) -> None:
        self._tokens = dict(tokens)  # token -> reviewer
        self.header = header
        self.names = frozenset(self._tokens.values())

    @classmethod
    def from_settings(cls, settings: Settings) -> Reviewers:
        raw = settings.review_tokens.get_secret_value() if settings.review_tokens else ""
        return cls(parse_tokens(raw), settings.review_identity_header or None)

    @property
    def configured(self) -> bool:
        return bool(self._tokens or self.header)

    @property
    def login(self) -> bool:
        return bool(self._tokens)

    def by_token(self, token: str) -> str | None:
        """The token's reviewer; every configured token is compared, in constant time each."""
        found = None
        for known, reviewer in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = reviewer
        return found

    def identify(self, headers: Mapping[str, str], session_reviewer: str | None) -> Identity | None:
        if self.header and (name := headers.get(self.header, "").strip()):
            return Identity(name[:MAX_REVIEWER_CHARS], "header")
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            reviewer = self.by_token(authorization[7:].strip())
            return Identity(reviewer, "bearer") if reviewer else None  # a wrong token is not a fallback
        if session_reviewer and session_reviewer in self.names:  # a revoked reviewer's session ends at once
            return Identity(session_reviewer, "session")
        return None


def parse_tokens(raw: str) -> dict[str, str]:
    """`alice:token1,bob:token2` -> {token: reviewer}; a malformed pair or a short token is refused."""
    tokens: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in raw.split(","))):
        reviewer, sep, token = pair.partition(":")
        reviewer, token = reviewer.strip(), token.strip()
        if not sep or not reviewer or len(reviewer) > MAX_REVIEWER_CHARS:
            raise InvalidTokens(
                "MODERATION_REVIEW_TOKENS: each entry is reviewer:token (reviewer up to 200 characters)"
            )
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidTokens(f"MODERATION_REVIEW_TOKENS: {reviewer}'s token is under {MIN_TOKEN_CHARS} characters")
        if token in tokens:
            raise InvalidTokens("MODERATION_REVIEW_TOKENS: two reviewers share a token")
        tokens[token] = reviewer
    return tokens


@dataclass(frozen=True)
class Session:
    nonce: str
    issued: int
    reviewer: str | None = None


class Sessions:
    """Signed session cookies (`nonce.issued.reviewer.signature`) and the CSRF token derived from each."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)  # none set: sessions end when the process does

    @classmethod
    def from_settings(cls, settings: Settings) -> Sessions:
        secret = settings.review_session_secret
        return cls(secret.get_secret_value().encode() if secret else None)

    def new(self, reviewer: str | None = None) -> Session:
        return Session(secrets.token_urlsafe(18), int(time.time()), reviewer)

    def dump(self, session: Session) -> str:
        body = f"{session.nonce}.{session.issued}.{_b64(session.reviewer or '')}"
        return f"{body}.{self._sign('session', body)}"

    def load(self, cookie: str | None) -> Session | None:
        """The cookie's session, or None when it is missing, forged or older than SESSION_TTL_S."""
        try:
            nonce, issued, reviewer, signature = (cookie or "").split(".")
            fresh = 0 <= time.time() - int(issued) < SESSION_TTL_S
            if not fresh or not hmac.compare_digest(signature, self._sign("session", f"{nonce}.{issued}.{reviewer}")):
                return None
            return Session(nonce, int(issued), _unb64(reviewer) or None)
        except ValueError:
            return None

    def csrf_token(self, session: Session) -> str:
        return self._sign("csrf", session.nonce)

    def check_csrf(self, session: Session, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf_token(session).encode())

    def _sign(self, purpose: str, body: str) -> str:
        digest = hmac.new(self._secret, f"{purpose}|{body}".encode(), hashlib.sha256).digest()
        return _b64_bytes(digest)


def same_origin(headers: Mapping[str, str]) -> bool:
    """The request names our own host as its Origin (or, without one, its Referer); neither is a refusal."""
    host = headers.get("host", "")
    source = headers.get("origin") or headers.get("referer") or ""
    return bool(host) and source != "null" and urlsplit(source).netloc == host


def _b64(text: str) -> str:
    return _b64_bytes(text.encode())


def _b64_bytes(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> str:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("bad base64") from exc
