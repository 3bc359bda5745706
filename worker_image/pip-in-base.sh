#!/usr/bin/env bash
# Run a pip snippet in a throwaway container of the base image, with this host's pip set-up.
#
#   worker_image/pip-in-base.sh 'SHELL-SNIPPET'
#
# The snippet runs under `sh -eu` with $PIP set to a fresh venv's pip, this checkout mounted
# read-only at /repo and worker_image/wheels/ at /wheels, on the host network. The container
# gets this host's effective pip configuration: every configuration file merged into one,
# every file or folder the configuration or a PIP_* variable names (constraints, requirements,
# certificates, find-links, local indexes) mounted read-only at its own path, the PIP_* and
# proxy variables, and the host's CA bundle when no certificate is configured (pipconf.py).
# Prints the snippet's output; if it fails, that output goes to stderr and the exit status is 1.
# build.sh uses it, and so does the test of the pip hand-over (tests/test_image_build.py).
#
# Environment:
#   CELERYFARM_BASE_IMAGE  image to run (default: the Dockerfile's BASE_IMAGE)
#   PYTHON                 the host Python whose pip configuration is handed over (python3)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
default_base=$(sed -n 's/^ARG BASE_IMAGE=\(.*\)$/\1/p' "$here/Dockerfile" | head -n 1)
base_image=${CELERYFARM_BASE_IMAGE:-$default_base}
[ $# -eq 1 ] || { echo "usage: $0 'SHELL-SNIPPET'" >&2; exit 2; }

conf_dir=$(mktemp -d)
out=$(mktemp)
trap 'rm -rf "$conf_dir" "$out"' EXIT
"${PYTHON:-python3}" "$here/pipconf.py" "$conf_dir"
mapfile -d '' pip_args <"$conf_dir/docker-args"

mkdir -p "$here/wheels"
args=(--rm --network host --user "$(id -u):$(id -g)" --entrypoint sh
      -e HOME=/tmp -e PIP_NO_CACHE_DIR=1 -e PIP_NO_INPUT=1
      -v "$repo:/repo:ro" -v "$here/wheels:/wheels" "${pip_args[@]}")
if ! docker run "${args[@]}" "$base_image" -c "set -eu
        python3 -m venv /tmp/venv; PIP='/tmp/venv/bin/python -m pip'
        $1" >"$out" 2>&1; then
    cat "$out" >&2
    echo "pip-in-base: ERROR: pip failed in a $base_image container" >&2
    exit 1
fi
cat "$out"
