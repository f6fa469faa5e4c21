"""The ``loomc`` command (typer + rich), imported only when the command runs."""

from loomc.cli.app import app, main

__all__ = ["app", "main"]
