"""Run leases: which process owns a running run, whether it is still alive, and its epoch.

A run is held at two levels. Inside a process, :func:`claim` registers it (under a lock)
before anything is read or written, so two threads or tasks of one process never drive
the same run. Between processes, the run's row names its owner (``host:pid:start``), a
heartbeat and the end of its lease (``lease_until``), both on the database's clock: a
daemon thread of this process renews every lease the process holds every third of its
length (the store's ``lease_ttl``), independently of step commits, so a long step or a
graph (which commits no steps) keeps its lease.

A lease is taken over when its owner is dead (a process of this host that is gone is
seen at once) or when it has expired (an owner on another host, or one of this host that
is alive but stopped renewing: paused, hung). Every takeover increments the run's
*epoch*; this process remembers the epoch it acquired (:data:`epochs`) and every write
of the run carries it, so a write of an owner that was taken over is refused
(:class:`~loomc.LeaseLost`) and rolled back whole: fencing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Protocol, runtime_checkable

from loomc._core.errors import RunLocked

__all__ = [
    "DEFAULT_LEASE_TTL_S", "HEARTBEAT_STALE_S", "Claim", "LeaseRenewal", "claim", "epochs", "is_alive", "lease_ttl",
    "LeaseEpochs", "owner_token", "store_key",
]

#: The lease length when neither the store (``lease_ttl=``) nor ``$LOOMC_HEARTBEAT_STALE_S`` names one.
DEFAULT_LEASE_TTL_S = 30.0


def _stale_from_env() -> float:
    raw = os.environ.get("LOOMC_HEARTBEAT_STALE_S")
    if not raw:
        return DEFAULT_LEASE_TTL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"LOOMC_HEARTBEAT_STALE_S={raw!r}: use a positive number of seconds (default {DEFAULT_LEASE_TTL_S:g})")
    return value


#: The default lease length (seconds; ``$LOOMC_HEARTBEAT_STALE_S``, default 30): a store
#: made without ``lease_ttl=`` gives its runs' owners leases this long. A lease not renewed
#: for this long (by the database's clock) may be taken over. Leases held by this process
#: are renewed every third of their length.
HEARTBEAT_STALE_S = _stale_from_env()


def lease_ttl(store: Any) -> float:
    """The lease length of ``store``'s runs: its ``lease_ttl``, else :data:`HEARTBEAT_STALE_S` (read now)."""
    ttl = getattr(store, "lease_ttl", None)
    return float(ttl) if ttl else HEARTBEAT_STALE_S


def check_ttl(ttl: float | None) -> float | None:
    """``lease_ttl=`` as given to a store: ``None`` (the default) or a positive number of seconds.

    Raises:
        ValueError: anything else.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf"):
        raise ValueError(f"lease_ttl={ttl!r}: use a positive number of seconds (e.g. 30), or None for the default")
    return float(ttl)

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


def is_alive(owner: str | None, heartbeat: float | None = None, now: float | None = None, *, expired: bool | None = None) -> bool:
    """Whether the lease of ``owner`` still holds: its process runs and (if known) its lease has not expired.

    ``expired``: whether the lease's end has passed by the database's clock (``None``: not
    known; then an owner on another host is judged by ``heartbeat`` against ``now``).
    """
    if not owner:
        return False
    if expired:
        return False
    host, _, rest = owner.partition(":")
    pid_s, _, start = rest.partition(":")
    if host != _HOST:
        if expired is not None:
            return True
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

    def renew_leases(self, owner: str, run_ids: list[str]) -> list[str] | None:
        """Renew the lease of each run in ``run_ids`` still held by ``owner``; the ids it no longer holds."""


class Claim:
    """This process's hold on one run; :meth:`release` it when the attempt ends.

    ``lost`` is set by the heartbeat when the run's lease was found taken over.
    """

    __slots__ = ("key", "lost", "owner", "run_id", "store")

    def __init__(self, key: tuple[object, str], store: Any, run_id: str, owner: str) -> None:
        self.key, self.store, self.run_id, self.owner = key, store, run_id, owner
        self.lost = False

    def release(self) -> None:
        """Let go of the run (idempotent); the heartbeat thread stops when nothing is held."""
        with _cond:
            if _held.get(self.key) is self:
                del _held[self.key]
                epochs.pop(self.key, None)
                if not _held:
                    _cond.notify_all()


_held: dict[tuple[object, str], Claim] = {}
#: The lease epoch this process acquired for each run it drives, by ``(store_key(store), run_id)``:
#: set by the store when it creates or acquires the run, carried by every write of the run,
#: dropped when the claim is released. A run missing here is written unfenced (an
#: administrative write, such as the CLI's, or a store used without the engine).
epochs: dict[tuple[object, str], int] = {}
_cond = threading.Condition(threading.Lock())
_beater: threading.Thread | None = None


def store_key(store: Any) -> object:
    """What identifies ``store``'s database in this process (stores on one file share runs).

    The file path as given (not resolved against the file system, which would block an
    event loop), a store's own ``lease_key`` (a DSN), else the store object itself.
    """
    key = getattr(store, "lease_key", None)
    if key is not None:
        return key
    path = getattr(store, "path", None)
    return os.fspath(path) if path is not None else id(store)


_store_key = store_key


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
                wait = last + min(lease_ttl(h.store) for h in _held.values()) / 3 - time.monotonic()
                if wait <= 0:
                    break
                _cond.wait(wait)
            last = time.monotonic()
            groups: dict[int, tuple[Any, str, list[Claim]]] = {}
            for held in _held.values():
                groups.setdefault(id(held.store), (held.store, held.owner, []))[2].append(held)
        for store, owner, claims in groups.values():
            if isinstance(store, LeaseRenewal):
                try:
                    lost = store.renew_leases(owner, [c.run_id for c in claims])
                except Exception:  # noqa: BLE001, S112 - a store in trouble fails its run's next write, loudly
                    continue
                if lost:  # taken over: the run stops before its next step (its writes are refused anyway)
                    for c in claims:
                        if c.run_id in lost:
                            c.lost = True


def _after_fork() -> None:
    global _beater, _cond
    _held.clear()
    epochs.clear()
    _beater = None
    _cond = threading.Condition(threading.Lock())


os.register_at_fork(after_in_child=_after_fork)


class LeaseEpochs:
    """What a store keeps of the leases its process holds: their length, and the epoch of each run.

    A store sets ``lease_ttl`` (``None``: ``$LOOMC_HEARTBEAT_STALE_S`` or its default) and
    ``_epochs_key`` (its database, as :func:`store_key` names it) in its constructor.
    """

    lease_ttl: float | None
    _epochs_key: object

    @property
    def ttl_s(self) -> float:
        """The lease length of this store's runs (seconds)."""
        return self.lease_ttl or HEARTBEAT_STALE_S

    def epoch_of(self, run_id: str) -> int | None:
        """The epoch this process holds for ``run_id`` (``None``: it does not drive the run)."""
        return epochs.get((self._epochs_key, run_id))

    def hold_epoch(self, run_id: str, epoch: int) -> None:
        """Remember that this process acquired ``run_id`` at ``epoch`` (its writes carry it)."""
        epochs[(self._epochs_key, run_id)] = epoch
