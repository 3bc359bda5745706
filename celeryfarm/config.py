"""All of celeryfarm's configuration, read from ``CELERYFARM_*`` environment variables.

This is the one place that reads the environment. Every process (the Katana plug-in, the
render-node workers, Flower, the command line) builds a :class:`Settings` from its own
environment, so a value that must agree between them (the broker URL, the visibility timeout)
has one name everywhere. The README's configuration table documents each variable.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError
from .sentinel import SentinelUrl, uses_sentinel
from .tls import Tls, check_urls

PREFIX = "CELERYFARM_"
#: How long the farm's Redis clients wait for a reply (``records.store.connect``).
STORE_SOCKET_TIMEOUT = 10
#: Settings that hold credentials; each may instead come from a file named by ``NAME_FILE``.
SECRETS = ("BROKER_URL", "RESULT_BACKEND", "STORE_URL", "FLOWER_PASSWORD", "ADMIN_URL",
           "SENTINEL_PASSWORD")
#: The variables that carry those credentials (``CELERYFARM_BROKER_URL``,
#: ``CELERYFARM_BROKER_URL_FILE``...): never kept in a job's record, never given to a render.
SECRET_VARIABLES = tuple(PREFIX + name + end for name in SECRETS for end in ("", "_FILE"))
#: The schemes of the farm's Redis URLs (``sentinel://`` has its own check).
REDIS_SCHEMES = ("redis", "rediss")


def names_farm_redis(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` names a farm's Redis, in ``CELERYFARM_BROKER_URL`` or in the file
    ``CELERYFARM_BROKER_URL_FILE`` names: then that farm is the one meant, not the one
    ``celeryfarm up`` runs (or would start) on this machine."""
    return any(environ.get(PREFIX + name, "").strip()
               for name in ("BROKER_URL", "BROKER_URL_FILE"))


def _parse_dso_paths(text: str) -> dict[str, str]:
    """Parse ``"dl=/opt/3delight/katana,prman=/opt/prman/katana"`` into a dict."""
    paths: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(
                f"{PREFIX}RENDERER_DSO_PATHS: expected name=path items separated by commas, "
                f"got {item!r}"
            )
        paths[name.strip()] = path.strip()
    return paths


