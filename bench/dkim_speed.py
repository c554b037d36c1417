"""DKIM signing speed: dkimpy (what sendguard used, pure-Python RSA) against sendguard's signer
(OpenSSL through ``cryptography``, its own canonicalisation), in one process, interleaved.

For each message size (4 KB, 200 KB, 25 MB; ``--quick``: 4 KB, 200 KB, 5 MB), each algorithm
(RSA-2048, Ed25519) and each implementation, a round signs the message a number of times and
records wall-clock and CPU milliseconds per signature; the rounds go round-robin over every
cell, so a busy moment of the machine hits every implementation alike. The medians of the
rounds are reported, with the ratios. The messages are ``bench.big_messages.make_message``'s
(a text part and a base64 attachment, CRLF), signed relaxed/relaxed with sendguard's default
h= list. Implementations:

* ``dkimpy``: ``dkim.DKIM(message).sign(...)`` with the same h= list, then the field prepended,
  as ``Signer.sign_detailed`` did before (its From parse with the email package left out, so
  the ratios are, if anything, in dkimpy's favour);
* ``sendguard``: ``Signer.sign_detailed(message)``: the whole message in, the signed message out;
* ``sendguard-fields``: ``Signer.sign_fields(head, body view)``: only the signature field out,
  as the relay uses it (no copy of the message).

Every signature of the run's first round is verified with dkimpy. Separately (not timed), the
peak of Python allocations during one signature of the biggest message (``tracemalloc``).

    .venv/bin/python bench/dkim_speed.py            # 4 KB, 200 KB, 25 MB; 5 rounds
    .venv/bin/python bench/dkim_speed.py --quick    # 4 KB, 200 KB, 5 MB; 3 rounds

The table goes to stdout, the figures to bench/results/dkim_speed.json (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dkim  # noqa: E402

from bench.big_messages import make_message  # noqa: E402
from bench.relay_throughput import machine, versions  # noqa: E402
from proxy.reputation import dkim_canon  # noqa: E402
from proxy.reputation.dkim import (  # noqa: E402
    Algorithm,
    DKIMConfig,
    DKIMKeyConfig,
    LoadedKey,
    Signer,
    generate_private_key,
    write_private_key,
)

RESULTS = ROOT / "bench" / "results"
KB, MB = 1000, 1000 * 1000
FULL_SIZES, QUICK_SIZES = (4 * KB, 200 * KB, 25 * MB), (4 * KB, 200 * KB, 5 * MB)
FULL_ROUNDS, QUICK_ROUNDS = 5, 3
TARGET_MS = 1.5  # issue 9: at most 1.5 ms per RSA-2048 signature of a 4 KB message
IMPLEMENTATIONS = ("dkimpy", "sendguard", "sendguard-fields")
ALGORITHMS: tuple[Algorithm, ...] = ("rsa-sha256", "ed25519-sha256")
DOMAIN, SELECTOR = "shop.example", "bench"


def signatures_per_round(size: int, implementation: str) -> int:
    """Enough signatures that a round lasts tens of milliseconds at least, never minutes."""
    if size >= 5 * MB:
        return 1
    if implementation == "dkimpy":
        return 10 if size < 100 * KB else 4
    return 100 if size < 100 * KB else 20


def dkimpy_signer(signer: Signer, key: LoadedKey) -> Callable[[bytes], bytes]:
    """What sendguard did before: dkimpy per key, the same h= list, the field prepended."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = key.private_key
    if isinstance(private, rsa.RSAPrivateKey):
        secret = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    else:
        import base64

        raw = private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        secret = base64.b64encode(raw)
    algorithm = key.config.algorithm.encode("ascii")

    def sign(message: bytes) -> bytes:
        fields = dkim_canon.header_fields(message[: dkim_canon.split_message(message)])
        include = signer.header_list(fields)
        one = dkim.DKIM(message, signature_algorithm=algorithm, linesep=b"\r\n")
        header = one.sign(
            SELECTOR.encode(), DOMAIN.encode(), secret, canonicalize=(b"relaxed", b"relaxed"), include_headers=include
        )
        return bytes(header) + message

    return sign


def implementation_of(name: str, signer: Signer, key: LoadedKey) -> Callable[[bytes], Any]:
    if name == "dkimpy":
        return dkimpy_signer(signer, key)
    if name == "sendguard":
        return lambda message: signer.sign_detailed(message).message

    def fields_only(message: bytes) -> bytes:
        end = dkim_canon.split_message(message)
        return signer.sign_fields(message[:end], memoryview(message)[end:]).fields

    return fields_only


def verify(signed: bytes, record: str) -> bool:
    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        return record.encode("ascii")

    return bool(dkim.DKIM(signed).verify(0, dnsfunc=dnsfunc))


