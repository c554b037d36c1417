"""The public unsubscribe pages (aiohttp, in sendguard's event loop).

Routes, under the path of ``unsubscribe.base_url``:

* ``POST /u/TOKEN`` with ``List-Unsubscribe=One-Click`` (form-urlencoded or multipart): the
  RFC 8058 one-click request from a mailbox provider. The opt-out is recorded at once and the
  answer is ``200`` with a short text: no redirect, no cookie, no login (RFC 8058 section 3.2).
  Rate limited per token and by invalid attempts, not per client IP, because Gmail and Yahoo
  send every recipient's POST from a few shared addresses.
* ``GET /u/TOKEN``: a confirmation page with one button. A GET never unsubscribes: corporate
  link scanners and mail previews fetch every link in a message.
* ``POST /u/TOKEN`` with the button's form (CSRF value): records the opt-out, shows the result.
* ``GET /p/TOKEN``: the recipient's own page: the consent history with its evidence, the
  current status per topic, forms to change each topic, to withdraw everything and (with
  ``stores.consent.erasure_key``) to erase the address's data, and a JSON download (AVG/GDPR
  art. 15, 16, 17, 20, 21). Only with a valid, unexpired token.
* ``POST /p/TOKEN/topics``, ``POST /p/TOKEN/withdraw``, ``POST /p/TOKEN/erase``: the forms
  (each with its own CSRF value); answered with 303 to the
  page (post/redirect/get, so a reload does not post again).
* ``GET /p/TOKEN/data.json``: the download.

Every response carries ``Content-Security-Policy: default-src 'none'`` (plus the stylesheet and
same-origin forms), ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer`` (the token in
the URL must not leak to other sites), ``X-Content-Type-Options: nosniff`` and
``Cache-Control: no-store``. A token that is not valid gets a plain 404 page that reveals
nothing. CSRF values are HMACs of the token, the form's purpose and the time (no cookies).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.schema import IPNetwork, address_in
from proxy.stores.consent import ANY, SUPPRESSED, ConsentEvent, ConsentInputError, ConsentStoreError, format_time
from proxy.unsubscribe import UnsubscribeService, UnsubscribeToken
from proxy.unsubscribe import templates as T
from proxy.unsubscribe.tokens import MAX_TOKEN_CHARS, TokenError, TokenExpired

__all__ = ("UnsubscribeServers", "build_unsubscribe_app", "client_ip", "pick_language")

log = logging.getLogger("sendguard.unsubscribe.web")

MAX_BODY = 64 * 1024
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_HTML = "text/html"
_DONE_KEYS = frozenset({"opted_in", "opted_out", "withdrawn", "unchanged", "erased"})
_SERVICE = web.AppKey("service", UnsubscribeService)


# ---- request helpers -----------------------------------------------------------------------------


def client_ip(request: web.BaseRequest, trusted_proxies: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer, or behind a trusted reverse proxy the last address in
    X-Forwarded-For that is not itself a trusted proxy (earlier entries are the client's word)."""
    peer = request.remote or ""
    if not trusted_proxies or not address_in(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for value in request.headers.getall("X-Forwarded-For", []) for hop in value.split(",")]
    for hop in reversed([h for h in hops if h]):
        if address_in(hop, trusted_proxies):
            continue
        try:
            return str(ipaddress.ip_address(hop))
        except ValueError:
            return peer
    return peer


def pick_language(request: web.BaseRequest, languages: tuple[str, ...], chosen: str | None = None) -> str:
    """``chosen`` (a lang= parameter) when offered, else the best Accept-Language match, else the first."""
    if chosen in languages:
        return chosen
    best: tuple[float, int, str] | None = None
    header = request.headers.get("Accept-Language", "")[:500]
    for position, item in enumerate(header.split(",")):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in languages and quality > 0 and (best is None or (quality, -position) > (best[0], best[1])):
            best = (quality, -position, primary)
    return best[2] if best else languages[0]


