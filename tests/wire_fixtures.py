"""The round-trip counter the round-trip tests share (``benchmarks/wire.py``'s relay)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection

from benchmarks.wire import RoundTrips, round_trips


@pytest.fixture(name="trips")
def trips_fixture() -> Iterator[RoundTrips]:
    """Round trips of the default connection, counted from after it connected."""
    with round_trips(connection) as counter:
        assert counter is not None
        connection.ensure_connection()  # connecting is not the measured work's
        yield counter
