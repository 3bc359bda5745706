"""TLS to Redis: the ``CELERYFARM_TLS_*`` files, and what each Redis client takes from them.

Four kinds of client talk to the farm's Redis (kombu's broker transport, Celery's result
backend, redis-py for the job records, Flower's broker page) and each takes its TLS options
in its own shape. :class:`Tls` makes all of them from one place, always with the server's
certificate and host name verified: a ``rediss://`` URL alone would make kombu fall back to
no verification without a word, and a URL's ``ssl_cert_reqs=none`` would turn it off for
some clients and not others. :func:`check_urls` refuses both, and mixing ``redis://`` with
``rediss://``: TLS is all or nothing.

A ``sentinel://`` URL has no TLS form (kombu and Celery know no other scheme for Sentinel),
so through Sentinel TLS is on when the ``CELERYFARM_TLS_*`` files are set: the sentinels and
every server behind them are then reached over TLS (:meth:`Tls.encrypts`).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError
from .sentinel import uses_sentinel

SCHEME = "rediss"
#: How ``ssl_cert_reqs`` may be spelled in a URL: only ever "required".
_REQUIRED = ("required", "cert_required")


@dataclasses.dataclass(frozen=True)
class Tls:
    """The files of a TLS connection to Redis; every field may be empty."""

    #: CA certificates that sign Redis's certificate ("": the system's trusted CAs).
    ca_file: str = ""
    #: This host's certificate and key, for a Redis that asks for one
    #: (``tls-auth-clients yes``).
    cert_file: str = ""
    key_file: str = ""

    def __bool__(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)

    def encrypts(self, url: str) -> bool:
        """Whether the connections of ``url`` use TLS: ``rediss://``, or ``sentinel://``
        with TLS files."""
        return uses_tls(url) or (uses_sentinel(url) and bool(self))

    def redis_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url(url, ...)`` (or, for a Sentinel URL,
        for the servers the sentinels name): none without TLS."""
        if not self.encrypts(url):
            return {}
        return {"ssl_ca_certs": self.ca_file or None, "ssl_certfile": self.cert_file or None,
                "ssl_keyfile": self.key_file or None, "ssl_cert_reqs": "required",
                "ssl_check_hostname": True}

    def celery_options(self, url: str) -> dict[str, Any] | None:
        """``broker_use_ssl`` / ``redis_backend_use_ssl`` for a Celery app on ``url`` (kombu
        and Celery want the ``ssl`` module's constant, and Flower reads the same dict)."""
        if not self.encrypts(url):
            return None
        return {**self.redis_options(url), "ssl_cert_reqs": ssl.CERT_REQUIRED}

    def sentinel_options(self, url: str) -> dict[str, Any]:
        """redis-py's ``Redis(host, port, ...)`` options for a host a Sentinel URL leads to
        (the sentinels themselves, a replica): ``ssl`` is not implied by a scheme there."""
        options = self.redis_options(url)
        return {"ssl": True, **options} if options else {}

    def check_files(self, prefix: str) -> None:
        """A one-line error now, rather than a TLS failure at the first connection."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE go together: "
                              "set both or neither")
        for name, path in (("CA_FILE", self.ca_file), ("CERT_FILE", self.cert_file),
                           ("KEY_FILE", self.key_file)):
            if path:
                try:
                    Path(path).open("rb").close()
                except OSError as error:
                    raise ConfigError(f"{prefix}TLS_{name}: cannot read {path}: "
                                      f"{error.strerror}") from None


def uses_tls(url: str) -> bool:
    return url.partition("://")[0].lower() == SCHEME


def check_urls(urls: Iterable[tuple[str, str]], tls: Tls, prefix: str) -> None:
    """Refuse (name, url) pairs that would leave Redis unverified or some traffic in clear:
    ``ssl_*`` options in a URL (the ``CELERYFARM_TLS_*`` files are the one way to give
    them, and ``ssl_cert_reqs`` other than ``required`` turns verification off), plain
    ``redis://`` next to ``rediss://``, or TLS files with no ``rediss://`` URL."""
    urls = [(name, url) for name, url in urls if url]
    secure = [name for name, url in urls if tls.encrypts(url)]
    for name, url in urls:
        for key, value in parse_qsl(urlsplit(url).query):
            if not key.lower().startswith("ssl_"):
                continue
            if key.lower() == "ssl_cert_reqs" and value.lower() not in _REQUIRED:
                raise ConfigError(
                    f"{prefix}{name}: ssl_cert_reqs={value} would not verify Redis's "
                    f"certificate, and celeryfarm always does: give the CA that signed it "
                    f"in {prefix}TLS_CA_FILE instead")
            if key.lower() != "ssl_cert_reqs":
                raise ConfigError(
                    f"{prefix}{name}: {key} in the URL is not used; give TLS files in "
                    f"{prefix}TLS_CA_FILE, {prefix}TLS_CERT_FILE and {prefix}TLS_KEY_FILE")
    if secure and len(secure) != len(urls):
        plain = [name for name, _ in urls if name not in secure]
        kind = "rediss://" if uses_tls(dict(urls)[secure[0]]) else "sentinel:// with TLS"
        raise ConfigError(
            f"{prefix}{plain[0]} is redis:// but {prefix}{secure[0]} is {kind}: with TLS, "
            "every Redis URL must be rediss:// (or sentinel://)")
    if tls and not secure:
        raise ConfigError(
            f"{prefix}TLS_* files are set but {prefix}{urls[0][0]} is redis://: use rediss:// "
            "so the farm's traffic is encrypted")
