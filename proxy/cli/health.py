"""``sendguard health --config FILE``: ask the running process's ``/readyz`` at the HTTP
address its config names; exit 0 when ready, 1 when not (or not answering), 2 for a config
without an HTTP address.

The container's HEALTHCHECK runs it, so the check follows ``http.address`` instead of a port
written into the Dockerfile. Only the ``http:`` section is read (``read_section``): the check
does not depend on the rest of the config, or its certificate files, being readable.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from proxy.cli.dns import read_section
from proxy.config.settings import HTTPConfig

__all__ = ("add_health_parser", "readyz_url", "run_health")

# A process listening on every address answers on loopback too.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def add_health_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    health = commands.add_parser("health", help="ask the running proxy's /readyz (for container healthchecks)")
    health.add_argument("--config", required=True, help="YAML config file (its http.address is asked)")
    health.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    health.add_argument("--live", action="store_true", help="ask /healthz (alive) instead of /readyz (ready)")


def readyz_url(config_path: str, path: str = "/readyz") -> str | None:
    """The URL of ``path`` on the config's HTTP address; None when the config disables HTTP."""
    address = read_section(config_path, "http", HTTPConfig).address
    if address is None:
        return None
    host = _WILDCARDS.get(address.host, address.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{address.port}{path}"


def run_health(args: argparse.Namespace) -> int:
    url = readyz_url(args.config, "/healthz" if args.live else "/readyz")
    if url is None:
        print("sendguard health: http.address is null in the config: nothing to ask", file=sys.stderr)
        return 2
    try:
        # The URL is built above: http, to the configured address; never a scheme from input.
        with urllib.request.urlopen(url, timeout=args.timeout) as response:  # noqa: S310
            body = response.read().decode("utf-8", "replace")
            status = response.status
    except urllib.error.HTTPError as exc:  # 503: not ready, with the reasons
        body, status = exc.read().decode("utf-8", "replace"), exc.code
    except (OSError, TimeoutError) as exc:
        print(f"sendguard health: {url}: {exc}", file=sys.stderr)
        return 1
    if status == 200:
        return 0
    try:
        problems = json.loads(body).get("problems", [])
    except ValueError:
        problems = [body[:200]]
    print(f"sendguard health: {url}: {status} {'; '.join(map(str, problems))}", file=sys.stderr)
    return 1