@dataclasses.dataclass(frozen=True)
class Settings:
    """celeryfarm's configuration; :meth:`from_env` is the way to build one."""

    #: Redis URL of the Celery broker.
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Redis URL of Celery's result backend (defaults to the broker).
    result_backend: str = ""
    #: Redis URL where job records live (defaults to the broker).
    store_url: str = ""
    #: TLS files for ``rediss://`` URLs (see :mod:`celeryfarm.tls`).
    tls: Tls = dataclasses.field(default_factory=Tls)
    #: The primary's name, for ``sentinel://`` URLs (see :mod:`celeryfarm.sentinel`).
    sentinel_master: str = "celeryfarm"
    #: The password the sentinels ask of the farm's clients, for ``sentinel://`` URLs: it
    #: lets them only find the primary and the replicas (see :mod:`celeryfarm.acl`).
    sentinel_password: str = ""
    #: With ``sentinel://`` URLs (a replicated Redis): how many replicas must have a write
    #: the farm acknowledges (a submission, a step's start and end, a stop) before it is
    #: acknowledged (0: none), and how long to wait for them before going on without (see
    #: :mod:`celeryfarm.records.replication`).
    wait_replicas: int = 1
    wait_seconds: float = 1.0
    #: Where ``celeryfarm up`` keeps the embedded Redis's data, its credentials and logs;
    #: also where the command line looks for the farm that ``up`` runs on this machine.
    data_dir: Path = Path("~/.celeryfarm")
    #: The shared mount, as *this* host sees it (defaults to ``shared`` in the data folder).
    shared_root: Path = Path("~/.celeryfarm/shared")
    #: The shared mount, as the render nodes see it (defaults to ``shared_root``).
    remote_shared_root: Path | None = None
    #: Katana installation on the render nodes, reported to Katana.
    katana_root: str = "/opt/Foundry/Katana"
    #: Renderer plug-in DSO folders on the render nodes, reported to Katana.
    renderer_dso_paths: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: renderboot executable on the render nodes ("" lets Katana derive it from katana_root).
    renderboot: str = ""
    #: Queue (pool) that jobs go to when their settings name none.
    default_queue: str = "renders"
    #: Longest a render step may run; also sizes the broker's visibility timeout.
    max_render_seconds: int = 7 * 24 * 3600
    #: Seconds between SIGTERM and SIGKILL when a render is stopped.
    stop_grace_seconds: float = 5.0
    #: How often a running step renews its lease and checks for a stop, in seconds.
    poll_seconds: float = 0.25
    #: A running step's lease: a node silent this long is lost, and its step re-dispatched.
    lease_seconds: float = 20.0
    #: How often every node's reaper looks for lost steps (re-dispatch within lease + this).
    reap_seconds: float = 5.0
    #: Finished jobs leave Redis this many days after they ended (render logs stay).
    keep_days: float = 30.0
    #: A node turns the task events Flower turned on off once nobody asked for this long
    #: (0: never).
    events_idle_seconds: float = 60.0
    #: A step lost on this many nodes in a row fails the job.
    max_node_losses: int = 3
    #: Prefix of every Redis key celeryfarm writes, so farms can share a Redis.
    key_prefix: str = "celeryfarm"
    #: User recorded on submitted jobs and used as the default ``getJobs`` filter.
    user: str = ""
    #: Katana session recorded on submitted jobs ("" lets the plug-in make one).
    session: str = ""
    #: Memory cap of the Redis that ``celeryfarm up`` starts (Redis units: 512mb, 2gb); at
    #: the cap, writes fail (``noeviction``) rather than records being evicted.
    redis_maxmemory: str = "1gb"
    #: Port of the Flower that ``celeryfarm up`` starts (0: 5555 if free, else any free port).
    flower_port: int = 0
    #: Redis URL with the ``admin`` ACL user's credential, for ``celeryfarm user add`` (""
    #: on the machine that runs ``celeryfarm up``: it keeps its own).
    admin_url: str = ""
    #: Flower's basic-auth login; an empty password makes ``up`` generate and keep one.
    flower_user: str = "admin"
    flower_password: str = ""
    #: The user render steps run as, where the node can switch users ("": the node's own).
    render_user: str = ""
    #: Variables of the node's environment that renders also get (licence servers...).
    render_env: tuple[str, ...] = ()
    #: Globs over the absolute path of the programs render steps may run (empty: any).
    allowed_programs: tuple[str, ...] = ()
    #: Whether a render node may run as root (``--allow-root``); it refuses to otherwise.
    allow_root: bool = False
    #: Farm-wide failure rules (see :mod:`celeryfarm.retries`): a failed step whose output
    #: has a line matching ``licence_pattern`` backs off and runs again without using a
    #: retry; one matching ``fatal_pattern`` is never retried.
    licence_pattern: str = ""
    fatal_pattern: str = ""
    #: How long a step that found no licence waits before it runs again.
    licence_backoff_seconds: float = 60.0
    #: Matches a render's output line that says a frame is done; group 1 is the frame
    #: number (see :mod:`celeryfarm.progress`).
    frame_pattern: str = r"(?i)\bframe\s+(-?\d+)\s+(?:rendered|done|finished|completed|written)\b"

    @property
    def results_url(self) -> str:
        return self.result_backend or self.broker_url

    @property
    def records_url(self) -> str:
        return self.store_url or self.broker_url

    @property
    def node_shared_root(self) -> Path:
        """The shared mount as the render nodes see it."""
        return self.remote_shared_root or self.shared_root

    @property
    def broker_key_prefix(self) -> str:
        """What every key of Celery's on the broker starts with (kombu's
        ``global_keyprefix``): queues, unacknowledged messages, and the channels of revokes
        and events, so farms sharing a Redis never take, revoke or see each other's steps.
        ``:celery:`` keeps them apart from the job records' keys."""
        return f"{self.key_prefix}:celery:"

    @property
    def visibility_timeout(self) -> int:
        """Broker visibility timeout: above the longest render, so no step is redelivered
        while it still runs. Every process derives it from the same variable."""
        return self.max_render_seconds + 3600

    def client_environment(self) -> dict[str, str]:
        """The ``CELERYFARM_*`` variables that join another process on this host (a Katana
        session, a shell, a node) to this farm: its Redis, the shared root as this host
        sees it (and as the nodes do, when set apart), and the farm-wide values that differ
        from the defaults."""
        env = {PREFIX + "BROKER_URL": self.broker_url,
               PREFIX + "SHARED_ROOT": str(self.shared_root)}
        if self.remote_shared_root is not None:
            env[PREFIX + "REMOTE_SHARED_ROOT"] = str(self.remote_shared_root)
        defaults = Settings()
        for name, value, default in (
            ("RESULT_BACKEND", self.result_backend, defaults.result_backend),
            ("STORE_URL", self.store_url, defaults.store_url),
            ("KEY_PREFIX", self.key_prefix, defaults.key_prefix),
            ("MAX_RENDER_SECONDS", self.max_render_seconds, defaults.max_render_seconds),
            ("KEEP_DAYS", self.keep_days, defaults.keep_days),
            ("TLS_CA_FILE", self.tls.ca_file, defaults.tls.ca_file),
            ("TLS_CERT_FILE", self.tls.cert_file, defaults.tls.cert_file),
            ("TLS_KEY_FILE", self.tls.key_file, defaults.tls.key_file),
            ("SENTINEL_MASTER", self.sentinel_master, defaults.sentinel_master),
            ("SENTINEL_PASSWORD", self.sentinel_password, defaults.sentinel_password),
        ):
            if value != default:
                env[PREFIX + name] = f"{value:g}" if isinstance(value, float) else str(value)
        return env

    def __post_init__(self) -> None:
        urls = [("BROKER_URL", self.broker_url), ("RESULT_BACKEND", self.result_backend),
                ("STORE_URL", self.store_url)]
        _check_url_syntax([*urls, ("ADMIN_URL", self.admin_url)])
        self._check_sentinel_urls(urls)
        check_urls(urls, self.tls, PREFIX)
        if self.wait_replicas < 0 or not 0 < self.wait_seconds < STORE_SOCKET_TIMEOUT:
            raise ConfigError(
                f"{PREFIX}WAIT_REPLICAS must be 0 or more ({self.wait_replicas}) and "
                f"{PREFIX}WAIT_SECONDS between 0 and {STORE_SOCKET_TIMEOUT} s "
                f"({self.wait_seconds:g}): a wait longer than a command may take is cut off")
        margin = self.stop_grace_seconds + self.poll_seconds + 1.0
        if self.lease_seconds <= margin:
            raise ConfigError(
                f"{PREFIX}LEASE_SECONDS ({self.lease_seconds:g}) must exceed the stop grace "
                f"period plus the poll interval plus 1 s ({margin:g}): a node stops trusting "
                "its lease that long before it expires"
            )

    def _check_sentinel_urls(self, urls: list[tuple[str, str]]) -> None:
        sentinel = [(name, url) for name, url in urls if url and uses_sentinel(url)]
        if sentinel and not self.sentinel_master:
            raise ConfigError(f"{PREFIX}SENTINEL_MASTER: the primary's name is needed with "
                              f"sentinel:// URLs")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def get(name: str, default: str = "") -> str:
            return env.get(PREFIX + name, default).strip()

        def secret(name: str) -> str:
            """A credential, from the variable or else from the file ``NAME_FILE`` names
            (readable by the node, not by its renders)."""
            return get(name) or _read_secret(name, get(name + "_FILE"))

        def number(name: str, default: float, kind: type = float, zero: bool = False):
            """A positive number (or 0, where ``zero`` says it means "never")."""
            raw = get(name)
            if not raw:
                return kind(default)
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{PREFIX}{name}: expected a number, got {raw!r}") from None
            if value < 0 or (value == 0 and not zero):
                raise ConfigError(f"{PREFIX}{name}: must be {'0 or more' if zero else 'positive'}"
                                  f", got {raw!r}")
            return value

        defaults = cls()
        data_dir = Path(get("DATA_DIR") or defaults.data_dir).expanduser()
        shared_root = Path(get("SHARED_ROOT") or data_dir / "shared").expanduser()
        remote_root = get("REMOTE_SHARED_ROOT")
        tls = Tls(ca_file=get("TLS_CA_FILE"), cert_file=get("TLS_CERT_FILE"),
                  key_file=get("TLS_KEY_FILE"))
        tls.check_files(PREFIX)
        return cls(
            broker_url=secret("BROKER_URL") or defaults.broker_url,
            data_dir=data_dir,
            result_backend=secret("RESULT_BACKEND"),
            store_url=secret("STORE_URL"),
            tls=tls,
            sentinel_master=get("SENTINEL_MASTER") or defaults.sentinel_master,
            sentinel_password=secret("SENTINEL_PASSWORD"),
            wait_replicas=_count("WAIT_REPLICAS", get("WAIT_REPLICAS"), defaults.wait_replicas),
            wait_seconds=number("WAIT_SECONDS", defaults.wait_seconds),
            shared_root=shared_root,
            remote_shared_root=Path(remote_root) if remote_root else None,
            katana_root=get("KATANA_ROOT") or defaults.katana_root,
            renderer_dso_paths=_parse_dso_paths(get("RENDERER_DSO_PATHS")),
            renderboot=get("RENDERBOOT"),
            default_queue=get("DEFAULT_QUEUE") or defaults.default_queue,
            max_render_seconds=number("MAX_RENDER_SECONDS", defaults.max_render_seconds, int),
            stop_grace_seconds=number("STOP_GRACE_SECONDS", defaults.stop_grace_seconds),
            poll_seconds=number("POLL_SECONDS", defaults.poll_seconds),
            lease_seconds=number("LEASE_SECONDS", defaults.lease_seconds),
            reap_seconds=number("REAP_SECONDS", defaults.reap_seconds),
            max_node_losses=number("MAX_NODE_LOSSES", defaults.max_node_losses, int),
            keep_days=number("KEEP_DAYS", defaults.keep_days),
            events_idle_seconds=number("EVENTS_IDLE_SECONDS", defaults.events_idle_seconds,
                                       zero=True),
            key_prefix=get("KEY_PREFIX") or defaults.key_prefix,
            user=get("USER") or _login_name(),
            session=get("SESSION"),
            redis_maxmemory=_memory(get("REDIS_MAXMEMORY") or defaults.redis_maxmemory),
            flower_port=_port(get("FLOWER_PORT")),
            admin_url=secret("ADMIN_URL"),
            flower_user=_login_part("FLOWER_USER", get("FLOWER_USER") or defaults.flower_user),
            flower_password=_login_part("FLOWER_PASSWORD", secret("FLOWER_PASSWORD")),
            render_user=get("RENDER_USER"),
            render_env=_list(get("RENDER_ENV")),
            allowed_programs=_list(get("ALLOWED_PROGRAMS")),
            allow_root=get("ALLOW_ROOT").lower() in ("1", "true", "yes"),
            licence_pattern=_pattern("LICENCE_PATTERN", get("LICENCE_PATTERN")),
            fatal_pattern=_pattern("FATAL_PATTERN", get("FATAL_PATTERN")),
            licence_backoff_seconds=number("LICENCE_BACKOFF_SECONDS",
                                           defaults.licence_backoff_seconds),
            frame_pattern=_pattern("FRAME_PATTERN", get("FRAME_PATTERN"), groups=1)
            or defaults.frame_pattern,
        )