def peak_allocations_mib(sign: Callable[[bytes], Any], message: bytes) -> float:
    tracemalloc.start()
    try:
        sign(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return round(peak / (1024 * 1024), 1)


def run(sizes: Sequence[int], rounds: int, workdir: Path) -> dict[str, Any]:
    signers: dict[str, Signer] = {}
    for algorithm in ALGORITHMS:
        path = workdir / f"{algorithm}.pem"
        write_private_key(path, generate_private_key(algorithm, 2048))
        signers[algorithm] = Signer.from_config(
            DKIMConfig(keys=(DKIMKeyConfig(DOMAIN, SELECTOR, str(path), algorithm),))
        )
    messages = {size: make_message(size) for size in sizes}
    cells = [(size, algorithm, name) for size in sizes for algorithm in ALGORITHMS for name in IMPLEMENTATIONS]
    functions = {
        (algorithm, name): implementation_of(name, signers[algorithm], signers[algorithm].keys[0])
        for algorithm in ALGORITHMS
        for name in IMPLEMENTATIONS
    }
    wall: dict[tuple[int, str, str], list[float]] = {cell: [] for cell in cells}
    cpu: dict[tuple[int, str, str], list[float]] = {cell: [] for cell in cells}
    verified: dict[str, bool] = {}
    for round_number in range(rounds):
        # Round-robin, each round starting one cell further, so no implementation always goes first.
        order = cells[round_number % len(cells) :] + cells[: round_number % len(cells)]
        for size, algorithm, name in order:
            sign, message = functions[(algorithm, name)], messages[size]
            count = signatures_per_round(size, name)
            started, started_cpu = time.perf_counter(), time.process_time()
            for _ in range(count):
                out = sign(message)
            wall[(size, algorithm, name)].append((time.perf_counter() - started) * 1000 / count)
            cpu[(size, algorithm, name)].append((time.process_time() - started_cpu) * 1000 / count)
            if round_number == 0:
                signed = out if name != "sendguard-fields" else out + message
                record = signers[algorithm].keys[0].dns_record()
                verified[f"{size}/{algorithm}/{name}"] = verify(signed, record)
        print(f"round {round_number + 1}/{rounds} done", file=sys.stderr)
    biggest = max(sizes)
    allocations = {
        f"{algorithm}/{name}": peak_allocations_mib(functions[(algorithm, name)], messages[biggest])
        for algorithm in ALGORITHMS
        for name in IMPLEMENTATIONS
    }
    results: list[dict[str, Any]] = []
    for size in sizes:
        for algorithm in ALGORITHMS:
            row: dict[str, Any] = {"message_bytes": len(messages[size]), "algorithm": algorithm}
            for name in IMPLEMENTATIONS:
                row[name] = {
                    "wall_ms_median": round(statistics.median(wall[(size, algorithm, name)]), 3),
                    "cpu_ms_median": round(statistics.median(cpu[(size, algorithm, name)]), 3),
                    "wall_ms_rounds": [round(x, 3) for x in wall[(size, algorithm, name)]],
                    "signatures_per_round": signatures_per_round(size, name),
                }
            base = row["dkimpy"]
            for name in IMPLEMENTATIONS[1:]:
                row[f"dkimpy_over_{name}_wall"] = round(base["wall_ms_median"] / row[name]["wall_ms_median"], 1)
                row[f"dkimpy_over_{name}_cpu"] = round(base["cpu_ms_median"] / max(row[name]["cpu_ms_median"], 1e-6), 1)
            results.append(row)
    return {
        "results": results,
        "verified_by_dkimpy": verified,
        "all_verified": all(verified.values()),
        "peak_python_allocations_mib": {"message_bytes": len(messages[biggest]), **allocations},
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'size':>10} {'algorithm':<15}" + "".join(f"{name:>18}" for name in IMPLEMENTATIONS) + f"{'ratio':>9}")
    for row in report["results"]:
        cells = "".join(
            f"{row[name]['wall_ms_median']:>10.3f} ({row[name]['cpu_ms_median']:.2f})".rjust(18)
            for name in IMPLEMENTATIONS
        )
        print(f"{row['message_bytes']:>10} {row['algorithm']:<15}{cells}{row['dkimpy_over_sendguard-fields_wall']:>8}x")
    print("(ms per signature, median of the rounds: wall (CPU); ratio: dkimpy / sendguard-fields, wall)")
    print("peak Python allocations for one signature (MiB):", report["peak_python_allocations_mib"])
    print("every signature verified by dkimpy:", report["all_verified"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="4 KB, 200 KB and 5 MB; 3 rounds")
    parser.add_argument("--rounds", type=int, help="rounds (at least 3; default 5, --quick 3)")
    parser.add_argument("--out", type=Path, default=RESULTS / "dkim_speed.json", help="the JSON file")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    rounds = max(3, args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS))
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="sendguard-bench-dkim-") as workdir:
        measured = run(sizes, rounds, Path(workdir))
    four_kb_rsa = next(
        r for r in measured["results"] if r["message_bytes"] < 10 * KB and r["algorithm"] == "rsa-sha256"
    )
    report = {
        "benchmark": "dkim_speed",
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "ok": measured["all_verified"],
        "target": f"at most {TARGET_MS} ms per RSA-2048 signature of a 4 KB message (issue 9)",
        "target_met_wall": four_kb_rsa["sendguard-fields"]["wall_ms_median"] <= TARGET_MS,
        "target_met_cpu": four_kb_rsa["sendguard-fields"]["cpu_ms_median"] <= TARGET_MS,
        "machine": machine(),
        "versions": {**versions(), "dkimpy": _version("dkimpy"), "cryptography": _version("cryptography")},
        "parameters": {
            "sizes": list(sizes),
            "rounds": rounds,
            "message": "bench.big_messages.make_message: text/plain part + base64 attachment, CRLF",
            "canonicalization": "relaxed/relaxed",
            "key": "RSA-2048 or Ed25519, one signature per message",
            "timing": "per round: N signatures of one cell, wall (perf_counter) and CPU (process_time) per "
            "signature; cells round-robin, each round starting one cell later; medians of the rounds",
        },
        **measured,
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {args.out}", file=sys.stderr)
    return 0 if report["ok"] else 1


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
