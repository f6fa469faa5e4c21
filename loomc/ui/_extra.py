"""Whether the ``ui`` extra is installed, asked before anything imports it."""

from __future__ import annotations

import importlib.util

from loomc._core.errors import LoomcError

__all__ = ["MissingExtra", "require"]

#: The modules ``loomc ui`` needs, by the distribution that ships them.
NEEDS = {"starlette": "starlette", "uvicorn": "uvicorn", "jinja2": "jinja2"}


class MissingExtra(LoomcError, ImportError):
    """A part of loomc needs an optional dependency that is not installed."""


def require() -> None:
    """Check that Starlette, uvicorn and Jinja2 can be imported.

    Raises:
        MissingExtra: naming what is missing and the command that installs it.
    """
    missing = [dist for module, dist in NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingExtra(f"loomc ui needs {', '.join(missing)}, which is not installed: pip install 'loomc[ui]'")