def _list(text: str) -> tuple[str, ...]:
    """A comma-separated list, without blanks."""
    return tuple(filter(None, (item.strip() for item in text.split(","))))


def _check_url_syntax(urls: list[tuple[str, str]]) -> None:
    """Refuse a (name, url) pair whose URL cannot be read, in one line that names the
    variable and hides the password, rather than as a traceback from the first client that
    parses it (a ``ValueError`` in Katana, not a farm error)."""
    for name, url in urls:
        if not url:
            continue
        if uses_sentinel(url):
            try:
                SentinelUrl.parse(url)
            except ValueError as error:
                raise ConfigError(f"{PREFIX}{name}: {error}") from None
            continue
        if not _readable_redis_url(url):
            raise ConfigError(
                f"{PREFIX}{name}: not a Redis URL: {redact(url)} (expected "
                f"redis[s]://[USER:PASSWORD@]host[:port][/db], the password URL-encoded)")


def _readable_redis_url(url: str) -> bool:
    """Whether ``url`` reads as ``redis[s]://[USER:PASSWORD@]host[:port][/db]``."""
    try:
        parts = urlsplit(url)
        if not parts.hostname or parts.port == 0:  # .port: ValueError unless a number
            return False
    except ValueError:  # a bad IPv6 address, a port that is not one
        return False
    db = parts.path.strip("/")
    return parts.scheme.lower() in REDIS_SCHEMES and (not db or db.isdigit())


