"""``loomc resume RUN_ID --run``: import the run's function and resume the run here.

A run records its function as ``module:qualname`` and, in its metadata, the file it was
defined in. The module is imported from the working directory; a function defined in a
script run as ``__main__`` is loaded from that script's file (under another module
name, so its ``if __name__ == "__main__":`` block does not run).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from loomc._core.errors import LoomcError
from loomc._core.types import RunInfo, RunStatus
from loomc.cli.common import Database, checkpoint_path, error_line, given_limits, import_file, root_run, same_database

__all__ = ["load_loop", "resume_budget", "resume_here"]

#: The module name a ``__main__`` script is loaded under.
SCRIPT_MODULE = "__loomc_main__"


def resume_budget(
    stored: dict[str, Any] | None, *, usd: float | None = None, iterations: float | None = None,
    wall_clock: str | float | None = None,
) -> Any:
    """The budget a resume from the command line runs under (``None``: no new limit given).

    Used by ``loomc resume --run`` and ``loomc graph run --resume``, by the same rule as
    ``resume(budget=...)`` (:meth:`Budget.merged`): the limits given replace the run's
    stored ones (``stored``, as ``Budget.to_dict`` wrote them), the others are kept, and
    ``inf`` removes one.

    Raises:
        ValueError: a limit is not a valid budget value (the message names it).
    """
    from loomc._core.budget import Budget

    given = given_limits(usd, iterations, wall_clock)
    if not given:
        return None
    return Budget.merged(stored, Budget(**given))


def _load_script(path: Path) -> ModuleType:
    module = import_file(path, SCRIPT_MODULE)
    # States of classes defined in the script were stored as "__main__:Name":
    # bring them back as those classes, not as dicts.
    from loomc.store import codec as _codec

    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == SCRIPT_MODULE:
            _codec._seen_types[f"__main__:{value.__qualname__}"] = value
    return module


def load_loop(info: RunInfo, cwd: Path) -> Any:
    """The ``@loop`` that started ``info``, imported from ``cwd`` (or its script file).

    Raises:
        LoomcError: the name is not importable, the import fails, or it is not a loop.
        CliError: the run's script cannot be loaded (it raised or exited while imported).
    """
    from loomc._core.runner import AsyncLoopRunner, LoopRunner

    module_name, sep, qualname = info.name.partition(":")
    if not sep or not module_name or not qualname:
        raise LoomcError(
            f"run {info.id} was started by {info.name!r}, which does not name an importable function "
            "(module:qualname); resume it from Python with fn.resume(...)"
        )
    if "<locals>" in qualname:
        raise LoomcError(
            f"run {info.id} was started by {info.name}, a loop defined inside a function; "
            f"it cannot be imported: call .resume({info.id!r}) on that loop from Python"
        )
    file = info.meta.get("file") if isinstance(info.meta.get("file"), str) else None
    if str(cwd) not in sys.path:
        sys.path.insert(0, str(cwd))
    if module_name == "__main__":
        if not file:
            raise LoomcError(
                f"run {info.id} was started from a script run as __main__ whose file is not recorded; "
                f"resume it from Python with {qualname}.resume({info.id!r})"
            )
        path = Path(file)
        if not path.is_file():
            raise LoomcError(f"run {info.id} was started by the script {file}, which no longer exists")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        module = _load_script(path)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            where = f" (it was defined in {file})" if file else ""
            raise LoomcError(
                f"cannot import {module_name} from {cwd}: {exc}; run this command in the directory the run was started from{where}"
            ) from exc
        except Exception as exc:
            raise LoomcError(f"importing {module_name} failed: {type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoomcError(f"{module_name} has no {qualname} (renamed?); the run was started by {info.name}") from None
    if not isinstance(obj, (LoopRunner, AsyncLoopRunner)):
        raise LoomcError(f"{info.name} is a {type(obj).__name__}, not a @loop; cannot resume run {info.id} with it")
    return obj


def resume_here(store: Any, info: RunInfo, budget: Any = None) -> int:
    """Resume ``info`` in this process with live progress; the exit code (0: completed).

    Args:
        store: the database being read (the run's function must checkpoint to it).
        info: the run to resume (a root loop run).
        budget: new limits (a ``Budget``), or ``None`` to keep the run's own.
    """
    from loomc._core.runner import AsyncLoopRunner
    from loomc.cli import render as r
    from loomc.cli.follow import Follower

    if info.parent_run_id:
        from loomc._core.engine import nested_resume_error

        raise nested_resume_error(info, root_run(store, info))
    if info.kind == "graph":
        raise LoomcError(f"run {info.id} is a graph run; resume it with `loomc graph run PIPELINE.py --resume {info.id}`")
    if info.status is RunStatus.RUNNING:
        raise LoomcError(
            f"run {info.id} is running in live process {info.owner}; follow it with `loomc watch {info.id}`, or stop that process first"
        )
    dsn = getattr(store, "dsn", None)
    db: Database = dsn if isinstance(dsn, str) else Path(store.path).resolve()
    # A loop declared with the default checkpoint writes to the database being read.
    os.environ["LOOMC_DB"] = str(db)
    runner = load_loop(info, Path.cwd())
    target = checkpoint_path(runner.spec.checkpoint)
    if target is None or not same_database(target, db):
        from loomc.store.postgres.sync import display_dsn

        shown, there = (display_dsn(x) if isinstance(x, str) else x for x in (target, db))
        raise LoomcError(
            f"{info.name} writes its checkpoints to {shown or runner.spec.checkpoint!r}, not {there}; pass --db {shown}"
            if shown
            else f"{info.name} does not checkpoint to a database file"
        )
    follower = Follower(store, info.id)
    follower.out.line(f"resuming {info.id} ({info.name}) after {info.steps} committed steps; {r.money(info.cost_usd)} spent so far")
    stop = threading.Event()
    watcher = threading.Thread(target=follower.run_until, args=(stop, 0.2), name="loomc-follow", daemon=True)
    # Steps of a script loaded as __main__ carry another module name: same qualname, same run.
    force = info.name.startswith("__main__:")
    watcher.start()
    try:
        if isinstance(runner, AsyncLoopRunner):
            import anyio

            result = anyio.run(lambda: runner.resume_run(info.id, budget=budget, force=force))
        else:
            result = runner.resume_run(info.id, budget=budget, force=force)
    finally:
        stop.set()
        watcher.join()
        follower.poll()
        follower.close()
    if result.error is not None and result.status is RunStatus.FAILED:
        error_line(f"run {info.id} failed: {type(result.error).__name__}: {result.error}")
    elif result.status is RunStatus.WAITING and result.error is not None:
        error_line(r.visible(str(result.error)))
    elif result.status is RunStatus.BUDGET_EXHAUSTED:
        error_line(f"run {info.id} stopped ({r.clip(result.stop_reason)}); give it more with "
                   f"`loomc resume {info.id} --run --usd/--iterations/--wall-clock ...`")
    return 0 if result.status is RunStatus.COMPLETED else 1
