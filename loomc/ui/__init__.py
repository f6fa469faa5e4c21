"""``loomc ui``: a local web page of runs (the ``ui`` extra: Starlette, uvicorn, Jinja2).

Nothing here is imported by ``import loomc``. :func:`create_app` builds the application
over any checkpoint store; ``loomc ui`` serves it with uvicorn on 127.0.0.1. See
``docs/ui.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["create_app"]

if TYPE_CHECKING:
    from starlette.applications import Starlette


def create_app(store: Any, token: str | None = None) -> Starlette:
    """The web application over ``store``; see :func:`loomc.ui._app.create_app`.

    Raises:
        MissingExtra: Starlette, uvicorn or Jinja2 is not installed (``pip install 'loomc[ui]'``).
    """
    from loomc.ui._extra import require

    require()
    from loomc.ui._app import create_app as build

    return build(store, token)