def _count(name: str, text: str, default: int) -> int:
    """A whole number, 0 or more."""
    if not text:
        return default
    if not text.isdigit():
        raise ConfigError(f"{PREFIX}{name}: expected a whole number, 0 or more, got {text!r}")
    return int(text)


def _read_secret(name: str, path: str) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as error:
        raise ConfigError(f"{PREFIX}{name}_FILE: cannot read {path}: {error.strerror}") from None


def _memory(text: str) -> str:
    if not re.fullmatch(r"[1-9][0-9]*(?:[kmg]b?)?", text.lower()):
        raise ConfigError(f"{PREFIX}REDIS_MAXMEMORY: expected a size such as 512mb or 2gb, "
                          f"got {text!r}")
    return text.lower()


def _pattern(name: str, text: str, groups: int = 0) -> str:
    """A regular expression (failure rules, frame progress), checked here so a bad one
    stops the node at start, not in the middle of a render."""
    try:
        compiled = re.compile(text)
    except re.error as error:
        raise ConfigError(f"{PREFIX}{name}: invalid regular expression {text!r}: {error}") \
            from None
    if text and compiled.groups < groups:
        raise ConfigError(f"{PREFIX}{name}: needs a group () around the frame number")
    return text


def _port(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{PREFIX}FLOWER_PORT: expected a port number, got {text!r}")
    return int(text)


def _login_part(name: str, value: str) -> str:
    """Flower reads its logins as ``user:password[,user:password]``: neither part may hold
    ``:`` or ``,``."""
    if ":" in value or "," in value:
        raise ConfigError(f"{PREFIX}{name}: may not contain ':' or ','")
    return value


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary container uid
        return str(os.getuid())


def redact(url: str) -> str:
    """``url`` with any password replaced, for messages and logs (each sentinel's, in a
    Sentinel URL; a mistyped URL's too, one without its scheme). Only a Sentinel URL is split
    on ``;``: in a ``redis://`` URL it may be part of the password."""
    if ";" in url and uses_sentinel(url):
        return ";".join(redact(part) for part in url.split(";"))
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
