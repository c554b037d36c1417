"""The test DNS server answers like a real one (it is a fixture other tests rely on)."""

from __future__ import annotations

import dns.asyncresolver
import dns.resolver
import pytest

from tests.dnsserver import DNSServer


async def test_answers_records_nxdomain_and_nodata_over_udp_and_tcp() -> None:
    server = await DNSServer(
        {
            ("example.com", "MX"): ["10 mx1.example.com.", "20 mx2.example.com."],
            ("example.com", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"'],
            ("2.0.0.127.zen.test", "A"): ["127.0.0.2"],
        }
    ).start()
    try:
        resolver = server.resolver()
        mx = await resolver.resolve("example.com", "MX")
        assert sorted(str(r.exchange) for r in mx) == ["mx1.example.com.", "mx2.example.com."]
        txt = await resolver.resolve("example.com", "TXT", tcp=True)
        assert b"".join(txt[0].strings) == b"v=spf1 ip4:192.0.2.1 -all"
        listed = await resolver.resolve("2.0.0.127.zen.test", "A")
        assert listed[0].address == "127.0.0.2"
        with pytest.raises(dns.resolver.NXDOMAIN):
            await resolver.resolve("3.0.0.127.zen.test", "A")
        with pytest.raises(dns.resolver.NoAnswer):
            await resolver.resolve("example.com", "AAAA")
        assert ("example.com", "MX") in server.queries
    finally:
        await server.stop()
