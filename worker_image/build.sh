#!/usr/bin/env bash
# Build everything the containers need, from a machine that reaches PyPI and the Debian mirror
# but no image registry:
#   1. the Docker engine (.ci/docker-engine.sh: installs/starts it when missing)
#   2. the base image, when the tag is missing (make-base-image.sh, debootstrap)
#   3. worker_image/wheels/: wheels of celeryfarm[flower] and every dependency, made by the
#      base image's Python (so the image build needs no package index)
#   4. the Redis image docker-compose.yml and the tests use (redis.Dockerfile)
#   5. the worker image (Dockerfile), also used by the flower service
# Idempotent; a rerun with nothing changed takes a few seconds (wheels are rebuilt only when
# pyproject.toml or celeryfarm/ changed, docker's layer cache does the rest).
#
# Environment (all optional; each is also read from the repository's .env, as docker-compose
# reads it, when the shell does not set it):
#   CELERYFARM_WORKER_IMAGE  worker image tag     (default celeryfarm-worker:latest)
#   CELERYFARM_REDIS_IMAGE   Redis image tag      (default redis:7-bookworm)
#   CELERYFARM_BASE_IMAGE    base image tag       (default: the Dockerfile's BASE_IMAGE)
#   CELERYFARM_RENDER_UID / CELERYFARM_RENDER_GID  uid/gid of the image's render user (1000)
#   CELERYFARM_NODE_UID      uid of the image's worker user, `node` (1001)
#   PYTHON                   host Python whose pip configuration the build uses (python3)
# pip's own configuration (files and PIP_* variables, constraints included) applies as on the
# host: see pip-in-base.sh.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
# setting NAME DEFAULT: the shell's $NAME, else .env's NAME=value (its last, unquoted), else
# DEFAULT; so the image's users get the uid/gid the compose file's .env gives them.
setting() {
    local value=${!1:-}
    if [ -z "$value" ] && [ -f "$repo/.env" ]; then
        value=$(sed -n "s/^$1=//p" "$repo/.env" | tail -n 1 | sed -e "s/^[\"']//" -e "s/[\"']\$//")
    fi
    printf '%s' "${value:-$2}"
}
worker_image=$(setting CELERYFARM_WORKER_IMAGE celeryfarm-worker:latest)
redis_image=$(setting CELERYFARM_REDIS_IMAGE redis:7-bookworm)
default_base=$(sed -n 's/^ARG BASE_IMAGE=\(.*\)$/\1/p' "$here/Dockerfile" | head -n 1)
base_image=$(setting CELERYFARM_BASE_IMAGE "$default_base")
render_uid=$(setting CELERYFARM_RENDER_UID 1000)
render_gid=$(setting CELERYFARM_RENDER_GID 1000)
node_uid=$(setting CELERYFARM_NODE_UID 1001)
wheels=$here/wheels

say() { printf 'build: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
t0=$SECONDS
step() { say "[$((SECONDS - t0))s] $*"; }

step "docker engine"
"$repo/.ci/docker-engine.sh"

step "base image $base_image"
CELERYFARM_BASE_IMAGE=$base_image "$here/make-base-image.sh"

# --- wheels ------------------------------------------------------------------------------
# The wheelhouse is made by the base image's own Python, in a throwaway container on the host
# network, not by the host's Python: pip evaluates environment markers (for example redis'
# `async-timeout; python_full_version < "3.11.3"`) against the interpreter that runs it, and
# `pip download --python-version` does not change that. pip-in-base.sh hands the container this
# host's whole pip configuration (files, the files they name, PIP_* variables, CA bundle), so it
# reaches whatever package index the host uses. The image build itself then installs with
# --no-index.
hash_files() { (cd "$repo" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 |
                 sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }
pip_in_base() { CELERYFARM_BASE_IMAGE=$base_image "$here/pip-in-base.sh" "$1" >/dev/null; }
pip_conf=$(mktemp -d)
trap 'rm -rf "$pip_conf"' EXIT
"${PYTHON:-python3}" "$here/pipconf.py" "$pip_conf"
base_id=$(docker image inspect --format '{{.Id}}' "$base_image")
deps_stamp="$base_id $(hash_files pyproject.toml) $(cat "$pip_conf/stamp")"
app_stamp="$base_id $(hash_files pyproject.toml celeryfarm $(cd "$repo" && ls -d README* LICENSE* 2>/dev/null))"

mkdir -p "$wheels"
if [ "$(cat "$wheels/app.stamp" 2>/dev/null)" != "$app_stamp" ] || ! ls "$wheels"/app/*.whl >/dev/null 2>&1; then
    step "wheel of celeryfarm"
    rm -rf "$wheels/app" "$wheels/app.stamp"
    mkdir -p "$wheels/app"
    # Build from a copy of what goes into the wheel: the source tree is mounted read-only,
    # setuptools writes build/ next to the sources, and the checkout may hold big renders.
    pip_in_base 'mkdir /tmp/src; cd /repo
                 cp -r pyproject.toml celeryfarm /tmp/src/
                 for f in README* LICENSE* setup.cfg MANIFEST.in; do
                     [ ! -e "$f" ] || cp -r "$f" /tmp/src/; done
                 $PIP wheel --quiet --no-deps --wheel-dir /wheels/app /tmp/src'
    echo "$app_stamp" >"$wheels/app.stamp"
else
    step "wheel of celeryfarm is up to date"
fi

if [ "$(cat "$wheels/deps.stamp" 2>/dev/null)" != "$deps_stamp" ] || ! ls "$wheels"/deps/*.whl >/dev/null 2>&1; then
    step "dependency wheels"
    rm -rf "$wheels/deps" "$wheels/deps.stamp"
    mkdir -p "$wheels/deps"
    app_wheel=$(basename "$(ls "$wheels"/app/celeryfarm-*.whl | head -n 1)")
    # `pip wheel` also turns any sdist-only dependency into a wheel, so the image build never
    # compiles or fetches anything.
    pip_in_base "\$PIP wheel --quiet --wheel-dir /wheels/deps 'celeryfarm[flower] @ file:///wheels/app/$app_wheel'
                 rm -f /wheels/deps/celeryfarm-*.whl"
    echo "$deps_stamp" >"$wheels/deps.stamp"
else
    step "dependency wheels are up to date"
fi

# --- images ------------------------------------------------------------------------------
# Do not overwrite a real (pulled or loaded) image of that name: only build when the tag is
# missing or is one of ours (then the layer cache makes this quick).
if docker image inspect "$redis_image" >/dev/null 2>&1; then
    redis_label=$(docker image inspect --format '{{index .Config.Labels "io.celeryfarm.image"}}' "$redis_image")
else
    redis_label=missing
fi
if [ "$redis_label" = missing ] || [ "$redis_label" = redis ]; then
    step "redis image $redis_image"
    docker build --quiet --force-rm --network host --build-arg BASE_IMAGE="$base_image" \
        --tag "$redis_image" - <"$here/redis.Dockerfile" >/dev/null
else
    step "redis image $redis_image exists and is not ours; leaving it"
fi

step "worker image $worker_image"
docker build --quiet --force-rm --network host \
    --build-arg BASE_IMAGE="$base_image" \
    --build-arg RENDER_UID="$render_uid" --build-arg RENDER_GID="$render_gid" \
    --build-arg NODE_UID="$node_uid" \
    --tag "$worker_image" "$here" >/dev/null

step "done: $worker_image, $redis_image (base $base_image)"
