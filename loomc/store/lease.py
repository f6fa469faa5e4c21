"""Run leases: which process owns a running run, and whether it is still alive.

A run is held at two levels. Inside a process, :func:`claim` registers it (under a lock)
before anything is read or written, so two threads or tasks of one process never drive
the same run. Between processes, the run's row names its owner (``host:pid:start``)
and a heartbeat; a daemon thread of this process renews the heartbeat of every run the
process holds every third of :data:`HEARTBEAT_STALE_S`, independently of step commits,
so a long step or a graph (which commits no steps) keeps its lease.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Protocol, runtime_checkable

from loomc._core.errors import RunLocked

__all__ = ["HEARTBEAT_STALE_S", "Claim", "LeaseRenewal", "claim", "is_alive", "owner_token"]


def _stale_from_env() -> float:
    raw = os.environ.get("LOOMC_HEARTBEAT_STALE_S")
    if not raw:
        return 300.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"LOOMC_HEARTBEAT_STALE_S={raw!r}: use a positive number of seconds (default 300)")
    return value


#: A lease from another host is considered dead after this long without a heartbeat
#: (seconds; ``$LOOMC_HEARTBEAT_STALE_S``, default 300). Leases held by this process are
#: renewed every third of it. Every process sharing a database must use the same value.
HEARTBEAT_STALE_S = _stale_from_env()

_HOST = socket.gethostname()


def _start_time(pid: int) -> str:
    """The process's start time (Linux), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data.rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


_own: tuple[int, str] = (-1, "")


def owner_token(pid: int | None = None) -> str:
    """``host:pid:start`` naming this process as the owner of a lease."""
    global _own
    if pid is None:
        pid = os.getpid()
        if _own[0] != pid:  # read once per process (a forked child has its own pid)
            _own = (pid, f"{_HOST}:{pid}:{_start_time(pid)}")
        return _own[1]
    return f"{_HOST}:{pid}:{_start_time(pid)}"


def is_alive(owner: str | None, heartbeat: float | None = None, now: float | None = None) -> bool:
    """Whether the process named by ``owner`` still runs."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != _HOST:
        now = time.time() if now is None else now
        return heartbeat is not None and now - heartbeat < HEARTBEAT_STALE_S
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if start and _start_time(pid) not in ("", start):
        return False
    # A zombie (killed, not yet reaped) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        if state in (b"Z", b"X"):
            return False
    except OSError:
        pass
    return True


# ---------------------------------------------------------------------------------
# Runs held by this process


@runtime_checkable
class LeaseRenewal(Protocol):
    """A store that can refresh the heartbeat of leases (loomc's SQLite stores can)."""

    def renew_leases(self, owner: str, run_ids: list[str]) -> None:
        """Set the heartbeat of each run in ``run_ids`` still owned by ``owner`` and running."""


class Claim:
    """This process's hold on one run; :meth:`release` it when the attempt ends."""

    __slots__ = ("key", "owner", "run_id", "store")

    def __init__(self, key: tuple[object, str], store: Any, run_id: str, owner: str) -> None:
        self.key, self.store, self.run_id, self.owner = key, store, run_id, owner

    def release(self) -> None:
        """Let go of the run (idempotent); the heartbeat thread stops when nothing is held."""
        with _cond:
            if _held.get(self.key) is self:
                del _held[self.key]
                if not _held:
                    _cond.notify_all()


_held: dict[tuple[object, str], Claim] = {}
_cond = threading.Condition(threading.Lock())
_beater: threading.Thread | None = None


def _store_key(store: Any) -> object:
    # The file a store writes to (stores on the same file share runs); not resolved against
    # the file system, which would block an event loop.
    path = getattr(store, "path", None)
    return os.fspath(path) if path is not None else id(store)


def claim(store: Any, run_id: str, owner: str) -> Claim:
    """Register ``run_id`` of ``store`` as driven by this process, atomically.

    Raises:
        RunLocked: another thread or task of this process already drives the run.
    """
    global _beater
    key = (_store_key(store), run_id)
    # an async store's heartbeat is written through the sync store it mirrors
    renewer = getattr(store, "sync", store)
    with _cond:
        if key in _held:
            raise RunLocked(run_id, owner, here=True)
        held = _held[key] = Claim(key, renewer, run_id, owner)
        if _beater is None:
            _beater = threading.Thread(target=_beat, name="loomc-heartbeat", daemon=True)
            _beater.start()
        else:
            _cond.notify_all()  # it re-reads the interval (a test may have shortened it)
    return held


def _beat() -> None:
    """The heartbeat thread: renew every held lease each interval; exit when none is held."""
    global _beater
    last = time.monotonic()
    while True:
        with _cond:
            while True:
                if not _held:
                    _beater = None
                    return
                wait = last + HEARTBEAT_STALE_S / 3 - time.monotonic()
                if wait <= 0:
                    break
                _cond.wait(wait)
            last = time.monotonic()
            groups: dict[int, tuple[Any, str, list[str]]] = {}
            for held in _held.values():
                groups.setdefault(id(held.store), (held.store, held.owner, []))[2].append(held.run_id)
        for store, owner, run_ids in groups.values():
            if isinstance(store, LeaseRenewal):
                try:
                    store.renew_leases(owner, run_ids)
                except Exception:  # noqa: BLE001, S112 - a store in trouble fails its run's next write, loudly
                    continue


def _after_fork() -> None:
    global _beater, _cond
    _held.clear()
    _beater = None
    _cond = threading.Condition(threading.Lock())


os.register_at_fork(after_in_child=_after_fork)
