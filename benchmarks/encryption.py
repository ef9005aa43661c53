"""What encrypting stored responses costs: a 1 KiB body, first execution and replay.

    python benchmarks/encryption.py --database-url sqlite:////tmp/encbench.sqlite3
    python benchmarks/encryption.py --database-url postgres://postgres@127.0.0.1:5432/encbench

In one process and one database, the same protected view (a 1 KiB JSON
body, nothing else) is called through Django's request handling with
``IDEMPOTENCY_ENCRYPTION_KEYS`` off and on, request by request, so that
both see the same machine and the same table. Each request is timed on its
own, by the clock and by the CPU time of its thread (which other processes
on a shared machine disturb less); the medians and the medians of the
paired differences are printed as Markdown, with the cost of sealing and
unsealing alone beside them. The database is created
under the name given (which must contain "bench") and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
BODY_SIZE = 1024


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="database to create, use, drop")
    parser.add_argument("--rounds", type=int, default=10, help="alternations of off and on")
    parser.add_argument("--requests", type=int, default=200, help="requests per round and case")
    parser.add_argument("--mode", choices=("atomic", "lease"), default="atomic")
    args = parser.parse_args(argv)
    name = Path(urlsplit(args.database_url).path).name
    if "bench" not in name:
        parser.error(f"the database name must contain 'bench' (it is dropped): {name!r}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ["BENCH_DATABASE_URL"] = args.database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.db import connection

    connection.creation.create_test_db(verbosity=0, serialize=False)
    try:
        print(measure(args))
    finally:
        connection.creation.destroy_test_db(connection.settings_dict["NAME"], verbosity=0)


def measure(args: argparse.Namespace) -> str:
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from django.http import HttpRequest, HttpResponse
    from django.test import RequestFactory, override_settings

    from django_idempotency import sealing
    from django_idempotency.decorators import idempotent
    from django_idempotency.engine import Call, Snapshot

    payload = b'{"data":"' + b"x" * (BODY_SIZE - 11) + b'"}'
    assert len(payload) == BODY_SIZE

    @idempotent(mode=args.mode)
    def view(request: HttpRequest) -> HttpResponse:
        response = HttpResponse(payload, content_type="application/json", status=201)
        response["Location"] = "/orders/1/"
        return response

    factory = RequestFactory()

    def request(key: str) -> Callable[[], object]:
        built = factory.post(
            "/", b"{}", content_type="application/json", headers={"Idempotency-Key": key}
        )
        return lambda: view(built)

    load_at_start = os.getloadavg()[0]
    cases: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    key = Fernet.generate_key().decode()
    # One list for the whole run, its content switched in place between
    # requests: changing the setting itself (override_settings per request)
    # would send setting_changed each time, which rebuilds the store and
    # re-reads every setting at the next request: work that is not
    # encryption's, timed in both columns and widening their spread.
    keys: list[str] = []
    states = {"off": [], "on": [key]}
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEYS=keys):
        for round_ in range(args.rounds):
            # Off and on alternate request by request, which goes first
            # flipping every round: both see the same load on a shared machine.
            order = ("off", "on") if round_ % 2 == 0 else ("on", "off")
            for case in ("first execution", "replay"):
                for n in range(args.requests):
                    for state in order:
                        keys[:] = states[state]
                        call = request(f"{state}-{round_}-{n}")
                        start, start_cpu = time.perf_counter(), time.thread_time()
                        call()
                        cpu.setdefault((case, state), []).append(time.thread_time() - start_cpu)
                        cases.setdefault((case, state), []).append(time.perf_counter() - start)

    call = Call("user:1", "k", "")
    snapshot = Snapshot(
        201, (("Content-Type", "application/json"), ("Location", "/orders/1/")), payload
    )
    with override_settings(IDEMPOTENCY_ENCRYPTION_KEYS=[key]):
        sealed = sealing.seal(snapshot, call)
        seal_us = _per_call(lambda: sealing.seal(snapshot, call))
        unseal_us = _per_call(lambda: sealing.unseal(sealed, call))
    # cryptography's AES-GCM alone, at the same moment: a yardstick for how
    # much the machine's load slows everything down.
    cipher, nonce = AESGCM(AESGCM.generate_key(bit_length=256)), os.urandom(12)
    token = cipher.encrypt(nonce, payload, b"")
    encrypt_us = _per_call(lambda: cipher.encrypt(nonce, payload, b""))
    decrypt_us = _per_call(lambda: cipher.decrypt(nonce, token, b""))

    lines = [
        f"Encryption of a {BODY_SIZE}-byte body, {args.mode} mode, "
        f"{connection_vendor()}; {args.rounds} rounds x {args.requests} requests per case; "
        f"load average {load_at_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the "
        f"end, on {os.cpu_count()} CPUs.",
        "",
        "| request | off (median, ms) | on (median, ms) | on - off, paired (median, ms) "
        "| CPU off (median, ms) | CPU on (median, ms) | CPU on - off, paired (median, ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in ("first execution", "replay"):
        row = [case]
        for times in (cases, cpu):
            off, on = times[(case, "off")], times[(case, "on")]
            # Request n with encryption on ran right beside request n without.
            paired = statistics.median(b - a for a, b in zip(off, on, strict=True)) * 1000
            row += [
                f"{statistics.median(off) * 1000:.3f}",
                f"{statistics.median(on) * 1000:.3f}",
                f"{paired:+.3f}",
            ]
        lines.append(f"| {' | '.join(row)} |")
    lines += [
        "",
        f"Sealing alone: {seal_us:.1f} µs; unsealing alone: {unseal_us:.1f} µs (best of 5); "
        f"cryptography's AES-GCM alone: {encrypt_us:.1f} µs to encrypt, {decrypt_us:.1f} µs "
        f"to decrypt {BODY_SIZE} bytes; stored size {len(sealed.body)} bytes for "
        f"{BODY_SIZE} bytes of body and its headers.",
    ]
    return "\n".join(lines)


def connection_vendor() -> str:
    from django.db import connection

    return str(connection.display_name)


def _per_call(function: Callable[[], object], number: int = 1000) -> float:
    """Microseconds per call, best of five runs (the least disturbed by other load)."""
    return min(timeit.repeat(function, number=number, repeat=5)) / number * 1e6


if __name__ == "__main__":
    main()
