"""The error a config that cannot be used raises."""

from __future__ import annotations


class ConfigError(Exception):
    """
    The configuration is unusable; ``errors`` lists every problem found, and
    the text has one line per problem, each naming the file, the key and the
    value.
    """

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__("\n".join(f"{path}: {e}" for e in errors))
