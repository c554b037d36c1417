"""``sendguard dkim keygen`` and ``sendguard domain check``: the DNS side of sending, from a terminal.

* ``dkim keygen DOMAIN SELECTOR`` writes a new private key (mode 0600, never overwritten
  without ``--force``) and prints the TXT record to publish, split into strings of at
  most 255 bytes (RFC 1035 3.3.14) as an RSA-2048 key needs, and the config entry.
* ``domain check DOMAIN`` runs the sender-domain preflight (SPF covering the sending IPs,
  the DKIM key published and matching, DMARC, alignment) and prints pass/fail per item
  with the record seen and what to fix. Exit 0 when everything passes, 1 when something
  fails or the DNS did not answer, 2 for bad input.

The ``dkim:`` and ``dns:`` sections are read straight from the config file with the
same typed converter as the rest of the config, so a check does not depend on the
listeners' certificate files being in place.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import dns.resolver
import yaml

from proxy.reputation.dkim import (
    RECOMMENDED_RSA_BITS,
    Algorithm,
    DKIMConfig,
    DKIMKeyConfig,
    DKIMKeyError,
    KeyExpectation,
    Signer,
    dns_txt_strings,
    generate_private_key,
    load_key,
    write_private_key,
)
from proxy.reputation.preflight import OrgDomains, preflight, render_report
from proxy.reputation.resolver import DNSConfig, ResolverConfig, build_resolver
from proxy.schema import ConfigError, ConfigIssue, Converter, Duration, compose, is_invalid

__all__ = ("add_commands", "build_parser", "main", "read_section", "run")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
T = TypeVar("T")


def add_commands(commands: Any) -> None:
    """Add the ``dkim`` and ``domain`` sub-commands to sendguard's sub-parser set."""
    dkim_parser = commands.add_parser("dkim", help="DKIM keys")
    dkim_commands = dkim_parser.add_subparsers(dest="dkim_command", required=True, metavar="SUBCOMMAND")
    keygen = dkim_commands.add_parser("keygen", help="create a signing key and print the DNS record to publish")
    keygen.add_argument("domain", help="signing domain (d=), e.g. example.com")
    keygen.add_argument("selector", help="selector (s=), e.g. s2026")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa", help="key type (default: rsa)")
    keygen.add_argument(
        "--bits", type=int, default=RECOMMENDED_RSA_BITS, help="RSA key size, 1024 to 4096 (default: 2048)"
    )
    keygen.add_argument("--out", default="var/dkim", help="directory for the key file (default: var/dkim)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")

    domain_parser = commands.add_parser("domain", help="sender-domain DNS checks")
    domain_commands = domain_parser.add_subparsers(dest="domain_command", required=True, metavar="SUBCOMMAND")
    check = domain_commands.add_parser(
        "check", help="check SPF, DKIM, DMARC and alignment of a sender domain; exit 0 pass, 1 fail"
    )
    check.add_argument("domain", help="the From domain")
    check.add_argument("--config", help="take DKIM keys, sending IPs and the resolver from this config")
    check.add_argument("--ip", action="append", default=[], help="a public IP the upstream sends from (repeatable)")
    check.add_argument(
        "--selector", action="append", default=[], help="a DKIM selector to check besides the config's (repeatable)"
    )
    check.add_argument("--key-file", help="the private key the --selector must match (one --selector)")
    check.add_argument("--envelope-domain", help="domain of the envelope sender (default: the From domain)")
    check.add_argument("--nameserver", action="append", default=[], help="resolver to ask, IP or IP:PORT (repeatable)")
    check.add_argument("--timeout", type=float, default=5.0, help="seconds per lookup (default: 5)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendguard")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``dkim`` or ``domain`` command."""
    try:
        if args.command == "dkim":
            return _keygen(args)
        if args.command == "domain":
            return _domain_check(args)
    except ConfigError as exc:
        print(f"sendguard: the config has {len(exc.issues)} problem(s):", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return EXIT_BAD_INPUT
    raise ValueError(f"not a dns_cli command: {args.command}")


# ---- dkim keygen ----------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    algorithm: Algorithm = "rsa-sha256" if args.algorithm == "rsa" else "ed25519-sha256"
    try:
        key_config = DKIMKeyConfig(args.domain, args.selector, "-", algorithm)
    except ValueError as exc:
        print(f"sendguard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    directory = Path(args.out)
    path = directory / f"{key_config.domain}.{key_config.selector}.pem"
    try:
        pem = generate_private_key(algorithm, args.bits)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_key(path, pem, overwrite=args.force)
    except FileExistsError:
        print(f"sendguard: {path} exists; give --force to replace it (the old key stops verifying)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, OSError) as exc:
        print(f"sendguard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    key_config = DKIMKeyConfig(key_config.domain, key_config.selector, str(path), algorithm)
    loaded = load_key(key_config)
    strings = dns_txt_strings(loaded.dns_record())
    size = f"RSA {loaded.bits} bits" if loaded.bits else "Ed25519"
    quoted = "\n    ".join(f'"{part}"' for part in strings)
    print(f"wrote {path} ({size}, mode 0600)")
    print()
    print(f"Publish this TXT record in the DNS of {key_config.domain}:")
    print()
    print(f"{key_config.record_name}. IN TXT ( {quoted} )")
    print()
    print("Then add the key to the config (dkim.keys) and check it with: sendguard domain check", key_config.domain)
    print()
    print(f"  - domain: {key_config.domain}")
    print(f"    selector: {key_config.selector}")
    print(f"    key_file: {path.resolve()}")
    print(f"    algorithm: {algorithm}")
    return EXIT_OK


# ---- domain check ---------------------------------------------------------------------------


def read_section(path: str, key: str, cls: type[T]) -> T:
    """One top-level section of a config file, typed; its default when the file has none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(path, None, "", f"cannot read the file: {exc.strerror or exc}")]) from exc
    node = compose(text, path)
    converter = Converter(path)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                value = converter.convert(value_node, cls, key)
                if is_invalid(value) or converter.issues:
                    raise ConfigError(converter.issues)
                return value  # type: ignore[no-any-return]
    return cls()


