"""Redis Sentinel URLs, read without importing redis-py (the settings check them).

A Sentinel URL lists the sentinels, as kombu's ``sentinel://`` transport and Celery's
Sentinel result backend read it: ``sentinel://:PASSWORD@host1:26379/0;sentinel://host2:26379``
(the password and database, given once, are the primary's), and the farm setting
``CELERYFARM_SENTINEL_MASTER`` names the primary the sentinels watch.
:mod:`celeryfarm.redisclient` connects through them.
"""

from __future__ import annotations

import dataclasses
from urllib.parse import unquote, urlsplit

SCHEME = "sentinel"
#: Between the sentinels of one URL (kombu's and Celery's separator).
SEPARATOR = ";"


def uses_sentinel(url: str) -> bool:
    return url.partition("://")[0].lower() == SCHEME


@dataclasses.dataclass(frozen=True)
class SentinelUrl:
    """The parts of a Sentinel URL."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0

    @classmethod
    def parse(cls, url: str) -> SentinelUrl:
        sentinels, username, password, db = [], None, None, 0
        for part in filter(None, (p.strip() for p in url.split(SEPARATOR))):
            try:
                parsed = urlsplit(part)
                address = (parsed.hostname, parsed.port or 26379)
                if parsed.path.strip("/"):
                    db = int(parsed.path.strip("/"))
            except ValueError:  # a bad IPv6 address, port or database
                raise _not_an_address(part) from None
            if parsed.scheme.lower() != SCHEME or not parsed.hostname:
                raise _not_an_address(part)
            sentinels.append(address)
            username = username or (unquote(parsed.username) if parsed.username else None)
            password = password or (unquote(parsed.password) if parsed.password else None)
        return cls(tuple(sentinels), username, password, db)


def _not_an_address(part: str) -> ValueError:
    """The error for a part of a Sentinel URL that is not a sentinel's address. Its message
    reaches logs (Katana's, the containers'), so it shows the part without its password."""
    from .config import redact  # config imports this module

    return ValueError(f"not a sentinel://host:port address: {redact(part)!r}")
