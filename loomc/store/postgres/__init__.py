"""The PostgreSQL store: its dialect (``sql``), sync driver (``sync``) and async driver (``aio``).

Importing this package imports neither psycopg nor the drivers: ``is_dsn`` tells a
PostgreSQL URI from a SQLite path without them.
"""

from __future__ import annotations

__all__ = ["SCHEMES", "is_dsn"]

#: The schemes a ``checkpoint=`` / ``--db`` / ``LOOMC_DB`` value names PostgreSQL with.
SCHEMES = ("postgresql://", "postgres://")


def is_dsn(value: object) -> bool:
    """Whether ``value`` is a PostgreSQL connection URI (``postgresql://...`` or ``postgres://...``)."""
    return isinstance(value, str) and value.startswith(SCHEMES)
