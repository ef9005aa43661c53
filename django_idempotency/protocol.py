"""The contract between the engine and the stores.

Both sides import this module and nothing of each other's: adapters build a
:class:`Call` and a :class:`Policy`, the engine asks a store to claim the call,
and the store answers with :class:`Execute` (the right to run) or
:class:`Replay` (the stored outcome). What the protected code leaves behind is
a :class:`Conclusion`: a :class:`Snapshot` to store, or a :class:`Discard`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

ATOMIC = "atomic"
LEASE = "lease"
MODES = (ATOMIC, LEASE)


@dataclass(frozen=True)
class Call:
    """One request for idempotent execution."""

    scope: str
    key: str
    fingerprint: str
    method: str = ""
    path: str = ""

    def __str__(self) -> str:
        # Keys can be secrets of sorts (guessable ones leak replays): log a prefix only.
        return f"scope={self.scope!r} key={self.key[:8]!r}…"


@dataclass(frozen=True)
class Policy:
    """How a call is protected; resolved from per-view options and settings."""

    #: ``None``: the ``IDEMPOTENCY_MODE`` setting, and where that is ``None``
    #: too, ``atomic`` where the store supports it, else ``lease``. A store is
    #: always handed a policy whose mode the engine has decided.
    mode: str | None = None
    retention: float = 86400.0
    lease: float = 30.0
    wait: float = 0.0
    store: str = "default"
    retry_after: int = 1


@dataclass(frozen=True)
class Snapshot:
    """A stored outcome: status, allow-listed headers and body."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class Execute:
    """A claim won: the right to execute ``call``, proven by ``token``."""

    call: Call
    token: str
    #: The key was held by a claim whose lease had ended (its worker died or
    #: stalled); the engine reports it.
    takeover: bool = False


@dataclass(frozen=True)
class Replay:
    """A claim that found the call's stored outcome: it must not run again."""

    call: Call
    snapshot: Snapshot


#: What a store's claim returns.
Claim = Execute | Replay


class Discard(enum.Enum):
    """Outcomes that are not kept."""

    #: A failure: undo the transaction (atomic) and free the key, so a retry runs.
    FAILURE = "failure"
    #: A success that cannot be snapshotted: its effects stay, the key is freed.
    UNSTORABLE = "unstorable"


Conclusion = Snapshot | Discard
