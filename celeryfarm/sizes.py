"""How big a job may be: every size limit on what a request carries, with clear errors.

A job's record, its messages and its renders' argv and environment all hold what the
request gave; without limits one request (a 10 MB name, a million steps) would bloat Redis,
every listing, and every message. The limits are far above anything Katana sends.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .errors import FarmError

MAX_NAME_CHARS = 256
MAX_STEPS = 10_000
#: Bytes of one command's argv (UTF-8, one separator per argument).
MAX_COMMAND_BYTES = 128 * 1024
#: Bytes of all of a job's commands together.
MAX_COMMANDS_BYTES = 4 * 1024 * 1024
#: Bytes of a job's environment (names, values and separators).
MAX_ENVIRONMENT_BYTES = 256 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: str) -> str:
    """A job name: at most ``MAX_NAME_CHARS``, one line of printable text."""
    if len(name) > MAX_NAME_CHARS:
        raise FarmError(f"the job name is {len(name)} characters long; at most "
                        f"{MAX_NAME_CHARS} are allowed")
    if _CONTROL.search(name):
        raise FarmError(f"the job name {name[:64]!r} contains control characters "
                        "(newlines, tabs...)")
    return name


def check_commands(commands: Sequence[Sequence[str]]) -> None:
    """At most ``MAX_STEPS`` commands of ``MAX_COMMAND_BYTES`` each, ``MAX_COMMANDS_BYTES``
    in all."""
    if len(commands) > MAX_STEPS:
        raise FarmError(f"the job has {len(commands)} commands; at most {MAX_STEPS} are "
                        "allowed")
    total = 0
    for number, argv in enumerate(commands, 1):
        size = sum(len(arg.encode(errors="surrogatepass")) + 1 for arg in argv)
        if size > MAX_COMMAND_BYTES:
            raise FarmError(f"command {number} is {size} bytes long; at most "
                            f"{MAX_COMMAND_BYTES} are allowed")
        total += size
    if total > MAX_COMMANDS_BYTES:
        raise FarmError(f"the job's commands are {total} bytes long together; at most "
                        f"{MAX_COMMANDS_BYTES} are allowed")


def check_environment(environment: Mapping[str, str]) -> None:
    """At most ``MAX_ENVIRONMENT_BYTES`` of environment."""
    size = sum(len(name.encode(errors="surrogatepass")) + len(value.encode(errors="surrogatepass"))
               + 2 for name, value in environment.items())
    if size > MAX_ENVIRONMENT_BYTES:
        raise FarmError(f"the job's environment is {size} bytes long; at most "
                        f"{MAX_ENVIRONMENT_BYTES} are allowed")
