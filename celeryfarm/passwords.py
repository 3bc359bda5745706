"""Passwords the farm sets up must be strong: ``celeryfarm up`` and the compose file refuse
empty, short and placeholder ones before anything starts.

Run as ``python -m celeryfarm.passwords NAME...`` (the compose file's ``preflight``
service) it checks the environment variables ``NAME...`` and exits 1, saying which are weak.
"""

from __future__ import annotations

import os
import re
import sys

from .errors import ConfigError

MIN_LENGTH = 16
#: The placeholders of .env.example and their spellings.
_PLACEHOLDER = re.compile(r"change[-_ ]?me", re.IGNORECASE)
HINT = "make one with `openssl rand -hex 24`"


def weakness(password: str) -> str:
    """Why ``password`` is too weak, or ""."""
    if not password:
        return "is empty"
    if _PLACEHOLDER.search(password):
        return "is still the placeholder 'change-me'"
    if len(password) < MIN_LENGTH:
        return f"is shorter than {MIN_LENGTH} characters"
    return ""


def require_strong(what: str, password: str) -> None:
    """Raise :class:`ConfigError` naming ``what`` if ``password`` is weak."""
    problem = weakness(password)
    if problem:
        raise ConfigError(f"{what} {problem}: {HINT}")


def main(names: list[str]) -> int:
    problems = []
    for name in names:
        try:
            require_strong(name, os.environ.get(name, ""))
        except ConfigError as error:
            problems.append(str(error))
    for problem in problems:
        print(f"refusing to start: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
