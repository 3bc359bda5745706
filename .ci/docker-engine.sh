#!/usr/bin/env bash
# Make sure a working Docker engine (and docker-compose v1, debootstrap) is available.
#
# Idempotent: installs what is missing with apt, starts dockerd in the background when
# `docker info` does not answer, and waits (bounded) until it does. CI runs this on a fresh
# machine before anything that needs containers; on a machine where the engine already runs
# it returns in well under a second.
#
# Environment:
#   CELERYFARM_DOCKERD_LOG      dockerd's log file        (default /tmp/dockerd.log)
#   CELERYFARM_DOCKERD_TIMEOUT  seconds to wait for it     (default 90)
set -euo pipefail

log_file=${CELERYFARM_DOCKERD_LOG:-/tmp/dockerd.log}
timeout=${CELERYFARM_DOCKERD_TIMEOUT:-90}

say() { printf 'docker-engine: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@" || die "needs root for: $* (sudo -n failed)"
    else
        die "needs root for: $* (not root, no sudo)"
    fi
}

# 1. Packages. dockerd comes with docker.io; check each command, not just the client
#    (`docker --version` answers on machines that only have the client).
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    # de-duplicate
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    say "installing ${missing[*]} with apt"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}"
fi

# 2. Engine.
if docker info >/dev/null 2>&1; then
    say "engine already running ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
    exit 0
fi

if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd is running but not answering yet; waiting for it"
elif [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    say "starting docker with systemctl"
    as_root systemctl start docker || die "systemctl start docker failed (see journalctl -u docker)"
else
    say "starting dockerd in the background (log: $log_file)"
    # setsid + nohup: the daemon must not die with this script's shell or its terminal.
    as_root sh -c "setsid nohup dockerd >>'$log_file' 2>&1 </dev/null &"
fi

deadline=$((SECONDS + timeout))
until docker info >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "dockerd did not answer within ${timeout}s; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 2>/dev/null || true
        die "no Docker engine"
    fi
    if ! pgrep -x dockerd >/dev/null 2>&1 && [ ! -d /run/systemd/system ]; then
        say "dockerd exited; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 2>/dev/null || true
        die "dockerd failed to start"
    fi
    sleep 0.5
done
say "engine ready after $((SECONDS))s ($(docker version --format '{{.Server.Version}}'))"
