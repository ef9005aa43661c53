"""Instructions per request in the Django process, counted by callgrind: the same whatever the load.

    python benchmarks/instructions.py --database-url postgres://postgres@127.0.0.1:5432/instr_bench

Timings on a shared machine move with its load; the number of instructions
the Django process executes per request does not. Each request kind runs in
its own process under ``valgrind --tool=callgrind``: warm-up requests
uninstrumented, then ``--requests`` requests counted (through
``django.test.Client``, no HTTP). With ``--sections`` the count of a
first execution is split by the package's parts (the key and fingerprint,
the claim's and the completion's database work, the view). Work done by the
database server is not in these counts: the claim's execution on the server
costs the same however the client sends it.

Needs valgrind (Debian's package, with its headers) and a C compiler: a tiny
helper (``build/callgrind_control.so``) switches counting on and off around
the measured requests. The database is created and dropped (its name must
contain "bench").
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KINDS = {
    "plain": "/plain/",
    "plain-in-transaction": "/plain-in-transaction/",
    "atomic-first": "/atomic/",
    "atomic-replay": "/atomic/",
    "lease-first": "/lease/",
    "lease-replay": "/lease/",
}
HELPER_SOURCE = """
#include <valgrind/callgrind.h>
void measure_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void measure_mark(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
void measure_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""
#: Package parts counted apart with --sections: (module, attribute, label).
SECTIONS = (
    ("django_idempotency.decorators", "Options.call", "key, scope and fingerprint"),
    ("django_idempotency.stores.postgresql", "begin_and_execute", "BEGIN + claim (pipeline)"),
    ("django_idempotency.stores.sql", "new_row_params", "the claim's parameters"),
    ("django_idempotency.stores.sql", "completion_params", "the completion's parameters"),
    (
        "django_idempotency.stores.postgresql",
        "complete_and_commit",
        "completion + COMMIT (pipeline)",
    ),
    ("django_idempotency.decorators", "Options.kept", "the response's snapshot"),
    ("benchmarks.models", "Order.objects.create", "the view's INSERT"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="comma-separated, of: " + ", ".join(KINDS)
    )
    parser.add_argument("--requests", type=int, default=20, help="counted, per kind")
    parser.add_argument("--sections", action="store_true", help="split the counts by part")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one kind, under callgrind
    args = parser.parse_args(argv)
    if "bench" not in args.database_url.rsplit("/", 1)[-1]:
        parser.error("the database name must contain 'bench' (it is dropped)")
    if args.child:
        return _child(args)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (Debian: apt-get install valgrind)")
    helper = _helper()
    print(measure(args, kinds, helper))
    return 0


def measure(args: argparse.Namespace, kinds: list[str], helper: Path) -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    run.setup(
        argparse.Namespace(
            database_url=args.database_url, redis_url="", prepare_threshold=None, view_queries=0
        )
    )
    from django.db import connection

    name = connection.settings_dict["NAME"]
    test_name = connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    counts: dict[str, dict[str, int]] = {}
    try:
        url = args.database_url.rsplit("/", 1)[0] + "/" + test_name
        for kind in kinds:
            counts[kind] = _count(kind, url, args, helper)
    finally:
        connection.creation.destroy_test_db(name, verbosity=0)
    return _report(counts, args)


def _count(kind: str, url: str, args: argparse.Namespace, helper: Path) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}/callgrind.%p",
            sys.executable, __file__, "--database-url", url,
            "--child", kind, "--requests", str(args.requests),
        ]  # fmt: skip
        if args.sections:
            command.append("--sections")
        env = {**os.environ, "INSTRUCTIONS_HELPER": str(helper)}
        subprocess.run(command, check=True, env=env, capture_output=True)
        totals: collections.Counter[str] = collections.Counter()
        for dump in Path(out).glob("callgrind.*"):
            text = dump.read_text(errors="replace")
            label = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
            events = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
            if label and events:
                totals[label.group(1)] += int(events.group(1))
    return dict(totals)


def _report(counts: dict[str, dict[str, int]], args: argparse.Namespace) -> str:
    plain = sum(counts.get("plain", {}).values()) / args.requests if "plain" in counts else None
    lines = [
        f"Instructions per request in the Django process (callgrind), {args.requests} requests "
        "each after 30 unmeasured ones",
        "",
        "| request | instructions | / plain view |",
        "|---|--:|--:|",
    ]
    for kind, totals in counts.items():
        per_request = sum(totals.values()) / args.requests
        ratio = f"{per_request / plain:.2f}x" if plain else "—"
        lines.append(f"| {kind} | {per_request / 1000:,.0f} k | {ratio} |")
    if args.sections:
        for kind, totals in counts.items():
            lines += ["", f"{kind}, by part:", "", "| part | instructions |", "|---|--:|"]
            for label, events in sorted(totals.items(), key=lambda item: -item[1]):
                lines.append(f"| {label} | {events / args.requests / 1000:,.0f} k |")
    return "\n".join(lines)


def _helper() -> Path:
    """Build the counting switch (a few lines of C using valgrind's client requests)."""
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    library = build / "callgrind_control.so"
    if not library.exists():
        source = build / "callgrind_control.c"
        source.write_text(HELPER_SOURCE)
        compiler = os.environ.get("CC", "cc")
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", library, source], check=True)
    return library


def _child(args: argparse.Namespace) -> int:
    """One kind's requests, in the process callgrind runs."""
    import ctypes
    import functools
    import importlib

    sys.path.insert(0, str(ROOT))
    from benchmarks import run

    run.setup(
        argparse.Namespace(
            database_url=args.database_url, redis_url="", prepare_threshold=None, view_queries=0
        )
    )
    from django.test import Client

    control = ctypes.CDLL(os.environ["INSTRUCTIONS_HELPER"])
    kind, path = args.child, KINDS[args.child]
    fixed = f"instructions-{kind}"

    def key() -> str | None:
        if kind.startswith("plain"):
            return None
        return fixed if kind.endswith("replay") else uuid.uuid4().hex

    if args.sections:
        for module_name, attribute, label in SECTIONS:
            *path_to_owner, name = attribute.split(".")
            owner = functools.reduce(getattr, path_to_owner, importlib.import_module(module_name))
            original = getattr(owner, name)

            def counted(*a: Any, _f: Any = original, _l: bytes = label.encode(), **k: Any) -> Any:
                # A dump closes what ran since the last one under its label.
                control.measure_mark(b"the rest")
                try:
                    return _f(*a, **k)
                finally:
                    control.measure_mark(_l)

            setattr(owner, name, functools.wraps(original)(counted))

    client = Client()

    def post() -> None:
        headers = {} if (k := key()) is None else {"Idempotency-Key": k}
        response = client.post(
            path, b'{"item": "book"}', content_type="application/json", headers=headers
        )
        assert response.status_code == 201, response.status_code

    for _ in range(30):
        post()
    control.measure_start()
    for _ in range(args.requests):
        post()
    control.measure_mark(b"the rest")
    control.measure_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
