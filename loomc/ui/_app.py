"""The Starlette application: routes, templates, and the answers to bad requests.

Pages (all read-only but the reply form's POST):

=====================================  ============================================================
``/``                                  the runs list: ``?status=``, ``?id=`` (an id prefix),
                                       ``?name=``, ``?nested=1``, ``?n=`` (page size), ``?before=``
                                       (the cursor of the next page)
``/runs/{id}``                         a run: budget, chart, steps (``?from=K``: from step K), tree,
                                       state, and a waiting run's question
``/runs/{id}/live``                    the changing part of the run page, for the page's own
                                       script (``?since=`` the version it has: 204 if unchanged)
``/runs/{id}/steps/{n}``               one step: the whole error, its event records, its state
``POST /runs/{id}/reply``              answer a waiting run's question (validated by its schema)
``/static/...``                        the page's own CSS and script
=====================================  ============================================================

A run id may be a unique prefix; the page redirects to the full id, so links can be shared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import anyio.to_thread
import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loomc._core.errors import AmbiguousRunId, LoomcError, RunNotFound
from loomc._core.types import RunInfo
from loomc.ui import _views as views
from loomc.ui._guard import Guard

__all__ = ["create_app"]

_HERE = Path(__file__).parent
#: Seconds between the run page's polls while the run is running, and once it has stopped.
POLL_RUNNING_S = 1.0
POLL_STOPPED_S = 5.0


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,  # every {{ }} is escaped, whatever the template's name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    from loomc.cli.render import when

    env.filters["when"] = when
    return env


class _Pages:
    """The route handlers, over one store."""

    def __init__(self, store: Any, env: jinja2.Environment) -> None:
        self.store = store
        self.env = env

    # -- helpers ------------------------------------------------------------------
    def html(self, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        text = self.env.get_template(name).render(**context)
        return HTMLResponse(text, status_code=status, headers={"cache-control": "no-store"})

    def problem(self, status: int, title: str, message: str) -> HTMLResponse:
        return self.html("problem.html", status, title=title, message=message)

    async def read(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a store read in a worker thread (a store is synchronous; the event loop never waits on it)."""
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    async def find(self, request: Request) -> RunInfo | Response:
        """The run named in the path, or the answer to give instead (a redirect to the full id, a 404)."""
        given = request.path_params["run_id"]
        try:
            run_id = await self.read(self.store.resolve, given)
            info: RunInfo | None = await self.read(self.store.get_run, run_id)
        except (RunNotFound, AmbiguousRunId) as exc:
            return self.problem(404, "no such run", str(exc))
        if info is None:
            return self.problem(404, "no such run", f"no run {given!r} (it may have been pruned)")
        if run_id != given:
            url = request.url.replace(path=request.url.path.replace(f"/runs/{given}", f"/runs/{run_id}", 1))
            return RedirectResponse(str(url), status_code=307)
        return info

    # -- pages --------------------------------------------------------------------
    async def runs(self, request: Request) -> Response:
        q = request.query_params
        try:
            size = int(q.get("n") or views.PAGE)
            page = await self.read(
                views.runs_page, self.store, status=q.get("status") or None, id_prefix=q.get("id", ""),
                name=q.get("name", ""), nested=q.get("nested") in ("1", "on", "true"),
                before=views.parse_cursor(q.get("before")), size=size,
            )
        except ValueError as exc:
            return self.problem(400, "bad request", str(exc))
        keep = {k: v for k, v in q.items() if k != "before" and v}
        newest = "/?" + urlencode(keep) if keep else "/"
        following = "/?" + urlencode({**keep, "before": page.next_cursor}) if page.next_cursor else None
        return self.html("runs.html", page=page, newest_url=newest, next_url=following)

    def _window(self, request: Request) -> tuple[int | None, int]:
        q = request.query_params
        start = int(q["from"]) if q.get("from") else None
        window = int(q.get("n") or views.WINDOW)
        return start, window

    async def _run_context(self, request: Request, info: RunInfo) -> dict[str, Any]:
        start, window = self._window(request)
        page = await self.read(views.run_page, self.store, info, start=start, window=window)
        return {"p": page, "query": dict(request.query_params)}

    async def run(self, request: Request) -> Response:
        found = await self.find(request)
        if isinstance(found, Response):
            return found
        try:
            context = await self._run_context(request, found)
        except ValueError as exc:
            return self.problem(400, "bad request", str(exc))
        body = self.env.get_template("run_live.html").render(**context)
        version = _version(body)
        interval = POLL_RUNNING_S if not found.status.finished else POLL_STOPPED_S
        live_query = {k: v for k, v in request.query_params.items() if k in ("from", "n")}
        return self.html("run.html", **context, live=body, version=version, interval=interval, live_query=live_query)

    async def live(self, request: Request) -> Response:
        found = await self.find(request)
        if isinstance(found, Response):
            return found
        try:
            context = await self._run_context(request, found)
        except ValueError as exc:
            return self.problem(400, "bad request", str(exc))
        body = self.env.get_template("run_live.html").render(**context)
        version = _version(body)
        interval = POLL_RUNNING_S if not found.status.finished else POLL_STOPPED_S
        headers = {"cache-control": "no-store", "x-loomc-version": version, "x-loomc-poll": str(interval)}
        if request.query_params.get("since") == version:
            return Response(status_code=204, headers=headers)
        return HTMLResponse(body, headers=headers)

    async def step(self, request: Request) -> Response:
        found = await self.find(request)
        if isinstance(found, Response):
            return found
        n = request.path_params["step_n"]
        page = await self.read(views.step_page, self.store, found, n)
        if page is None:
            return self.problem(404, "no such step", f"run {found.id} has no step {n}")
        return self.html("step.html", s=page)

    async def reply(self, request: Request) -> Response:
        """Store the answer to the question a waiting run asks (validated by its schema), then show the run."""
        from loomc._core.errors import InvalidAnswer
        from loomc._core.life import reply_to

        found = await self.find(request)
        if isinstance(found, Response):
            return found
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        text = (form.get("answer") or [""])[0].strip()
        try:
            value = json.loads(text)
        except ValueError as exc:
            return self.problem(
                400, "the answer is not JSON",
                f"{exc}; write the answer as JSON, e.g. true, \"yes\" or {{\"approve\": true}} - nothing was stored",
            )
        try:
            await self.read(reply_to, self.store, found.id, value)
        except InvalidAnswer as exc:
            return self.problem(422, "the answer does not fit the question", str(exc))
        except LoomcError as exc:
            return self.problem(409, "no answer was expected", str(exc))
        return RedirectResponse(f"/runs/{quote(found.id)}#question", status_code=303)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self.problem(404, "not found", f"nothing at {request.url.path}; the runs are listed at /")

    async def store_error(self, request: Request, exc: Exception) -> Response:
        return self.problem(500, "the store could not be read", str(exc))


def _version(body: str) -> str:
    return hashlib.blake2b(body.encode(), digest_size=8).hexdigest()


def create_app(store: Any, token: str | None = None) -> Starlette:
    """The ``loomc ui`` web application over ``store`` (any :class:`~loomc.store.protocol.CheckpointStore`).

    Args:
        store: where the runs are read (only read).
        token: when given, every request must carry it (``Authorization: Bearer``, or the
            cookie a ``?token=`` link sets); without one, only requests addressed to this
            machine by name are answered.

    Returns:
        A Starlette (ASGI) application: serve it with uvicorn, bound to 127.0.0.1 unless a
        token is given.
    """
    pages = _Pages(store, _environment())
    routes = [
        Route("/", pages.runs, name="runs"),
        Route("/runs/{run_id}", pages.run, name="run"),
        Route("/runs/{run_id}/live", pages.live, name="live"),
        Route("/runs/{run_id}/steps/{step_n:int}", pages.step, name="step"),
        Route("/runs/{run_id}/reply", pages.reply, methods=["POST"], name="reply"),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(Guard, token=token)],
        exception_handlers={404: pages.not_found, LoomcError: pages.store_error},
    )
