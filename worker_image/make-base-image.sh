#!/usr/bin/env bash
# Provide the worker image's base image locally, without an image registry.
#
# If the tag that worker_image/Dockerfile builds FROM (its `ARG BASE_IMAGE=` default, e.g.
# python:3.11-slim-bookworm) is not in the local engine, build an equivalent with debootstrap
# (Debian bookworm minbase + python3, python3-venv, ca-certificates, tini) and `docker import`
# it under that tag, so the Dockerfile builds unchanged and offline. When the real image is
# present (pulled or loaded) nothing is done.
#
# The debootstrap result is cached as a tarball, so a rerun after `docker rmi` or
# `docker system prune -a` only re-imports it (a few seconds instead of ~40 s).
#
# Environment:
#   CELERYFARM_BASE_IMAGE    tag to provide        (default: the Dockerfile's BASE_IMAGE default)
#   CELERYFARM_DEBIAN_MIRROR Debian mirror          (default: the one this machine's apt uses)
#   CELERYFARM_CACHE_DIR     tarball cache          (default: ${XDG_CACHE_HOME:-~/.cache}/celeryfarm)
#   CELERYFARM_REBUILD_BASE  1 = ignore the cached tarball and any existing image
# Needs root (debootstrap) and a running Docker engine (.ci/docker-engine.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=bookworm
includes=python3,python3-venv,ca-certificates,tini

say() { printf 'make-base-image: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

default_tag=$(sed -n 's/^ARG BASE_IMAGE=\(.*\)$/\1/p' "$here/Dockerfile" | head -n 1)
tag=${CELERYFARM_BASE_IMAGE:-$default_tag}
[ -n "$tag" ] || die "no BASE_IMAGE default found in $here/Dockerfile"
rebuild=${CELERYFARM_REBUILD_BASE:-0}

if [ "$rebuild" != 1 ] && docker image inspect "$tag" >/dev/null 2>&1; then
    say "$tag is present; nothing to do"
    exit 0
fi

# The Debian mirror this machine's apt already uses for $suite (deb822 .sources files first,
# then one-line .list files), so the build reaches the same package registry as apt does.
# $1: suite name to look for (bookworm, bookworm-security, ...).
apt_mirror() {
    local want=$1 f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk -v want="$want" '
            function flush() { if (is_deb && has_suite && uri != "" && !found) { print uri; found = 1 }
                               is_deb = 0; has_suite = 0; uri = "" }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "types:"  { for (i = 2; i <= NF; i++) if ($i == "deb") is_deb = 1 }
            tolower($1) == "uris:"   { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == want) has_suite = 1 }
            tolower($1) == "enabled:" && tolower($2) == "no" { is_deb = 0; has_suite = 0; uri = "" }
            END { flush() }' "$f")
        if [ -n "$uri" ]; then echo "$uri"; return 0; fi
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # deb [options] URI suite components...
        uri=$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
              awk -v want="$want" '$1 == "deb" && $3 == want { print $2; exit }')
        if [ -n "$uri" ]; then echo "$uri"; return 0; fi
    done
    return 1
}

mirror=${CELERYFARM_DEBIAN_MIRROR:-$(apt_mirror "$suite" || echo http://deb.debian.org/debian)}
security_mirror=$(apt_mirror "$suite-security" || true)
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
cache_dir=${CELERYFARM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/celeryfarm}
# The tarball's name records what went into it, so changing the package list rebuilds it.
key=$(printf '%s\n' "$suite" "$arch" "$includes" "$mirror" "$security_mirror" | sha256sum | cut -c1-12)
tarball="$cache_dir/debootstrap-$suite-$arch-$key.tar.gz"

if [ "$rebuild" = 1 ] || [ ! -s "$tarball" ]; then
    [ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap is missing (run .ci/docker-engine.sh)"
    mkdir -p "$cache_dir"
    root=$(mktemp -d "${TMPDIR:-/var/tmp}/celeryfarm-rootfs.XXXXXX")
    cleanup() {
        # debootstrap mounts /proc and /sys inside the target; never rm -rf across a mount.
        local m
        for m in $(awk -v r="$root" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r); do
            umount -l "$m" 2>/dev/null || true
        done
        rm -rf --one-file-system "$root" "$tarball.tmp"
    }
    trap cleanup EXIT
    say "debootstrap $suite ($includes) from $mirror into $root"
    start=$SECONDS
    debootstrap --variant=minbase --include="$includes" --arch="$arch" \
        "$suite" "$root" "$mirror" >"$root.log" 2>&1 || {
        tail -n 30 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed"; }
    rm -f "$root.log"
    say "debootstrap took $((SECONDS - start))s"

    # Make it look like a container base image: apt sources for updates, no package lists or
    # downloaded .debs (a Dockerfile runs apt-get update first), no host identity.
    {
        echo "deb $mirror $suite main"
        echo "deb $mirror $suite-updates main"
        [ -z "$security_mirror" ] || echo "deb $security_mirror $suite-security main"
    } >"$root/etc/apt/sources.list"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb \
           "$root"/var/cache/apt/*.bin "$root"/var/log/*.log "$root"/tmp/* "$root"/var/tmp/*
    : >"$root/etc/resolv.conf"
    : >"$root/etc/hostname"
    : >"$root/etc/machine-id"
    # Like the official images: no recommends, no docs in later apt-get installs.
    echo 'APT::Install-Recommends "false";' >"$root/etc/apt/apt.conf.d/99celeryfarm-norecommends"

    tar --numeric-owner --xattrs -C "$root" -c . | gzip -1 >"$tarball.tmp"
    mv "$tarball.tmp" "$tarball"
    say "cached $tarball ($(du -h "$tarball" | cut -f1))"
else
    say "using cached $tarball"
fi

say "importing as $tag"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description="Debian '"$suite"' minbase + python3 (debootstrap, built locally by celeryfarm)"' \
    --change 'LABEL io.celeryfarm.base=debootstrap' \
    --change 'CMD ["python3"]' \
    "$tarball" "$tag" >/dev/null
say "$tag ready"