@dataclass
class _Request:
    """What every handler works out first."""

    service: UnsubscribeService
    request: web.Request
    endpoint: str
    ip: str
    lang: str

    def count(self, outcome: str) -> None:
        self.service.metrics.requests.labels(self.endpoint, outcome).inc()

    def layout(self, *, switch_path: str | None = None) -> T.Layout:
        config = self.service.config
        switch: list[tuple[str, str]] = []
        if switch_path is not None and len(config.languages) > 1:
            switch = [(language, T.with_query(switch_path, lang=language)) for language in config.languages]
        return T.Layout(
            lang=self.lang,
            stylesheet=self.service.path("assets", "sendguard.css"),
            switch=switch,
            company=config.company,
            contact=config.contact,
            privacy_url=config.privacy_url,
        )

    def page(self, body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(text=body, status=status, content_type=_HTML, charset="utf-8", headers=headers)

    def message(
        self, status: int, title: str, text: str, headers: dict[str, str] | None = None, **values: str
    ) -> web.Response:
        return self.page(T.message_page(self.layout(), title, text, **values), status, headers)

    def not_found(self, outcome: str = "invalid_token") -> web.Response:
        self.count(outcome)
        return self.message(404, "invalid_title", "invalid_text")

    def limited(self, wait: float) -> web.Response:
        self.count("rate_limited")
        seconds = str(max(1, int(wait + 0.999)))
        return self.message(429, "rate_title", "rate_text", {"Retry-After": seconds}, seconds=seconds)

    def unavailable(self, error: Exception) -> web.Response:
        self.count("store_error")
        log.error("unsubscribe %s: consent store unavailable: %s", self.endpoint, error)
        return self.message(503, "store_title", "store_text", {"Retry-After": "120"})

    @property
    def user_agent(self) -> str | None:
        return self.request.headers.get("User-Agent")


def _start(request: web.Request, endpoint: str, lang_param: str | None = None) -> _Request:
    service = request.app[_SERVICE]
    config = service.config
    ip = client_ip(request, config.trusted_proxies)
    return _Request(service, request, endpoint, ip, pick_language(request, config.languages, lang_param))


def _gate(ctx: _Request, token_text: str, *, per_ip: bool) -> web.Response | None:
    """Rate limits before any work: a client that sent many invalid tokens is refused for a
    while, but only for more invalid ones (Gmail and Yahoo send everyone's one-click POSTs from
    a few shared addresses: a valid token is never blocked by someone else's junk); page
    traffic is limited per IP; every request naming a token, per token."""
    limits = ctx.service.limits
    wait = limits["invalid"].blocked(ctx.ip)
    if wait and not ctx.service.is_token(token_text):
        return ctx.limited(wait)
    if per_ip:
        wait = limits["ip"].hit(ctx.ip)
        if wait:
            return ctx.limited(wait)
    if len(token_text) <= MAX_TOKEN_CHARS:
        wait = limits["token"].hit(token_text)
        if wait:
            return ctx.limited(wait)
    return None


def _read(ctx: _Request, token_text: str, *, allow_expired: bool) -> UnsubscribeToken | web.Response:
    """The token, or the 404 page (counted against the client's invalid-token budget)."""
    try:
        token = ctx.service.read(token_text, allow_expired=allow_expired)
        ctx.service.subject(token)
    except TokenExpired:
        ctx.count("expired_token")
        return ctx.message(404, "expired_title", "expired_text")
    except TokenError:
        ctx.service.limits["invalid"].hit(ctx.ip)
        return ctx.not_found()
    return token


def _topic_label(ctx: _Request, topic: str) -> str:
    return T.topic_name(ctx.lang, topic, _names(ctx.service))


def _names(service: UnsubscribeService) -> dict[str, dict[str, str]]:
    return {topic.id: {"nl": topic.nl, "en": topic.en} for topic in service.config.topics}


def _sender_label(ctx: _Request, token: UnsubscribeToken) -> str:
    if token.sender and token.sender != ANY:
        return token.sender
    return ctx.service.config.company


_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


async def _form(request: web.Request) -> dict[str, str] | None:
    """The posted fields: urlencoded or multipart (RFC 8058 section 3.1 names both), or a body
    in urlencoded form without a form content type; None when the body cannot be read."""
    try:
        if request.content_type in _FORM_TYPES:
            posted = await request.post()
            return {key: value for key, value in posted.items() if isinstance(value, str)}
        raw = await request.read()
        return dict(urllib.parse.parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    except (ValueError, UnicodeDecodeError, web.HTTPException):
        return None


# ---- /u/TOKEN --------------------------------------------------------------------------------------


async def confirm_page(request: web.Request) -> web.Response:
    token_text = request.match_info["token"]
    ctx = _start(request, "confirm_page", request.query.get("lang"))
    refused = _gate(ctx, token_text, per_ip=True)
    if refused is not None:
        return refused
    token = _read(ctx, token_text, allow_expired=True)
    if isinstance(token, web.Response):
        return token
    service = ctx.service
    expired = service.expired(token)
    ctx.count("ok")
    page_link = None if expired else T.with_query(service.path("p", token_text), lang=ctx.lang)
    body = T.confirm_page(
        ctx.layout(switch_path=service.path("u", token_text)),
        action=service.path("u", token_text),
        csrf=service.codec.csrf(token_text, "unsubscribe"),
        address=token.recipient,
        sender=_sender_label(ctx, token),
        topic=_topic_label(ctx, token.topic),
        page_link=page_link,
    )
    return ctx.page(body)


async def unsubscribe_post(request: web.Request) -> web.Response:
    """The one-click POST (RFC 8058) or the confirmation page's button."""
    token_text = request.match_info["token"]
    form = await _form(request)
    one_click = form is not None and form.get("List-Unsubscribe") == "One-Click"
    lang_param = form.get("lang") if form else None
    ctx = _start(request, "one_click" if one_click else "confirm_post", lang_param)
    refused = _gate(ctx, token_text, per_ip=not one_click)
    if refused is not None:
        return refused if not one_click else _plain(refused.status, "Too many requests\n", refused.headers)
    token = _read(ctx, token_text, allow_expired=True)
    if isinstance(token, web.Response):
        return token if not one_click else _plain(404, "Not found\n")
    service = ctx.service
    if form is None or (not one_click and "csrf" not in form):
        ctx.count("bad_request")
        return ctx.message(400, "bad_title", "bad_text")
    if not one_click and not service.codec.check_csrf(form.get("csrf", ""), token_text, "unsubscribe"):
        ctx.count("csrf")
        return ctx.message(403, "csrf_title", "csrf_text")
    try:
        result = await service.opt_out(
            token,
            method="one_click" if one_click else "link",
            channel="https",
            ip=ctx.ip,
            user_agent=ctx.user_agent,
        )
    except (ConsentStoreError, ConsentInputError) as error:
        if one_click:
            ctx.count("store_error")
            log.error("one-click unsubscribe could not be recorded: %s", error)
            return _plain(503, "Temporarily unavailable; try again later\n", {"Retry-After": "300"})
        return ctx.unavailable(error)
    ctx.count("ok")
    if one_click:
        # RFC 8058 section 3.2: a plain success, no redirect.
        return _plain(200, "Unsubscribed\n")
    page_link = None if service.expired(token) else T.with_query(service.path("p", token_text), lang=ctx.lang)
    body = T.done_page(
        ctx.layout(),
        address=token.recipient,
        sender=_sender_label(ctx, token),
        topic=_topic_label(ctx, result.record.topic if not result.recorded else token.topic),
        repeated=not result.recorded,
        page_link=page_link,
    )
    return ctx.page(body)


def _plain(status: int, body: str, headers: Any = None) -> web.Response:
    extra = {"Retry-After": headers["Retry-After"]} if headers and "Retry-After" in headers else None
    return web.Response(status=status, text=body, content_type="text/plain", charset="utf-8", headers=extra)


# ---- /p/TOKEN ---------------------------------------------------------------------------------------


async def _page_token(ctx: _Request, token_text: str) -> UnsubscribeToken | web.Response:
    refused = _gate(ctx, token_text, per_ip=True)
    if refused is not None:
        return refused
    return _read(ctx, token_text, allow_expired=False)


async def recipient_page(request: web.Request) -> web.Response:
    token_text = request.match_info["token"]
    ctx = _start(request, "recipient_page", request.query.get("lang"))
    token = await _page_token(ctx, token_text)
    if isinstance(token, web.Response):
        return token
    service = ctx.service
    try:
        events = await service.history(token)
    except ConsentStoreError as error:
        return ctx.unavailable(error)
    names = _names(service)
    rows = [
        T.TopicRow(topic, T.topic_name(ctx.lang, topic, names), service.basis(token, events, topic))
        for topic in service.topics(token, events)
    ]
    notice = _notice(ctx, token, request.query.get("done"), request.query.get("topic"), rows)
    body = T.recipient_page(
        ctx.layout(switch_path=service.path("p", token_text)),
        address=token.recipient,
        sender=_sender_label(ctx, token),
        rows=rows,
        events=events,
        topic_action=service.path("p", token_text) + "/topics",
        withdraw_action=service.path("p", token_text) + "/withdraw",
        download_link=service.path("p", token_text) + "/data.json",
        csrf_topics=service.codec.csrf(token_text, "preferences"),
        csrf_withdraw=service.codec.csrf(token_text, "withdraw"),
        notice=notice,
        names=names,
        erase_action=service.path("p", token_text) + "/erase" if service.store().erasure_key is not None else None,
        csrf_erase=service.codec.csrf(token_text, "erase"),
        erased_at=_erased_at(events),
    )
    ctx.count("ok")
    return ctx.page(body)


def _notice(
    ctx: _Request, token: UnsubscribeToken, done: str | None, topic: str | None, rows: list[T.TopicRow]
) -> str | None:
    """The line shown after a change (post/redirect/get); only known keys and listed topics."""
    if done not in _DONE_KEYS:
        return None
    if done == "withdrawn":
        return T.text(ctx.lang, "done_withdrawn", sender=_sender_label(ctx, token))
    if done == "unchanged":
        return T.text(ctx.lang, "done_unchanged")
    if done == "erased":
        return T.text(ctx.lang, "done_erased")
    row = next((r for r in rows if r.topic == topic), None)
    if row is None:
        return None
    return T.text(ctx.lang, f"done_{done}", topic=row.name)


async def _form_post(
    request: web.Request, endpoint: str, purpose: str
) -> tuple[_Request, UnsubscribeToken, dict[str, str]] | web.Response:
    token_text = request.match_info["token"]
    form = await _form(request)
    ctx = _start(request, endpoint, form.get("lang") if form else None)
    token = await _page_token(ctx, token_text)
    if isinstance(token, web.Response):
        return token
    if form is None:
        ctx.count("bad_request")
        return ctx.message(400, "bad_title", "bad_text")
    if not ctx.service.codec.check_csrf(form.get("csrf", ""), token_text, purpose):
        ctx.count("csrf")
        return ctx.message(403, "csrf_title", "csrf_text")
    return ctx, token, form


def _back(ctx: _Request, **params: str) -> web.Response:
    token_text = ctx.request.match_info["token"]
    location = T.with_query(ctx.service.path("p", token_text), lang=ctx.lang, **params)
    return web.Response(status=303, headers={"Location": location})


async def change_topic(request: web.Request) -> web.Response:
    checked = await _form_post(request, "topics", "preferences")
    if isinstance(checked, web.Response):
        return checked
    ctx, token, form = checked
    service = ctx.service
    action = form.get("action")
    try:
        events = await service.history(token)
        offered = service.topics(token, events)
        topic = form.get("topic", "")
        if action not in ("opt_in", "opt_out") or topic not in offered:
            ctx.count("bad_request")
            return ctx.message(400, "bad_title", "bad_text")
        if action == "opt_in":
            await service.opt_in(token, topic, ip=ctx.ip, user_agent=ctx.user_agent)
            done = "opted_in"
        else:
            result = await service.topic_opt_out(token, topic, ip=ctx.ip, user_agent=ctx.user_agent)
            done = "opted_out" if result.recorded else "unchanged"
    except (ConsentStoreError, ConsentInputError) as error:
        return ctx.unavailable(error)
    ctx.count("ok")
    return _back(ctx, done=done, topic=topic)


async def withdraw(request: web.Request) -> web.Response:
    checked = await _form_post(request, "withdraw", "withdraw")
    if isinstance(checked, web.Response):
        return checked
    ctx, token, _ = checked
    try:
        result = await ctx.service.opt_out(
            token, method="preference_center", channel="https", ip=ctx.ip, user_agent=ctx.user_agent, topic=ANY
        )
    except (ConsentStoreError, ConsentInputError) as error:
        return ctx.unavailable(error)
    if result.recorded:
        ctx.service.metrics.consent_changes.labels("opted_out").inc()
    ctx.count("ok")
    return _back(ctx, done="withdrawn" if result.recorded else "unchanged")


def _erased_at(events: list[ConsentEvent]) -> datetime | None:
    """When the address was last erased (its erasure suppression), or None."""
    times = [e.recorded_at for e in events if e.kind == SUPPRESSED and e.method == "erasure" and e.recorded_at]
    return max(times) if times else None


async def erase(request: web.Request) -> web.Response:
    """The erase button (AVG art. 17), behind the same CSRF check as every form of the page."""
    checked = await _form_post(request, "erase", "erase")
    if isinstance(checked, web.Response):
        return checked
    ctx, token, _ = checked
    try:
        await ctx.service.erase(token)
    except (ConsentStoreError, ConsentInputError) as error:
        return ctx.unavailable(error)
    ctx.count("ok")
    return _back(ctx, done="erased")


async def download(request: web.Request) -> web.Response:
    token_text = request.match_info["token"]
    ctx = _start(request, "download", request.query.get("lang"))
    token = await _page_token(ctx, token_text)
    if isinstance(token, web.Response):
        return token
    service = ctx.service
    try:
        events = await service.history(token)
    except ConsentStoreError as error:
        return ctx.unavailable(error)
    config = service.config
    now = datetime.now(UTC)
    document = {
        "about": token.recipient,
        "generated_at": format_time(now),
        "controller": {"name": config.company, "contact": config.contact, "privacy_statement": config.privacy_url},
        "sender": token.sender,
        "explanation": (
            "Every record sendguard keeps about this address (and its domain) for sending commercial e-mail, "
            "oldest first, and the resulting status per topic for mail from this sender. Records are never "
            "changed or deleted: each change is a new record with its evidence."
        ),
        "status": [
            {"topic": topic, **service.basis(token, events, topic).as_dict()}
            for topic in [ANY, *service.topics(token, events)]
        ],
        "records": [event.as_dict() for event in events],
    }
    ctx.count("ok")
    filename = f"sendguard-data-{now.strftime('%Y%m%d')}.json"
    return web.Response(
        body=json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8"),
        content_type="application/json",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(text=T.STYLESHEET, content_type="text/css", charset="utf-8")


# ---- the application --------------------------------------------------------------------------------


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if (request.app[_SERVICE].config.base_url or "").startswith("https://"):
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    response.headers["Server"] = "sendguard"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Router and framework errors (404, 405, 413) and crashes as plain pages, never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        ctx = _start(request, "confirm_page")
        key = "invalid" if error.status in (404, 405) else "bad"
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return ctx.message(404 if error.status == 404 else error.status, f"{key}_title", f"{key}_text", headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unsubscribe page %s failed", request.match_info.route.name or "?")  # never log the token
        ctx = _start(request, "confirm_page")
        return ctx.message(500, "error_title", "error_text")


def build_unsubscribe_app(service: UnsubscribeService) -> web.Application:
    """The aiohttp application of the unsubscribe pages; serve it on ``unsubscribe.listen``."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors])
    app[_SERVICE] = service
    app.on_response_prepare.append(_security_headers)
    base = service.config.base_path
    app.router.add_get(f"{base}/u/{{token}}", confirm_page, allow_head=False)
    app.router.add_post(f"{base}/u/{{token}}", unsubscribe_post)
    app.router.add_get(f"{base}/p/{{token}}", recipient_page, allow_head=False)
    app.router.add_post(f"{base}/p/{{token}}/topics", change_topic)
    app.router.add_post(f"{base}/p/{{token}}/withdraw", withdraw)
    app.router.add_post(f"{base}/p/{{token}}/erase", erase)
    app.router.add_get(f"{base}/p/{{token}}/data.json", download, allow_head=False)
    app.router.add_get(f"{base}/assets/sendguard.css", stylesheet)
    return app


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


class UnsubscribeServers:
    """The unsubscribe HTTP site on ``unsubscribe.listen`` and, when configured, the mailto
    SMTP listener on ``unsubscribe.mailto.listen``: started and stopped together by the app."""

    def __init__(self, service: UnsubscribeService) -> None:
        self.service = service
        self.http_bound: tuple[str, int] | None = None
        self.mailto_bound: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None
        self._mailto: asyncio.Server | None = None

    async def start(self) -> None:
        from proxy.unsubscribe.mailto import start_mailto_listener

        config = self.service.config
        context = _tls_context(config.tls_cert, config.tls_key) if config.tls_cert and config.tls_key else None
        runner = web.AppRunner(build_unsubscribe_app(self.service), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.listen.host, config.listen.port, ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno, f"cannot listen on {config.listen} for the unsubscribe pages: {exc.strerror}"
            ) from exc
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None)  # asyncio's Server and uvloop's both have them
        if sockets:
            host, port = sockets[0].getsockname()[:2]
            self.http_bound = (str(host), int(port))
        if config.mailto is not None and config.mailto.listen is not None:
            try:
                self._mailto = await start_mailto_listener(
                    self.service, config.mailto.listen, self.service.complaints_address
                )
            except BaseException:
                await self.stop()
                raise
            host, port = self._mailto.sockets[0].getsockname()[:2]
            self.mailto_bound = (str(host), int(port))
        log.info(
            "unsubscribe pages on %s (links %s)%s",
            "{}:{}".format(*self.http_bound) if self.http_bound else config.listen,
            config.base_url,
            f"; mailto listener on {self.mailto_bound[0]}:{self.mailto_bound[1]}" if self.mailto_bound else "",
        )

    async def stop(self) -> None:
        if self._mailto is not None:
            self._mailto.close()
            await self._mailto.wait_closed()
            self._mailto = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
