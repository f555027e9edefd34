"""The review console: a small Starlette app with server-side templates and no JS build step.

GET / lists the items awaiting review; GET /image?event_id=ID streams an item's image from S3 through
the worker's S3Store (allowlist, byte cap, never a public or presigned URL); POST /decide publishes a
Decision to the decisions topic and waits for the broker's ack. /healthz is liveness (red when the queue
reader died), /readyz readiness (green once the reader has caught up with its topics).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, get_args
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from moderation.adapters.publisher import Publisher, PublishError, Record
from moderation.adapters.s3 import S3Store
from moderation.errors import Reason, Rejected
from moderation.events import Decision, ReviewDecision
from moderation.review import metrics
from moderation.review.auth import Identity, Reviewers, Session, Sessions, same_origin
from moderation.review.queue import Item, ReviewQueue
from moderation.review.reader import QueueReader
from moderation.settings import Settings

log = logging.getLogger(__name__)
_R = TypeVar("_R", bound=Response)

COOKIE = "moderation_review"
DECISIONS: tuple[str, ...] = get_args(ReviewDecision)
MAX_NOTE_CHARS = 2000
PAGE_ITEMS = 200
IMAGE_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "HEIF": "image/heif",
    "AVIF": "image/avif",
}
_IMAGE_STATUS = {
    Reason.FORBIDDEN_BUCKET: 403,
    Reason.ACCESS_DENIED: 502,
    Reason.OBJECT_MISSING: 404,
    Reason.TOO_LARGE: 413,
    Reason.STORAGE_UNAVAILABLE: 503,
    Reason.UNSAFE_KEY: 400,
}


@dataclass
class Console:
    """What the routes share: opened once in the lifespan, never per request."""

    settings: Settings
    queue: ReviewQueue
    reviewers: Reviewers
    sessions: Sessions
    reader: QueueReader
    store: S3Store
    publisher: Publisher


_templates = Environment(
    loader=PackageLoader("moderation.review", "templates"), autoescape=select_autoescape(default=True)
)


def create_app(settings: Settings) -> Starlette:
    """The console's ASGI app; its lifespan follows the topics and opens the S3 and Kafka clients."""
    queue = ReviewQueue(settings.review_max_items)
    console = Console(
        settings,
        queue,
        Reviewers.from_settings(settings),
        Sessions.from_settings(settings),
        QueueReader(settings, queue),
        S3Store(settings),
        Publisher(settings),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as opened:  # closes what did open when a later start fails
            opened.push_async_callback(console.store.stop)
            await console.store.start()
            opened.push_async_callback(console.publisher.stop)
            await console.publisher.start()
            opened.push_async_callback(console.reader.stop)
            console.reader.start()
            yield

    routes = [
        Route("/", _page(queue_page), methods=["GET"]),
        Route("/login", _page(login_page), methods=["GET"]),
        Route("/login", _page(login), methods=["POST"]),
        Route("/logout", _page(logout), methods=["POST"]),
        Route("/decide", _page(decide), methods=["POST"]),
        # A query parameter, never a path segment: an event id `.` or `..` is schema-valid, and a browser resolves
        # /image/.. to /.
        Route("/image", _page(image), methods=["GET"]),
        Route("/healthz", _page(healthz), methods=["GET"]),
        Route("/readyz", _page(readyz), methods=["GET"]),
        Route("/metrics", _page(prometheus), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.console = console
    return app


class _Context:
    """One request's view: its session (new when the cookie is missing or bad) and its reviewer."""

    def __init__(self, request: Request, console: Console) -> None:
        self.request = request
        self.console = console
        loaded = console.sessions.load(request.cookies.get(COOKIE))
        self.session: Session = loaded or console.sessions.new()
        self.identity: Identity | None = console.reviewers.identify(request.headers, self.session.reviewer)
        self.nonce = secrets.token_urlsafe(12)  # the CSP nonce of this page's inline script and style

    @property
    def csrf(self) -> str:
        return self.console.sessions.csrf_token(self.session)

    def render(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        body = _templates.get_template(template).render(
            identity=self.identity, csrf=self.csrf, nonce=self.nonce, login=self.console.reviewers.login, **values
        )
        response = HTMLResponse(body, status_code=status)
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; img-src 'self'; script-src 'nonce-{self.nonce}'; style-src 'nonce-{self.nonce}'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        return self.with_cookie(response)

    def with_cookie(self, response: _R) -> _R:
        response.headers["Cache-Control"] = "private, no-store"
        response.headers["X-Frame-Options"] = "DENY"  # keyboard shortcuts must not be clickjacked
        response.headers["Referrer-Policy"] = "same-origin"
        response.set_cookie(
            COOKIE,
            self.console.sessions.dump(self.session),
            httponly=True,
            samesite="strict",
            secure=self.request.url.scheme == "https",
        )
        return response

    def refuse(self, status: int, title: str, detail: str) -> HTMLResponse:
        metrics.REFUSED.labels(str(status)).inc()
        return self.render("refused.html", status, title=title, detail=detail)

    def unknown(self) -> HTMLResponse:
        if not self.console.reviewers.configured:
            return self.refuse(
                403,
                "No reviewers configured",
                "Set MODERATION_REVIEW_IDENTITY_HEADER (behind a signing-in proxy) or MODERATION_REVIEW_TOKENS.",
            )
        return self.refuse(401, "Sign in first", "Anonymous reviewers cannot see the queue or decide.")

    async def form_checked(self) -> dict[str, str] | HTMLResponse:
        """The posted form, or a refusal: cross-site posts and posts without the session's CSRF token."""
        form = {k: v for k, v in (await self.request.form()).items() if isinstance(v, str)}
        if self.identity is not None and not self.identity.ambient:
            return form
        if not same_origin(self.request.headers):
            return self.refuse(403, "Cross-site request refused", "The form was not posted from this console.")
        if not self.console.sessions.check_csrf(self.session, form.get("csrf", "")):
            return self.refuse(403, "Stale form", "The page's session token did not match: reload it and retry.")
        return form


def _page(handler: Callable[[_Context], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await handler(_Context(request, request.app.state.console))

    return endpoint


async def queue_page(ctx: _Context) -> Response:
    if ctx.identity is None:
        return ctx.unknown()
    queue = ctx.console.queue
    tenant = ctx.request.query_params.get("tenant") or None
    action = ctx.request.query_params.get("action") or None
    items = queue.awaiting(tenant=tenant, action=action, limit=PAGE_ITEMS)
    return ctx.render(
        "queue.html",
        items=[(item, queue.history(item)) for item in items],
        tenants=queue.tenants(),
        tenant=tenant,
        action=action,
        done=ctx.request.query_params.get("done"),
        caught_up=ctx.console.reader.caught_up.is_set(),
        decisions=DECISIONS,
        filter_url=filter_url,
        image_url=image_url,
    )


def filter_url(tenant: str | None, action: str | None) -> str:
    query = urlencode({k: v for k, v in (("tenant", tenant), ("action", action)) if v})
    return f"/?{query}" if query else "/"


def image_url(event_id: str) -> str:
    return "/image?" + urlencode({"event_id": event_id})


async def login_page(ctx: _Context) -> Response:
    return ctx.render("login.html", error=None)


async def login(ctx: _Context) -> Response:
    form = await ctx.form_checked()
    if isinstance(form, Response):
        return form
    reviewer = ctx.console.reviewers.by_token(form.get("token", "").strip())
    if reviewer is None:
        return ctx.render("login.html", 401, error="That token is not a reviewer's.")
    ctx.session = ctx.console.sessions.new(reviewer)  # a fresh nonce: a session fixed before login is useless
    log.info("reviewer %s signed in", reviewer)
    return ctx.with_cookie(RedirectResponse("/", status_code=303))


async def logout(ctx: _Context) -> Response:
    form = await ctx.form_checked()
    if isinstance(form, Response):
        return form
    ctx.session = ctx.console.sessions.new()
    return ctx.with_cookie(RedirectResponse("/login", status_code=303))


async def decide(ctx: _Context) -> Response:
    if ctx.identity is None:
        return ctx.unknown()
    form = await ctx.form_checked()
    if isinstance(form, Response):
        return form
    choice, note = form.get("decision", ""), form.get("note", "").strip()
    item = ctx.console.queue.item(form.get("event_id", ""))
    if item is None:
        return ctx.refuse(404, "No such item", "That event is not in the review queue (yet).")
    if choice not in DECISIONS or len(note) > MAX_NOTE_CHARS:
        return ctx.refuse(400, "Bad decision", f"decision is one of {', '.join(DECISIONS)}; a note is at most 2000.")
    decision = decision_for(item, choice, note or None, ctx.identity.reviewer)
    try:
        await publish_decision(ctx.console, decision)
    except PublishError as exc:
        log.warning("decision not published: %s", exc, extra={"event_id": decision.event_id})
        return ctx.refuse(503, "Not recorded", "The broker did not acknowledge the decision: try again.")
    ctx.console.queue.add_decision(decision)
    metrics.DECISIONS.labels(decision.decision).inc()
    log.info("%s decided %s", decision.reviewer, decision.decision, extra={"event_id": decision.event_id})
    back = {k: v for k in ("tenant", "action") if (v := form.get(k))} | {"done": decision.event_id}
    return ctx.with_cookie(RedirectResponse("/?" + urlencode(back), status_code=303))


def decision_for(item: Item, choice: str, note: str | None, reviewer: str) -> Decision:
    return Decision.about(item.verdict, choice, reviewer, note=note)  # type: ignore[arg-type]  # checked against DECISIONS


async def publish_decision(console: Console, decision: Decision) -> None:
    """Keyed by event_id, acknowledged by the broker (acks=all) within MODERATION_PUBLISH_TIMEOUT_S."""
    record = Record(console.settings.topic_decisions, decision.event_id.encode(), decision.to_bytes())
    await console.publisher.publish([record])


async def image(ctx: _Context) -> Response:
    if ctx.identity is None:
        return ctx.unknown()
    item = ctx.console.queue.item(ctx.request.query_params.get("event_id", ""))
    if item is None:
        return ctx.refuse(404, "No such item", "Only images of items in the review queue are served.")
    verdict = item.verdict
    try:
        data = await ctx.console.store.fetch(verdict.bucket, verdict.key)
    except Rejected as exc:
        log.warning("image not served: %s", exc, extra={"event_id": verdict.event_id, "reason": exc.reason})
        return ctx.refuse(_IMAGE_STATUS.get(exc.reason, 502), "Image not served", f"{exc.reason}: {exc.detail}")
    if hashlib.sha256(data).hexdigest() != verdict.image_sha256:
        return ctx.refuse(409, "Image changed", "The object's bytes are not the ones that were moderated.")
    response = Response(data, media_type=IMAGE_TYPES.get(verdict.image.format.upper(), "application/octet-stream"))
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return ctx.with_cookie(response)


async def healthz(ctx: _Context) -> Response:
    alive = ctx.console.reader.failure is None
    body = {"status": "ok" if alive else "reader stopped", "items": len(ctx.console.queue)}
    return JSONResponse(body, status_code=200 if alive else 503)


async def prometheus(ctx: _Context) -> Response:
    """Unauthenticated, as probes are: counts only, never an item or a reviewer."""
    metrics.AWAITING.set(len(ctx.console.queue.awaiting(limit=ctx.console.settings.review_max_items)))
    metrics.READER_UP.set(1 if ctx.console.reader.failure is None and ctx.console.reader.alive else 0)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def readyz(ctx: _Context) -> Response:
    ready = ctx.console.reader.alive and ctx.console.reader.caught_up.is_set()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)
