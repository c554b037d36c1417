"""The HTTP side, in the same event loop as SMTP: /metrics, /healthz, /readyz."""

from __future__ import annotations

import json
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from proxy.observability.metrics import Metrics
from proxy.schema import HostPort

__all__ = ("HealthSource", "build_http_app", "start_site")


class HealthSource(Protocol):
    async def readiness(self) -> tuple[bool, dict[str, object]]: ...


_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def build_http_app(
    metrics: Metrics, health: HealthSource, *, registry: CollectorRegistry | None = None
) -> web.Application:
    """``registry``: what /metrics shows when not this process's own (the supervising parent
    shows every worker's, proxy/supervisor.py)."""
    # prometheus_client's own handler: the text format or OpenMetrics as the scraper's Accept
    # header asks (Prometheus asks for OpenMetrics first), gzip when Accept-Encoding allows.
    exposition = make_aiohttp_handler(registry or metrics.registry)

    async def metrics_view(request: web.Request) -> web.StreamResponse:
        response = await exposition(request)
        response.headers.update(_SECURITY_HEADERS)
        return response

    async def healthz(request: web.Request) -> web.Response:
        # Alive: the event loop answers. Nothing else is checked here on purpose, so a
        # restart is never triggered by a dependency that is down.
        return web.json_response({"status": "ok"}, headers=_SECURITY_HEADERS)

    async def readyz(request: web.Request) -> web.Response:
        ready, detail = await health.readiness()
        return web.Response(
            status=200 if ready else 503,
            text=json.dumps({"status": "ready" if ready else "not ready", **detail}),
            content_type="application/json",
            headers=_SECURITY_HEADERS,
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_site(app: web.Application, address: HostPort, what: str) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` on ``address``; the runner and the address bound (port 0 picks one). A
    failure to listen names the address and what it was for."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"cannot listen on {address} for {what}: {exc.strerror}") from exc
    server = site._server
    bound = (address.host, address.port)
    sockets = getattr(server, "sockets", None)  # asyncio's Server and uvloop's (event_loop: uvloop) have them
    if sockets:
        sockname = sockets[0].getsockname()
        bound = (str(sockname[0]), int(sockname[1]))
    return runner, bound
