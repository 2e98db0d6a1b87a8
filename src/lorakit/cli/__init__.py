"""The `lorakit` command line: argument parsing and the wiring of every subcommand."""

from .app import main, register_command

__all__ = ["main", "register_command"]
