"""Passwords the farm sets up must be strong: ``celeryfarm up`` and the compose file refuse
empty, short and placeholder ones before anything starts.

Run as ``python -m celeryfarm.passwords NAME...`` (the compose file's ``preflight``
service) it checks the environment variables ``NAME...`` and exits 1, saying which are weak
or hold characters other than letters, digits and ``- . _ ~`` (URL-safe): the compose file
writes its passwords into ``redis://user:password@...`` URLs as they are, where
``@ / # % :`` would break them.
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
#: What the compose file's passwords may hold: URL-safe characters (RFC 3986's
#: unreserved ones), as they go into URLs unencoded (``secrets.token_urlsafe``'s are).
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]*")


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


def preflight_problem(password: str) -> str:
    """Why the compose file cannot use ``password``, or "": weak, or holding characters
    other than letters, digits and ``- . _ ~``."""
    problem = weakness(password)
    if not problem and not URL_SAFE.fullmatch(password):
        problem = ("holds characters other than letters (A-Z, a-z), digits (0-9) and - . _ ~, "
                   "which would break the redis:// URLs made with it")
    return problem


def main(names: list[str]) -> int:
    problems = [f"{name} {problem}: {HINT}" for name in names
                if (problem := preflight_problem(os.environ.get(name, "")))]
    for problem in problems:
        print(f"refusing to start: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
