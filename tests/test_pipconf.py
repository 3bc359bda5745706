"""worker_image/pipconf.py: the host's pip configuration, handed to the image build container.

These run the real script with the real ``pip config list`` under a pip configuration of the
test's own (``PIP_CONFIG_FILE``), on top of whatever configuration this machine has. The
container side (pip inside the base image honouring it) is tested in test_docker.py.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "worker_image" / "pipconf.py"


def hand_over(tmp_path: Path, config: str, **variables: str) -> tuple[dict, list[str]]:
    """Run pipconf.py under ``config``; return (merged configuration, docker run args)."""
    config_file = tmp_path / "conf" / "pip.conf"
    config_file.parent.mkdir(exist_ok=True)
    config_file.write_text(config)
    out = tmp_path / "out"
    env = {**os.environ, "PIP_CONFIG_FILE": str(config_file), **variables}
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, env=env,
                   cwd=tmp_path, timeout=60)
    merged = configparser.ConfigParser(interpolation=None)
    merged.read(out / "pip.conf")
    args = (out / "docker-args").read_bytes().split(b"\0")[:-1]
    return ({s: dict(merged[s]) for s in merged.sections()}, [a.decode() for a in args])


def mounts(args: list[str]) -> dict[str, str]:
    """{container path: host path} of the ``-v`` arguments."""
    pairs = [args[i + 1] for i, arg in enumerate(args) if arg == "-v"]
    return {pair.split(":")[1]: pair.split(":")[0] for pair in pairs}


def variables(args: list[str]) -> dict[str, str]:
    pairs = [args[i + 1] for i, arg in enumerate(args) if arg == "-e"]
    return dict(pair.split("=", 1) for pair in pairs)


def test_a_constraints_file_and_the_files_it_names_are_mounted_at_their_own_paths(tmp_path):
    pins = tmp_path / "pins"
    pins.mkdir()
    (pins / "constraints.txt").write_text("-c more.txt\nsix==1.16.0\n")
    (pins / "more.txt").write_text("click<9\n")
    merged, args = hand_over(tmp_path, f"[global]\nconstraint = {pins}/constraints.txt\n")

    assert merged["global"]["constraint"] == f"{pins}/constraints.txt"
    seen = mounts(args)
    assert seen[f"{pins}/constraints.txt"] == f"{pins}/constraints.txt"
    assert seen[f"{pins}/more.txt"] == f"{pins}/more.txt"  # named only inside the first file
    assert seen["/etc/celeryfarm-pip.conf"].endswith("/out/pip.conf")
    assert variables(args)["PIP_CONFIG_FILE"] == "/etc/celeryfarm-pip.conf"


def test_relative_paths_become_absolute_and_symlinks_are_mounted_by_target(tmp_path):
    (tmp_path / "real.txt").write_text("six==1.16.0\n")
    (tmp_path / "pins.txt").symlink_to(tmp_path / "real.txt")
    merged, args = hand_over(tmp_path, "[install]\nconstraint = pins.txt\n")

    assert merged["install"]["constraint"] == str(tmp_path / "pins.txt")
    assert mounts(args)[str(tmp_path / "pins.txt")] == str(tmp_path / "real.txt")


def test_pip_variables_pass_through_with_the_folders_they_name(tmp_path):
    wheels = tmp_path / "wheelhouse"
    wheels.mkdir()
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    _, args = hand_over(tmp_path, "[global]\n", PIP_FIND_LINKS=str(wheels),
                        PIP_EXTRA_INDEX_URL=index.as_uri(), PIP_DEFAULT_TIMEOUT="33",
                        https_proxy="http://proxy.invalid:3128")

    passed = variables(args)
    assert passed["PIP_FIND_LINKS"] == str(wheels)
    assert passed["PIP_DEFAULT_TIMEOUT"] == "33"
    assert passed["https_proxy"] == "http://proxy.invalid:3128"
    seen = mounts(args)
    assert seen[str(wheels)] == str(wheels)
    # A local index's pages link to files beside its simple/ folder: its parent is mounted.
    assert seen[str(index.parent)] == str(index.parent)


@pytest.mark.parametrize("configured", [True, False])
def test_the_ca_bundle_reaches_the_container_configured_or_the_host_default(
        tmp_path, configured):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a real certificate\n")
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("PIP_CERT", "REQUESTS_CA_BUNDLE")}
    environment["SSL_CERT_FILE"] = str(bundle)
    # /dev/null: pip reads no configuration file at all, so only PIP_CERT can name a cert.
    environment["PIP_CONFIG_FILE"] = os.devnull
    if configured:
        environment["PIP_CERT"] = str(bundle)
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out")], check=True,
                   env=environment, timeout=60)
    args = [a.decode() for a in (tmp_path / "out" / "docker-args").read_bytes().split(b"\0")]
    assert mounts(args)[str(bundle)] == str(bundle)
    assert variables(args)["PIP_CERT"] == str(bundle)
