"""Hand this host's pip configuration to a build container.

The worker image's wheels are made by the base image's own Python in a throwaway container
(see build.sh), and that pip must reach the same package index as the host's, through the same
mirror, proxy, certificates and constraints. Copying configuration files is not enough: they
name other files (a constraints file beside pip.conf, a CA bundle, a find-links folder, a
``file://`` index), and so do ``PIP_*`` variables.

So this script asks the host's pip for its effective configuration once (``pip config list``:
every configuration file, merged, in pip's own order), writes it as one file, and finds every
file or folder a value names. ``build.sh`` mounts each of those read-only at the *same path*
in the container, so no value needs rewriting and nothing about this machine is hard-coded.

    python3 pipconf.py OUT_DIR

writes, in OUT_DIR:
  pip.conf     the merged configuration files (the container's PIP_CONFIG_FILE)
  docker-args  ``docker run`` arguments, NUL-separated: the mounts and the ``PIP_*`` variables
  stamp        a hash of the configuration and of every file it names (rebuild when it changes)
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import os
import re
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

#: Where the merged configuration file is mounted in the container.
CONTAINER_CONFIG = "/etc/celeryfarm-pip.conf"
#: Options whose values name files relative to the working folder when not absolute.
PATH_OPTIONS = {"cert", "client-cert", "constraint", "requirement", "find-links", "src"}
#: Options that name package indexes: a local index (``file:///srv/pypi/simple``) links to
#: files beside its ``simple`` folder (``../../files/...``), so its parent folder is mounted.
INDEX_OPTIONS = {"index-url", "extra-index-url"}
#: Lines of a requirements or constraints file that name further files or folders.
NESTED = re.compile(
    r"^\s*(?:-r|-c|-f|-i|--requirement|--constraint|--find-links|--index-url|--extra-index-url)"
    r"(?:\s*=\s*|\s+)(\S+)"
)
#: Proxy variables the container needs to reach the index the way this host does.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                   "NO_PROXY")
#: Set by build.sh for the container itself; the host's values would be wrong there.
OWN_VARIABLES = {"PIP_CONFIG_FILE", "PIP_NO_CACHE_DIR", "PIP_NO_INPUT"}


def effective_configuration() -> dict[str, str]:
    """``{"section.option": value}`` from every pip configuration file, merged by pip itself.

    ``PIP_*`` variables are left out (``:env:`` entries): they are passed on as variables, so
    they keep overriding the files in the container as they do here.
    """
    try:
        listing = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"pipconf: cannot read pip's configuration with {sys.executable}: {error}")
    entries = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        if not sep or key.startswith(":env:"):
            continue
        entries[key] = ast.literal_eval(value)  # pip prints each value with repr()
    return entries


def local_path(token: str, option: str, base: Path) -> Path | None:
    """The file or folder a configuration token names, if it names one that exists here."""
    if token.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(token).path))
    elif token.startswith(("/", "~")) or option in PATH_OPTIONS:
        path = base / Path(token).expanduser()
    else:
        return None
    return path.absolute() if path.exists() else None


class Mounts:
    """The host paths the container must see, each at its own path, read-only."""

    def __init__(self) -> None:
        self.paths: dict[Path, None] = {}  # ordered set

    def add(self, path: Path, option: str) -> None:
        if option in INDEX_OPTIONS and path.is_dir() and path.parent != Path(path.anchor):
            path = path.parent
        if path in self.paths:
            return
        self.paths[path] = None
        if path.is_file() and option in {"constraint", "requirement"}:
            self.add_nested(path)

    def add_nested(self, listing: Path) -> None:
        """Files a requirements/constraints file names (``-c other.txt``, ``-f folder``)."""
        for line in listing.read_text(errors="replace").splitlines():
            match = NESTED.match(line)
            if not match:
                continue
            flag = line.split()[0].lstrip("-").split("=")[0]
            option = {"r": "requirement", "c": "constraint", "f": "find-links", "i": "index-url"
                      }.get(flag, flag)
            found = local_path(match.group(1), option, listing.parent)
            if found:
                self.add(found, option)

    def covered(self) -> list[Path]:
        """The paths to mount: those not already inside another mounted folder."""
        folders = [path for path in self.paths if path.is_dir()]
        return [path for path in self.paths
                if not any(folder != path and folder in path.parents for folder in folders)]

    def stamp_files(self) -> list[Path]:
        return sorted(path for path in self.paths if path.is_file())


def value_paths(option: str, value: str, mounts: Mounts) -> str:
    """Record the paths ``value`` names; return it with relative paths made absolute."""
    tokens = []
    for token in value.split():
        found = local_path(token, option, Path.cwd())
        if found:
            mounts.add(found, option)
            if not token.startswith("file:"):
                token = str(found)
        tokens.append(token)
    return " ".join(tokens)


def default_ca_bundle() -> Path | None:
    """This host's CA bundle, for a container that gets no ``cert`` from the configuration:
    the host may trust a proxy's certificate that the base image does not."""
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("SSL_CERT_FILE"),
                      paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate).absolute()
    return None


def main(out_dir: Path) -> None:
    mounts = Mounts()
    merged = configparser.ConfigParser(interpolation=None)
    for key, value in effective_configuration().items():
        section, _, option = key.partition(".")
        if not merged.has_section(section):
            merged.add_section(section)
        merged.set(section, option, value_paths(option, value, mounts))

    variables = {}
    for name, value in os.environ.items():
        if name.startswith("PIP_") and name not in OWN_VARIABLES:
            option = name[4:].lower().replace("_", "-")
            variables[name] = value_paths(option, value, mounts)
        elif name in PROXY_VARIABLES:
            variables[name] = value
    configured_cert = "PIP_CERT" in variables or any(
        merged.has_option(section, "cert") for section in merged.sections())
    bundle = None if configured_cert else default_ca_bundle()
    if bundle:
        mounts.add(bundle, "cert")
        variables["PIP_CERT"] = str(bundle)

    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "pip.conf"
    with config_file.open("w") as stream:
        merged.write(stream)
    args = ["-v", f"{config_file.absolute()}:{CONTAINER_CONFIG}:ro",
            "-e", f"PIP_CONFIG_FILE={CONTAINER_CONFIG}"]
    for path in mounts.covered():
        args += ["-v", f"{path.resolve()}:{path}:ro"]
    for name, value in sorted(variables.items()):
        args += ["-e", f"{name}={value}"]
    (out_dir / "docker-args").write_bytes(b"".join(arg.encode() + b"\0" for arg in args))

    digest = hashlib.sha256(config_file.read_bytes())
    digest.update(repr(sorted(variables.items())).encode())
    for path in mounts.stamp_files():
        digest.update(str(path).encode() + b"\0" + path.read_bytes())
    (out_dir / "stamp").write_text(digest.hexdigest()[:16] + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(Path(sys.argv[1]))
