"""The benchmark's yardstick: the simplest correct SMTP relay, aiosmtpd in and aiosmtplib out, no policies.

It keeps the one promise sendguard also keeps: the client's final dot gets 250 only after the upstream
answered 250 for the message (the upstream's own reply is passed back). Everything else a real relay needs
(limits, policies, audit, metrics, per-RCPT lockstep) is left out on purpose, so the gap between this and
sendguard is the price of those features, not of Python or of the two libraries.

To be fair to it, upstream connections are pooled: one shared LIFO pool of connected aiosmtplib clients,
with no cap on connections (the load generator's session count bounds it) and no cap on messages per
connection. A connection is used by one transaction at a time and goes back to the pool after a 2xx.

    python bench/naive_relay.py --listen 127.0.0.1:2526 --upstream 127.0.0.1:2527
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

log = logging.getLogger("naive_relay")


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class UpstreamPool:
    """Idle upstream connections, most recently used first (a warm socket is the best one to reuse)."""

    def __init__(self, host: str, port: int, helo_name: str, timeout: float) -> None:
        self.host, self.port, self.helo_name, self.timeout = host, port, helo_name, timeout
        self._idle: list[aiosmtplib.SMTP] = []
        self.connects = 0

    async def take(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.helo_name,
            timeout=self.timeout,
            use_tls=False,
            start_tls=False,  # the benchmark's upstream is plain loopback, like sendguard's `tls: none`
        )
        await client.connect()
        self.connects += 1
        return client

    def give_back(self, client: aiosmtplib.SMTP, *, healthy: bool) -> None:
        if healthy and client.is_connected:
            self._idle.append(client)
        else:
            client.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(client.quit(), 5)
            client.close()


class ForwardAtDot:
    """aiosmtpd handler: accept MAIL and RCPT locally, relay the whole transaction at the final dot."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            client = await self.pool.take()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.error("cannot connect to the upstream: %s", exc)
            return "451 4.4.1 Upstream unavailable; try again later"
        try:
            # sendmail says MAIL, every RCPT and DATA; it dot-stuffs and normalises line endings.
            sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from  # the null sender is ""
            _, message = await client.sendmail(sender, envelope.rcpt_tos, envelope.original_content or b"")
        except aiosmtplib.SMTPResponseException as exc:
            # The upstream refused (all recipients, or the message): pass its answer on. The
            # connection's state is unknown after a refusal mid-transaction, so it is not reused.
            self.pool.give_back(client, healthy=False)
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            self.pool.give_back(client, healthy=False)
            log.error("upstream lost during the transaction: %s", exc)
            return "451 4.4.2 Upstream connection lost; try again later"
        self.pool.give_back(client, healthy=True)
        return f"250 {message}"


async def run(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    # aiosmtpd calls socket.getfqdn() for every session when no hostname is given; resolve it once.
    hostname = await asyncio.to_thread(socket.getfqdn)
    pool = UpstreamPool(upstream[0], upstream[1], helo_name=hostname, timeout=60)
    handler = ForwardAtDot(pool)

    def factory() -> Any:
        return SMTP(handler, hostname=hostname, decode_data=False, enable_SMTPUTF8=True, loop=loop)

    server = await loop.create_server(factory, host=listen[0], port=listen[1], reuse_address=True)
    log.info("listening on %s:%s, upstream %s:%s", *listen, *upstream)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    await pool.close()
    log.info("stopped after %d upstream connection(s)", pool.connects)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT to accept SMTP on")
    parser.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT of the upstream SMTP server")
    args = parser.parse_args()
    # aiosmtpd logs every command at INFO ("mail.log"); a benchmark must not pay for that.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.setLevel(logging.INFO)  # its own few lines (start, stop) are worth keeping
    asyncio.run(run(args.listen, args.upstream))


if __name__ == "__main__":
    main()
