"""What every ``loomc`` command shares: the one-line error, the database, a run, a user's file.

``loomc`` (:mod:`loomc.cli.app`, :mod:`loomc.cli.resume`) and ``loomc graph``
(``orchestration._cli``) all go through these, so the same input gets the same answer and
the same message whichever command reads it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from loomc._core.errors import RunNotFound, StoreError
from loomc._core.types import RunInfo

__all__ = [
    "LIMIT_OPTIONS",
    "CliError",
    "Database",
    "OptionError",
    "check_graph_input",
    "check_new_limits",
    "checkpoint_path",
    "given_limits",
    "database_path",
    "error_line",
    "fail",
    "find_run",
    "given_database_path",
    "import_file",
    "open_reader",
    "require_database",
    "root_run",
    "same_database",
    "writable_store",
]


class CliError(Exception):
    """A user error found by the CLI itself: printed as one line, exit 1."""


class OptionError(CliError):
    """Options that do not go together: ``loomc`` reports it as a usage error (exit 2)."""

    def __init__(self, message: str, options: str) -> None:
        super().__init__(message)
        self.options = options


#: The options that give a resumed run new limits.
LIMIT_OPTIONS = "--usd/--iterations/--wall-clock"


def given_limits(usd: float | None, iterations: float | None, wall_clock: str | float | None) -> dict[str, Any]:
    """The limits given on the command line, by :class:`~loomc.Budget` argument name."""
    return {k: v for k, v in (("usd", usd), ("iterations", iterations), ("wall_clock", wall_clock)) if v is not None}


def check_new_limits(limits: dict[str, Any], *, resuming: bool, how: str) -> None:
    """New limits go with a resume only (``how``: what to add to ask for one).

    Raises:
        OptionError: limits were given without a resume.
    """
    if limits and not resuming:
        raise OptionError(f"new limits apply to a resume: add {how}", LIMIT_OPTIONS)


def check_graph_input(input_json: str | None, input_file: object, *, resuming: bool) -> None:
    """``--input`` or ``--input-file``, at most one, and neither with ``--resume``.

    Raises:
        OptionError: both were given, or one was given with ``--resume``.
    """
    if input_json is not None and input_file is not None:
        raise OptionError("give either --input or --input-file, not both", "--input")
    if resuming and (input_json is not None or input_file is not None):
        raise OptionError("--resume continues with the run's own input; drop --input/--input-file", "--input")


#: ``loomc graph run --executor``: where the nodes run.
EXECUTORS = ("local", "dask")


def check_executor(executor: str | None, address: str | None) -> None:
    """``--executor local|dask``; ``--address`` only with ``dask``.

    Raises:
        OptionError: an unknown executor, or ``--address`` without ``--executor dask``.
    """
    if executor is not None and executor not in EXECUTORS:
        raise OptionError(f"--executor {executor!r}: use one of {', '.join(EXECUTORS)}", "--executor")
    if address is not None and executor != "dask":
        raise OptionError("--address names a Dask scheduler: give it with --executor dask", "--address")


def error_line(message: str) -> None:
    """Print ``loomc: message`` on stderr, escaped and cut: messages can quote stored text (a step's error)."""
    from loomc.cli.render import clip

    sys.stderr.write(f"loomc: {clip(message, 2000)}\n")
    sys.stderr.flush()


def fail(message: str) -> int:
    """Print ``message`` as :func:`error_line` does; the exit code of a failed command (1)."""
    error_line(message)
    return 1


#: Where runs are stored: a SQLite file, or a PostgreSQL DSN (``postgresql://...``).
Database = Path | str


def database_path(db: str | os.PathLike[str] | None) -> Database:
    """The database a command uses: ``--db``, else ``$LOOMC_DB``, else ``.loomc/checkpoints.db``.

    A PostgreSQL URI (``postgresql://...`` / ``postgres://...``) is returned as it is.

    Raises:
        StoreError: the path is a directory.
    """
    from loomc.store.postgres import is_dsn
    from loomc.store.sqlite.sync import default_db_path

    if db is None and is_dsn(os.environ.get("LOOMC_DB")):
        return os.environ["LOOMC_DB"]
    if is_dsn(db):
        return str(db)
    path = Path(db) if db is not None else default_db_path()
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a loomc database; pass --db FILE")
    return path


def given_database_path(db: str | os.PathLike[str] | None) -> Database | None:
    """:func:`database_path` when ``--db`` or ``$LOOMC_DB`` names one, else ``None`` (the caller's own default)."""
    if db is None and not os.environ.get("LOOMC_DB"):
        return None
    return database_path(db)


def checkpoint_path(checkpoint: Any) -> Database | None:
    """The database a ``checkpoint=`` argument writes to (``None``: not a database, e.g. ``"memory"``)."""
    from loomc.store.postgres import is_dsn

    if checkpoint is None or checkpoint == "sqlite":
        return database_path(None)
    if checkpoint == "memory":
        return None
    if is_dsn(checkpoint):
        return str(checkpoint)
    if isinstance(checkpoint, (str, os.PathLike)):
        return Path(checkpoint)
    store = getattr(checkpoint, "sync", None) if getattr(checkpoint, "is_async", False) else checkpoint
    dsn = getattr(store, "dsn", None)
    if is_dsn(dsn):
        return str(dsn)
    path = getattr(store, "path", None)
    return Path(path) if path is not None else None


def same_database(a: Database, b: Database) -> bool:
    """Whether two databases are the same file (resolved) or the same PostgreSQL database and schema."""
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    if isinstance(a, str) and isinstance(b, str):
        from psycopg.conninfo import conninfo_to_dict

        return conninfo_to_dict(a) == conninfo_to_dict(b)
    return False


def open_reader(db: Database) -> Any:
    """The store at ``db``, opened for reading: never created nor migrated (a newer one is refused untouched).

    Raises:
        StoreError: no loomc database there (or the server cannot be reached).
        LoomcError: a PostgreSQL DSN without the ``postgres`` extra installed.
    """
    if isinstance(db, str):
        from loomc.store.postgres.sync import PostgresStore

        store: Any = PostgresStore(db, create=False, max_size=2)
    else:
        from loomc.store.sqlite.sync import SQLiteStore

        store = SQLiteStore(db, create=False)
    store.open()  # now, so a bad database is reported before any output
    return store


def require_database(path: Database | None) -> None:
    """Refuse to continue a stored run from a database that does not exist (it would be created empty).

    Raises:
        StoreError: there is no database at ``path`` (``None``: not a database; nothing to check).
    """
    if isinstance(path, str):
        open_reader(path).close()  # a schema without loomc's tables is refused with a clear line
    elif path is not None and not path.is_file():
        raise StoreError(f"no loomc database at {path}, so no run to resume there; pass the --db the run was started with")


def writable_store(path: Database, *, existing: bool) -> Any:
    """The store a command writes runs to (one per database in this process).

    Args:
        path: the database file, or a PostgreSQL DSN.
        existing: the command continues a stored run: a missing database is an error,
            never created empty.

    Raises:
        StoreError: ``existing`` and there is no database at ``path``.
    """
    from loomc.store.open import open_store

    if existing:
        require_database(path)
    return open_store(path)


def find_run(store: Any, run_id: str) -> RunInfo:
    """The run named by an id or a unique prefix of one.

    Raises:
        RunNotFound: no run matches (or it was deleted between the two reads).
        AmbiguousRunId: the prefix matches several runs.
    """
    rid = store.resolve(run_id)
    info: RunInfo | None = store.get_run(rid)
    if info is None:
        raise RunNotFound(run_id, where=str(getattr(store, "path", "")))
    return info


def root_run(store: Any, info: RunInfo) -> RunInfo:
    """The outermost run above ``info`` (itself for a root run; a cyclic parent chain stops)."""
    seen = {info.id}
    while info.parent_run_id:
        parent: RunInfo | None = store.get_run(info.parent_run_id)
        if parent is None or parent.id in seen:
            break
        seen.add(parent.id)
        info = parent
    return info


def import_file(path: Path, module_name: str) -> ModuleType:
    """Import the Python file ``path`` as module ``module_name`` (its folder goes on ``sys.path``).

    A failed import leaves ``sys.modules`` as it was.

    Raises:
        CliError: there is no such file, it is not Python, it raised while being imported,
            or it exited (its script part is not guarded by ``if __name__ == "__main__":``).
    """
    if not path.is_file():
        raise CliError(f"no Python file at {path}")
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    previous = sys.modules.get(module_name)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        if previous is not None:
            sys.modules[module_name] = previous
        else:
            sys.modules.pop(module_name, None)
        if isinstance(exc, SystemExit):
            raise CliError(f"{path} exited while being imported (code {exc.code}); guard its script part with "
                           "`if __name__ == \"__main__\":`") from exc
        if not isinstance(exc, Exception):
            raise  # Ctrl-C while importing stays an interruption
        raise CliError(f"cannot import {path}: {type(exc).__name__}: {exc}") from exc
    return module