def _domain_check(args: argparse.Namespace) -> int:
    dkim_config, dns_config = DKIMConfig(), DNSConfig()
    if args.config:
        dkim_config = read_section(args.config, "dkim", DKIMConfig)
        dns_config = read_section(args.config, "dns", DNSConfig)
    try:
        ips = [str(ipaddress.ip_address(ip)) for ip in args.ip] or list(dns_config.sending_ips)
        resolver_config = (
            ResolverConfig(tuple(args.nameserver), Duration(args.timeout)) if args.nameserver else dns_config.resolver
        )
        if args.key_file and len(args.selector) != 1:
            raise ValueError("--key-file needs exactly one --selector")
        signer = Signer.from_config(dkim_config)
        domain = args.domain.strip().rstrip(".").lower()
        expectations = signer.expectations_for(domain)
        for selector in args.selector:
            public_key: str | None = None
            key_algorithm: Algorithm = "rsa-sha256"
            if args.key_file:
                probe = DKIMKeyConfig(domain, selector, args.key_file, "rsa-sha256")
                try:
                    loaded = load_key(probe)
                except ValueError:
                    loaded = load_key(DKIMKeyConfig(domain, selector, args.key_file, "ed25519-sha256"))
                public_key, key_algorithm = loaded.public_key, loaded.config.algorithm
            expectations.append(KeyExpectation(domain, selector.lower(), key_algorithm, public_key))
        resolver = build_resolver(resolver_config)
    except DKIMKeyError as exc:
        print(f"sendguard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ValueError, dns.resolver.NoResolverConfiguration) as exc:
        print(f"sendguard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = asyncio.run(
        preflight(
            resolver,
            domain,
            envelope_domain=args.envelope_domain,
            sending_ips=ips,
            dkim_keys=expectations,
            org=OrgDomains(dns_config.public_suffixes),
        )
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(render_report(report))
    return EXIT_OK if report.ok() else EXIT_FAILED
