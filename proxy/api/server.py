"""The consent API: an aiohttp site on ``api.address`` for CRMs and sign-up forms.

Routes (the OpenAPI document, ``openapi.py``, is the reference; ``GET /openapi.json``):

* ``POST /v1/events``: one consent event with its evidence, the fields and checks of
  ``sendguard consent add`` (``consent_csv.event_from_row``, so ``new_event``'s rules).
* ``POST /v1/opt-outs``, ``POST /v1/suppressions``: the same with the kind fixed and
  ``method`` defaulting to ``api``.
* ``GET /v1/addresses/{address}/status``: what the consent policy would decide now (or
  ``at``), through ``ConsentStore.basis`` and the configured soft opt-in rules.
* ``GET /v1/addresses/{address}/history``: every event bearing on the address.
* ``POST /v1/imports``: JSON lines (``application/x-ndjson``) or CSV (``text/csv``, the
  columns of ``consent import``), read in blocks up to ``api.max_import``; all or nothing.

Every request carries ``Authorization: Bearer <token>``; the token's hash must be in
``api.tokens`` with the scope the route needs (read, write). Each token has its own budget
(``api.rate``) in the limit store, so instances sharing Redis share it. A POST with an
``Idempotency-Key`` header records once: a retry gets the first answer (from the consent
store's database, so any instance gives it), the same key with another body is a 422, and a
retry while the first is still being answered a 409. Every recorded event writes an audit line.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.api.config import ApiConfig, ApiToken, hash_token
from proxy.api.state import ApiState
from proxy.observability.http import start_site
from proxy.stores.consent import (
    CSV_COLUMNS,
    OPTED_OUT,
    SUPPRESSED,
    ConsentEvent,
    ConsentInputError,
    ConsentStore,
    ConsentStoreError,
    CsvProblem,
    SoftOptInRules,
    event_from_row,
    iter_csv,
    parse_time,
)
from proxy.stores.limits_store import Charge, LimitStore, LimitStoreError, bucket_key

__all__ = ("ApiContext", "ApiServer", "build_api_app", "dumps_document")

log = logging.getLogger("sendguard.api")

_FIELDS = frozenset(CSV_COLUMNS)
_BODY: web.RequestKey[bytes] = web.RequestKey("body", bytes)
IMPORT_PATH = "/v1/imports"
MAX_PROBLEMS = 100
_TOKEN_KEY: web.AppKey[ApiToken] = web.AppKey("token", ApiToken)


@dataclass
class ApiContext:
    """What the API reads from the running process: getters, so a reload is seen at once."""

    config: Callable[[], ApiConfig]
    consent: Callable[[], ConsentStore | None]
    limits: Callable[[], LimitStore | None]
    rules: Callable[[], SoftOptInRules]
    state: ApiState
    audit: Any = None  # proxy.observability.logsetup.AuditLog (anything with .write(dict))


class ApiError(Exception):
    def __init__(self, status: int, message: str, problems: list[str] | None = None, **headers: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.problems = problems
        self.headers = {name.replace("_", "-"): value for name, value in headers.items()}


def _error_response(error: ApiError) -> web.Response:
    body: dict[str, Any] = {"error": error.message}
    if error.problems:
        body["problems"] = error.problems
    return web.json_response(body, status=error.status, headers=error.headers)


# ---- request handling common to every route -----------------------------------------------------


def _authenticate(request: web.Request, config: ApiConfig) -> ApiToken:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "send Authorization: Bearer <token>", WWW_Authenticate='Bearer realm="sendguard"')
    # Compare against every configured hash: the time taken does not say which one is close.
    digest = hash_token(token.strip())
    found = [entry for entry in config.tokens if hmac.compare_digest(entry.hash, digest)]
    if not found:
        raise ApiError(401, "unknown token", WWW_Authenticate='Bearer realm="sendguard", error="invalid_token"')
    return found[0]


async def _rate_limit(ctx: ApiContext, token: ApiToken) -> None:
    limits = ctx.limits()
    if limits is None:
        return
    rate = ctx.config().rate
    charge = Charge(bucket_key("api", rate.period, token.name), rate.period / rate.count, rate.count, 1)
    try:
        result = await limits.reserve([charge])
    except LimitStoreError as exc:
        # A budget is there to protect the store, not to stop a CRM when Redis is away.
        log.warning("api rate limit not checked (%s): let through", exc)
        return
    if not result.granted:
        wait = max(1, int(result.retry_after + 0.999))
        raise ApiError(429, f"rate limit of token {token.name} ({rate}) reached", Retry_After=str(wait))


def _route(
    ctx: ApiContext, scope: str, handler: Callable[[web.Request, ApiToken], Awaitable[web.Response]]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            token = _authenticate(request, ctx.config())
            if scope not in token.scopes:
                raise ApiError(403, f"token {token.name} lacks the {scope} scope")
            await _rate_limit(ctx, token)
            if request.method == "POST" and "Idempotency-Key" in request.headers:
                return await _idempotent(ctx, request, token, handler)
            return await handler(request, token)
        except ApiError as error:
            return _error_response(error)
        except ConsentInputError as exc:
            return _error_response(ApiError(422, str(exc)))
        except ConsentStoreError as exc:
            log.error("api: %s", exc)
            return _error_response(ApiError(503, "the consent store cannot answer now; retry later", Retry_After="5"))

    return wrapped


async def _idempotent(
    ctx: ApiContext,
    request: web.Request,
    token: ApiToken,
    handler: Callable[[web.Request, ApiToken], Awaitable[web.Response]],
) -> web.Response:
    key = request.headers["Idempotency-Key"].strip()
    if not 1 <= len(key) <= 200 or not key.isprintable():
        raise ApiError(400, "Idempotency-Key must be 1-200 printable characters")
    config = ctx.config()
    limit = int(config.max_import if request.path == IMPORT_PATH else config.max_body)
    body = await _read_bounded(request, limit)  # kept on the request: the handler reads the same bytes
    request_hash = hashlib.sha256(f"{request.method} {request.path}\n".encode() + body).hexdigest()
    try:
        claim = await ctx.state.claim(token.name, key, request_hash, time.time())
    except Exception as exc:
        raise ConsentStoreError(f"idempotency keys: {exc}") from exc
    if claim.state == "mismatch":
        raise ApiError(422, "this Idempotency-Key was used with another request; use a new key")
    if claim.state == "busy":
        raise ApiError(409, "the first request with this Idempotency-Key is still being answered", Retry_After="1")
    if claim.state == "done":
        assert claim.status is not None
        assert claim.body is not None
        return web.Response(
            status=claim.status,
            text=claim.body,
            content_type="application/json",
            headers={"Idempotent-Replayed": "true"},
        )
    try:
        response = await handler(request, token)
    except ApiError as error:
        response = _error_response(error)
    except ConsentInputError as exc:
        response = _error_response(ApiError(422, str(exc)))
    except BaseException:
        # Not answered (store down, cancelled): the key is free again, so a retry records.
        await asyncio.shield(ctx.state.release(token.name, key))
        raise
    if response.status >= 500:
        await ctx.state.release(token.name, key)
        return response
    assert response.text is not None
    await ctx.state.finish(token.name, key, response.status, response.text)
    return response


def _store(ctx: ApiContext) -> ConsentStore:
    store = ctx.consent()
    if store is None:
        raise ApiError(503, "no consent store is open")
    return store


def _client(request: web.Request) -> str | None:
    return request.remote


def _audit(ctx: ApiContext, request: web.Request, token: ApiToken, entry: dict[str, Any]) -> None:
    if ctx.audit is None:
        return
    line: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": "api",
        "token": token.name,
        "client": _client(request),
        "route": f"{request.method} {request.path}",
    }
    key = request.headers.get("Idempotency-Key")
    if key:
        line["idempotency_key"] = key[:200]
    line.update(entry)
    ctx.audit.write(line)


# ---- JSON bodies --------------------------------------------------------------------------------


def _row_from_json(data: Any, fixed: dict[str, str]) -> dict[str, str]:
    """A JSON object to the text fields of a CSV row (what ``event_from_row`` reads)."""
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ApiError(422, f"unknown field(s): {', '.join(unknown)}; known: {', '.join(CSV_COLUMNS)}")
    row: dict[str, str] = {}
    for name, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            row[name] = "yes" if value else "no"
        elif isinstance(value, str):
            row[name] = value
        else:
            raise ApiError(422, f"{name} must be a string{' or a boolean' if name == 'objection_offered' else ''}")
    for name, value in fixed.items():
        given = row.get(name)
        if name == "event" and given and given != value:
            raise ApiError(422, f"this route records {value} events; leave event out or send it to /v1/events")
        if name == "method":
            row.setdefault(name, value)  # a default: the caller may name how it came about
        else:
            row[name] = value
    return row


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    """The body, read block by block: past ``limit`` bytes it stops with 413 at once, before
    the rest is read (a declared Content-Length over it is refused without reading)."""
    if _BODY in request:
        return request[_BODY]
    too_large = ApiError(413, f"a body here is at most {limit} bytes; split a larger import")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    blocks: list[bytes] = []
    size = 0
    async for block in request.content.iter_chunked(64 * 1024):
        size += len(block)
        if size > limit:
            raise too_large
        blocks.append(block)
    request[_BODY] = body = b"".join(blocks)
    return body


async def _json_body(request: web.Request, limit: int) -> Any:
    body = await _read_bounded(request, limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from exc


# ---- handlers -----------------------------------------------------------------------------------


class ApiServer:
    """The API site on ``api.address``, started and stopped by the app."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.bound: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        address = self.ctx.config().address
        assert address is not None
        self._runner, self.bound = await start_site(build_api_app(self.ctx), address, "the consent API")
        log.info("consent API on %s", address)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def build_api_app(ctx: ApiContext) -> web.Application:
    from proxy.api.openapi import openapi_document

    # Bodies are read by _read_bounded with the route's own limit; this only bounds anything
    # aiohttp itself would buffer.
    app = web.Application(client_max_size=int(ctx.config().max_body) + 1)

    async def record(request: web.Request, token: ApiToken, fixed: dict[str, str]) -> web.Response:
        data = await _json_body(request, int(ctx.config().max_body))
        event = event_from_row(_row_from_json(data, fixed))
        (stored,) = await _store(ctx).add(event)
        _audit(
            ctx,
            request,
            token,
            {"action": stored.kind, "recipient": stored.label, "record": stored.id, "method": stored.method},
        )
        return web.json_response({"event": stored.as_dict()}, status=201)

    async def post_event(request: web.Request, token: ApiToken) -> web.Response:
        return await record(request, token, {})

    async def post_opt_out(request: web.Request, token: ApiToken) -> web.Response:
        return await record(request, token, {"event": OPTED_OUT, "method": "api"})

    async def post_suppression(request: web.Request, token: ApiToken) -> web.Response:
        return await record(request, token, {"event": SUPPRESSED, "method": "api"})

    async def get_status(request: web.Request, token: ApiToken) -> web.Response:
        address = request.match_info["address"]
        topic = request.query.get("topic", "*")
        sender = request.query.get("sender", "*")
        at = parse_time(request.query["at"]) if request.query.get("at") else None
        basis = await _store(ctx).basis(address, topic, sender, at=at, rules=ctx.rules())
        return web.json_response(
            {
                "address": address,
                "topic": topic,
                "sender": sender,
                "allowed": basis.allowed,
                "basis": basis.as_dict(),
            }
        )

    async def get_history(request: web.Request, token: ApiToken) -> web.Response:
        address = request.match_info["address"]
        at = parse_time(request.query["at"]) if request.query.get("at") else None
        events = await _store(ctx).history(address, at=at)
        return web.json_response({"address": address, "events": [e.as_dict() for e in events]})

    async def post_import(request: web.Request, token: ApiToken) -> web.Response:
        limit = int(ctx.config().max_import)
        kind = request.content_type
        if kind not in ("application/x-ndjson", "application/jsonl", "text/csv"):
            raise ApiError(415, "send application/x-ndjson (one JSON object a line) or text/csv")
        body = await _read_bounded(request, limit)
        # Checking 100,000 rows takes seconds of CPU: off the event loop, which serves SMTP too.
        events, problems = await asyncio.to_thread(_parse_import, body, kind)
        if problems:
            more = f" (first {MAX_PROBLEMS} shown)" if len(problems) > MAX_PROBLEMS else ""
            raise ApiError(
                422,
                f"{len(problems)} problem(s){more}; nothing was imported",
                [str(p) for p in problems[:MAX_PROBLEMS]],
            )
        count = await _store(ctx).import_events(events)
        _audit(ctx, request, token, {"action": "import", "count": count, "format": kind})
        return web.json_response({"imported": count})

    async def get_openapi(request: web.Request) -> web.Response:
        return web.Response(text=dumps_document(openapi_document()), content_type="application/json")

    app.router.add_get("/openapi.json", get_openapi)
    app.router.add_post("/v1/events", _route(ctx, "write", post_event))
    app.router.add_post("/v1/opt-outs", _route(ctx, "write", post_opt_out))
    app.router.add_post("/v1/suppressions", _route(ctx, "write", post_suppression))
    app.router.add_post(IMPORT_PATH, _route(ctx, "write", post_import))
    app.router.add_get("/v1/addresses/{address}/status", _route(ctx, "read", get_status))
    app.router.add_get("/v1/addresses/{address}/history", _route(ctx, "read", get_history))
    return app


def dumps_document(document: dict[str, Any]) -> str:
    """The one spelling of the document, served and committed alike."""
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def _parse_import(body: bytes, kind: str) -> tuple[list[ConsentEvent], list[CsvProblem]]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the import is not UTF-8: {exc}") from exc
    events: list[ConsentEvent] = []
    problems: list[CsvProblem] = []
    if kind == "text/csv":
        for item in iter_csv(io.StringIO(text, newline="")):
            (problems if isinstance(item, CsvProblem) else events).append(item)  # type: ignore[arg-type]
        return events, problems
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            problems.append(CsvProblem(number, f"not JSON: {exc}"))
            continue
        try:
            events.append(event_from_row(_row_from_json(data, {})))
        except ApiError as exc:
            problems.append(CsvProblem(number, exc.message))
        except ConsentInputError as exc:
            problems.append(CsvProblem(number, str(exc)))
    return events, problems
