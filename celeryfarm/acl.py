"""Who may do what on the farm's Redis: its roles as Redis ACL users, the one place that
defines them.

A farm whose Redis has ACL users gives each kind of process its own credential, and Redis
itself enforces what each may do (see the README's threat model):

* ``node``: render nodes. Every farm key and Celery key, Celery's channels and results;
  nothing of Redis's administration.
* ``flower``: the dashboard. Celery's keys and channels (events, remote control), results
  read-only; no job record.
* ``admin``: everything, the only one with ``FLUSHALL``, ``CONFIG``, ``ACL``, ``KEYS``...
* one user per artist (``celeryfarm user add NAME``): reads the whole farm, writes only
  their own jobs' records, histories, index and change feed (their names start with the
  artist's, see :meth:`~celeryfarm.records.keys.Keys.owned`), may only push to the Celery
  queues and to the farm's inbox, and has no access to Celery's remote control (so no
  revoke). A ``wrangler`` may also write every job's record and change feed: stop and
  restart anyone's job.

The rules are built from the farm's key prefix, so farms sharing a Redis get disjoint users'
rights. A job's user is the authenticated Redis user (:func:`authenticated_user`).

Run as ``python -m celeryfarm.acl [--replication] PATH`` (the compose file's ``preflight``
service), it writes the roles' lines of a Redis ACL file to PATH, with the passwords of the
variables ``CELERYFARM_REDIS_{ADMIN,NODE,FLOWER}_PASSWORD`` (and with ``--replication``,
``CELERYFARM_REDIS_{REPLICA,SENTINEL}_PASSWORD``) as SHA-256 hashes; as
``python -m celeryfarm.acl --sentinels PATH``, the sentinels' own users' ACL file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from .config import Settings
from .errors import ConfigError
from .records.keys import Keys
from .sentinel import SEPARATOR

#: The farm's own roles; artists are users of other names.
NODE, FLOWER, ADMIN = "node", "flower", "admin"
ROLES = (NODE, FLOWER, ADMIN)
#: The users of a replicated Redis (``celeryfarm up --replicas``): replicas copy the
#: primary as ``replica``, sentinels watch the servers and fail over as ``sentinel``.
REPLICA, SENTINEL = "replica", "sentinel"
REPLICATION_ROLES = (REPLICA, SENTINEL)
#: Names no artist may take.
RESERVED = ("default", *ROLES, *REPLICATION_ROLES)
#: Artists' user names: no glob or key-separator characters, so their key patterns say
#: exactly their keys.
USER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
#: Celery's result keys and channels (the result backend does not use the key prefix).
RESULTS = "celery-task-meta-*"

#: Every role but admin: the data commands, none of Redis's administration or of what
#: could hurt every user (FLUSHALL, FLUSHDB, CONFIG, REPLICAOF, MODULE, DEBUG, SHUTDOWN,
#: KEYS, ACL, CLIENT KILL, MONITOR, FUNCTION, SCRIPT FLUSH/KILL are @admin/@dangerous or
#: denied here); a user may still ask who it is.
BASE = ("resetkeys", "resetchannels", "-@all", "+@read", "+@write", "+@keyspace",
        "+@transaction", "+@connection", "+@scripting", "+@pubsub", "+time",
        "-@admin", "-@dangerous", "-function", "-script|flush", "-script|kill",
        "+acl|whoami")
#: The commands each of ``REPLICATION_ROLES`` needs (Redis's replication and Sentinel
#: documentation), no key: ``sentinel`` may make any server a replica (it fails over).
REPLICATION_RULES = {
    REPLICA: ("resetkeys", "resetchannels", "-@all", "+psync", "+replconf", "+ping"),
    SENTINEL: ("resetkeys", "resetchannels", "-@all", "&__sentinel__:hello", "+multi",
               "+exec", "+slaveof", "+ping", "+subscribe", "+publish", "+config|rewrite",
               "+role", "+info", "+client|setname", "+client|kill", "+script|kill"),
}
#: The users of the sentinels themselves (they have no keys, only Sentinel's commands):
#: ``default`` is the farm's clients' (its password is ``CELERYFARM_SENTINEL_PASSWORD``):
#: it may only find the primary and the replicas and follow a failover, never reconfigure
#: the sentinels (``SENTINEL SET``, ``MONITOR``, ``REMOVE``, ``RESET``, ``FAILOVER``,
#: ``CONFIG``, ``ACL``, ``SHUTDOWN``); ``sentinel`` is the sentinels' own among themselves
#: (``sentinel sentinel-user``): hellos and failover votes; ``admin`` is the operators'.
#: The clients' harmless connection commands go by category (``PING``, ``HELLO``, ``CLIENT
#: SETNAME``, and on Redis 7.2+ the ``CLIENT SETINFO`` redis-py sends), none of @admin.
SENTINEL_CLIENT = "default"
SENTINEL_RULES = {
    SENTINEL_CLIENT: ("resetchannels", "-@all", "+@connection", "-@admin", "-@dangerous",
                      "+sentinel|get-master-addr-by-name",
                      "+sentinel|master", "+sentinel|masters", "+sentinel|replicas",
                      "+sentinel|slaves", "+sentinel|sentinels", "+subscribe",
                      "+unsubscribe", "&+switch-master"),
    SENTINEL: ("resetchannels", "-@all", "&__sentinel__:hello", "+ping", "+publish",
               "+client|setname", "+sentinel|is-master-down-by-addr"),
    ADMIN: ("+@all", "&*"),
}


def _broker_db(settings: Settings) -> str:
    """The broker's database number, which kombu puts in its channels' names."""
    path = urlsplit(settings.broker_url).path.strip("/")
    return path or "0"


def _channels(settings: Settings) -> dict[str, str]:
    """kombu's pub/sub channels (and the patterns nodes and Flower subscribe to, which
    Redis compares literally): task events, worker events, remote control."""
    base = f"{settings.broker_key_prefix}/{_broker_db(settings)}."
    return {"events": f"{base}celeryev/*", "worker_events": f"{base}celeryev/worker.*",
            "task_sent": f"{base}celeryev/task.sent", "control": f"{base}celery.pidbox"}


def role_rules(role: str, settings: Settings) -> list[str]:
    """The ACL rules of one of the farm's ``ROLES``."""
    keys = Keys(settings.key_prefix)
    channels = _channels(settings)
    if role == ADMIN:
        return ["+@all", "~*", "&*"]
    if role == NODE:
        return [*BASE, f"~{keys.prefix}:*", f"~{RESULTS}", f"&{RESULTS}",
                f"&{channels['events']}", f"&{channels['worker_events']}",
                f"&{channels['control']}"]
    if role == FLOWER:
        return [*BASE, f"~{settings.broker_key_prefix}*", f"%R~{RESULTS}",
                f"&{channels['events']}", f"&{channels['control']}"]
    raise ConfigError(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")


def artist_rules(name: str, settings: Settings, wrangler: bool = False) -> list[str]:
    """The ACL rules of artist ``name``: read everything of the farm; write their own
    jobs (every job's record, for a ``wrangler``); push to the queues and the inbox;
    subscribe to results; publish only the event that says a task was sent."""
    check_name(name)
    keys = Keys(settings.key_prefix)
    # A wrangler's stop or restart of another's job writes its record and its owner's
    # change feed (see Keys.changes).
    writes = keys.owned(name) + ((keys.job("*"), keys.changes("*")) if wrangler else ())
    return [*BASE, f"%R~{keys.prefix}:*", f"%R~{RESULTS}", *(f"~{key}" for key in writes),
            f"&{_channels(settings)['task_sent']}",
            f"(+lpush +rpush +sadd ~{settings.broker_key_prefix}* ~{keys.inbox})",
            f"(+subscribe &{RESULTS})"]


def check_name(name: str) -> str:
    """``name`` if it may name an artist's user; raises :class:`ConfigError`."""
    if not USER_NAME.fullmatch(name) or name in RESERVED:
        raise ConfigError(f"user name {name!r}: use 1-32 lowercase letters, digits, '-' or "
                          f"'_', starting with a letter or digit, and none of "
                          f"{', '.join(RESERVED)}")
    return name


@dataclasses.dataclass(frozen=True)
class FarmUser:
    """A Redis user of the farm: a name, its password and its rules."""

    name: str
    password: str
    rules: tuple[str, ...]

    def acl_line(self) -> str:
        """The user as a line of a Redis ACL file: its password only as a SHA-256 hash."""
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        return " ".join(["user", self.name, "reset", "on", f"#{digest}", *self.rules])

    def setuser_args(self) -> list[str]:
        """``ACL SETUSER`` arguments that make (or remake) the user."""
        return [self.name, "reset", "on", f">{self.password}", *self.rules]

    def url(self, base_url: str) -> str:
        """``base_url`` (the farm's Redis, or its sentinels) with this user's credentials."""
        auth = f"{quote(self.name, safe='')}:{quote(self.password, safe='')}@"
        parts = [urlsplit(part) for part in base_url.split(SEPARATOR)]
        return SEPARATOR.join(
            urlunsplit(part._replace(netloc=auth + part.netloc.rpartition("@")[2]))
            for part in parts)


def new_password() -> str:
    """A password for a farm user (URL-safe, so it goes into redis:// URLs as it is)."""
    return secrets.token_urlsafe(24)


def role_users(settings: Settings, passwords: dict[str, str]) -> list[FarmUser]:
    """The farm's ``ROLES`` as users, with ``passwords`` (role -> password)."""
    return [FarmUser(role, passwords[role], tuple(role_rules(role, settings)))
            for role in ROLES]


def replication_users(passwords: Mapping[str, str]) -> list[FarmUser]:
    """The users of ``REPLICATION_ROLES`` with ``passwords`` (role -> password)."""
    return [FarmUser(role, passwords[role], REPLICATION_RULES[role])
            for role in REPLICATION_ROLES]


def sentinel_users(passwords: Mapping[str, str]) -> list[FarmUser]:
    """The sentinels' users (``SENTINEL_RULES``) with ``passwords`` (user -> password)."""
    return [FarmUser(name, passwords[name], rules) for name, rules in SENTINEL_RULES.items()]


def artist_user(name: str, settings: Settings, wrangler: bool = False,
                password: str = "") -> FarmUser:
    return FarmUser(name, password or new_password(),
                    tuple(artist_rules(name, settings, wrangler)))


def acl_file(users: Iterable[FarmUser], kept: Iterable[str] = ()) -> str:
    """A Redis ACL file: the default user off, ``users``, then the ``kept`` lines of other
    users (artists added since).

    No one can log in as the default user (it is off), but it keeps every permission:
    Redis 7 replays the append-only file's transactions as that user and re-checks them at
    EXEC, so a default user without rights loses every MULTI/EXEC write at a restart
    (redis/redis#14541)."""
    users = list(users)
    names = {"default", *(user.name for user in users)}
    others = [line for line in kept if line.split()[1:2] and line.split()[1] not in names]
    lines = ["user default off resetpass ~* &* +@all",
             *(user.acl_line() for user in users), *others]
    return "\n".join(lines) + "\n"


def set_user(admin: redis.Redis, user: FarmUser) -> None:
    """Make (or remake) ``user`` on a running Redis, and save the ACL file if it has one,
    so the user outlives a restart."""
    admin.execute_command("ACL", "SETUSER", *user.setuser_args())
    _save(admin)


def refresh_user(admin: redis.Redis, name: str, rules: Sequence[str]) -> None:
    """Give the existing user ``name`` ``rules`` (as this version makes them, after an
    upgrade), keeping its password and whether it is on: ``reset`` but its ``resetpass``
    and ``off``; and save the ACL file if it has one."""
    admin.execute_command("ACL", "SETUSER", name, "resetkeys", "resetchannels",
                          "clearselectors", "-@all", *rules)
    _save(admin)


def delete_user(admin: redis.Redis, name: str) -> bool:
    """Remove artist ``name``'s user from a running Redis, which also closes the
    connections signed in as it, and save the ACL file if it has one; False if there was
    no such user. Their jobs stay, as history."""
    removed = admin.execute_command("ACL", "DELUSER", check_name(name))
    _save(admin)
    return bool(removed)


def artists(admin: redis.Redis, settings: Settings) -> list[tuple[str, bool]]:
    """The farm's artists' users on a running Redis: (name, whether a wrangler: one whose
    rules may write every job's record). An artist's rules read every key of the farm's
    prefix; the roles, and users of anything else sharing the Redis, are left out."""
    keys = Keys(settings.key_prefix)
    reads_farm, every_job = f"%R~{keys.prefix}:*", f"~{keys.job('*')}"
    found = []
    for name in sorted(name.decode() if isinstance(name, bytes) else name
                       for name in admin.acl_users()):
        if name in RESERVED or not USER_NAME.fullmatch(name):
            continue
        patterns = [key.decode() if isinstance(key, bytes) else key
                    for key in admin.acl_getuser(name)["keys"]]
        if reads_farm in patterns:
            found.append((name, every_job in patterns))
    return found


def _save(admin: redis.Redis) -> None:
    """Save the users to Redis's ACL file, where it has one."""
    try:
        admin.execute_command("ACL", "SAVE")
    except redis.ResponseError as error:
        if "aclfile" not in str(error).lower():
            raise


def authenticated_user(client: redis.Redis) -> str:
    """The Redis user ``client`` is authenticated as; "" for Redis's ``default`` user (a
    farm without ACL users, where the job's user is the login name)."""
    try:
        name = client.acl_whoami()
    except redis.ResponseError:  # a Redis without ACLs
        return ""
    return "" if name == "default" else name


def password_variable(role: str) -> str:
    """The variable the compose file gives ``role``'s password in."""
    return f"CELERYFARM_REDIS_{role.upper()}_PASSWORD"


def write_roles(path: Path, environ: Mapping[str, str], replication: bool = False) -> None:
    """Write the roles' ACL file lines (the default user off, then node, flower, admin, and
    with ``replication`` replica and sentinel) with the passwords ``environ`` holds;
    readable by all: it holds only hashes."""
    settings = Settings.from_env(environ)
    roles = (*ROLES, *REPLICATION_ROLES) if replication else ROLES
    passwords = {role: environ.get(password_variable(role), "") for role in roles}
    missing = [password_variable(role) for role, password in passwords.items() if not password]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set")
    users = role_users(settings, passwords)
    if replication:
        users += replication_users(passwords)
    _write_hashes(path, acl_file(users))


#: Where :func:`write_sentinel_users` reads each sentinel user's password.
SENTINEL_PASSWORD_VARIABLES = {SENTINEL_CLIENT: "CELERYFARM_SENTINEL_PASSWORD",
                               SENTINEL: password_variable(SENTINEL),
                               ADMIN: password_variable(ADMIN)}


def write_sentinel_users(path: Path, environ: Mapping[str, str]) -> None:
    """Write the sentinels' ACL file (their ``aclfile``): :func:`sentinel_users` with the
    passwords of ``SENTINEL_PASSWORD_VARIABLES``; readable by all: it holds only hashes."""
    passwords = {user: environ.get(variable, "")
                 for user, variable in SENTINEL_PASSWORD_VARIABLES.items()}
    missing = [SENTINEL_PASSWORD_VARIABLES[user] for user, value in passwords.items()
               if not value]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set")
    _write_hashes(path, "".join(user.acl_line() + "\n" for user in sentinel_users(passwords)))


def _write_hashes(path: Path, text: str) -> None:
    """Replace the ACL file ``path`` at once with ``text`` (hashes only: readable by all)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.chmod(0o644)
    partial.replace(path)


if __name__ == "__main__":
    # --replication (docker-compose.sentinel.yml): the replicas' and sentinels' users too;
    # --sentinels: the users of the sentinels themselves.
    flags = {arg for arg in sys.argv[1:] if arg.startswith("--")}
    arguments = [arg for arg in sys.argv[1:] if arg not in flags]
    try:
        if "--sentinels" in flags:
            write_sentinel_users(Path(arguments[0]), os.environ)
        else:
            write_roles(Path(arguments[0]), os.environ, "--replication" in flags)
    except (ConfigError, OSError, IndexError) as error:
        sys.exit(f"cannot write the farm's Redis users: {error}")
