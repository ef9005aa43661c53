"""Bounded clients: in-process through ``django.test.Client``, and over loopback HTTP."""

from __future__ import annotations

import http.client
import random
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from django.test import Client

from benchmarks.statements import DatabaseClock

BODY = b'{"item": "book"}'
HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


@dataclass(frozen=True)
class Variant:
    """A view and the keys sent to it; ``replays`` says what the answers must be."""

    label: str
    path: str
    key: Callable[[], str | None]
    replays: bool = False

    def headers(self) -> dict[str, str]:
        key = self.key()
        return {} if key is None else {HEADER: key}


def no_key() -> None:
    return None


def fresh_key() -> str:
    return uuid.uuid4().hex


def fixed_key(key: str) -> Callable[[], str]:
    return lambda: key


def stored_key(prefix: str, count: int) -> Callable[[], str]:
    """A random one of the bulk-inserted keys ``prefix0`` .. ``prefix<count-1>``."""
    return lambda: f"{prefix}{random.randrange(count)}"


@dataclass
class Sample:
    """Latencies (seconds) of a variant's requests and the time they took."""

    latencies: list[float] = field(default_factory=list)
    #: Of each latency, the time spent waiting on the database (in-process only).
    database: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: int = 0
    #: Median, p99 (seconds) and requests per second of each round, in order:
    #: paired with the plain view's figures of the same round.
    rounds: list[tuple[float, float, float]] = field(default_factory=list)

    def record(self, variant: Variant, latency: float, status: int, replayed: bool) -> None:
        self.latencies.append(latency)
        self.statuses[status] += 1
        if status != 201 or replayed != variant.replays:
            self.unexpected += 1

    def merge(self, other: Sample) -> None:
        self.latencies += other.latencies
        self.database += other.database
        self.statuses += other.statuses
        self.unexpected += other.unexpected
        self.elapsed += other.elapsed
        self.rounds += other.rounds

    def close_round(self) -> Sample:
        """Record this sample's figures as one round's; return the sample."""
        self.rounds = [(self.median, self.p99, self.throughput)]
        return self

    def paired(self, plain: Sample, figure: int) -> list[float]:
        """Per round, this sample's ``figure`` (0 median, 1 p99, 2 req/s) over the plain view's."""
        return [
            mine[figure] / theirs[figure]
            for mine, theirs in zip(self.rounds, plain.rounds, strict=True)
        ]

    @property
    def median(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p99(self) -> float:
        if len(self.latencies) < 2:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]

    @property
    def database_median(self) -> float | None:
        return statistics.median(self.database) if self.database else None

    @property
    def elsewhere_median(self) -> float | None:
        """Median time not spent on the database: Python, mostly."""
        if not self.database:
            return None
        return statistics.median(a - b for a, b in zip(self.latencies, self.database, strict=True))

    @property
    def throughput(self) -> float:
        """Requests per second of wall-clock time."""
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0


def run_in_process(
    client: Client, variant: Variant, requests: int, clock: DatabaseClock | None = None
) -> Sample:
    """``requests`` sequential requests through a ``django.test.Client``.

    With a ``clock``, each request's time on the database is recorded too.
    """
    sample = Sample()
    started = time.perf_counter()
    for _ in range(requests):
        headers = variant.headers()
        if clock is not None:
            clock.seconds = 0.0
        before = time.perf_counter()
        response = client.post(variant.path, BODY, content_type="application/json", headers=headers)
        latency = time.perf_counter() - before
        sample.record(variant, latency, response.status_code, response.get(REPLAYED) == "true")
        if clock is not None:
            sample.database.append(clock.seconds)
    sample.elapsed = time.perf_counter() - started
    return sample.close_round()


def run_http(
    port: int, variant: Variant, *, concurrency: int, requests: int, seconds: float
) -> Sample:
    """Up to ``requests`` requests or ``seconds`` of them, from ``concurrency`` threads.

    One connection per request: gunicorn's sync workers close it after each
    response anyway, so connecting is part of every latency, for every variant.
    """
    tickets = iter(range(requests))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    samples = [Sample() for _ in range(concurrency)]

    def next_ticket() -> bool:
        with lock:
            return next(tickets, None) is not None and time.monotonic() < deadline

    def client(sample: Sample) -> None:
        while next_ticket():
            headers = {"Content-Type": "application/json", **variant.headers()}
            before = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            try:
                connection.request("POST", variant.path, BODY, headers)
                response = connection.getresponse()
                response.read()
            finally:
                connection.close()
            latency = time.perf_counter() - before
            replayed = response.getheader(REPLAYED) == "true"
            sample.record(variant, latency, response.status, replayed)

    threads = [threading.Thread(target=client, args=(sample,)) for sample in samples]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = Sample(elapsed=time.perf_counter() - started)
    for sample in samples:
        total.merge(sample)
    return total.close_round()
