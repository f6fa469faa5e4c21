"""Run leases: which process owns a running run, and whether it is still alive."""

from __future__ import annotations

import os
import socket
import time

__all__ = ["HEARTBEAT_STALE_S", "is_alive", "owner_token"]

#: A lease from another host is considered dead after this long without a heartbeat.
HEARTBEAT_STALE_S = 300.0

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
