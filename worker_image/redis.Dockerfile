# A Redis server image built from the local base image, for machines that cannot reach an
# image registry. worker_image/build.sh builds it (with --network host, because redis-server
# comes from the Debian mirror) and tags it with the name docker-compose.yml and the Docker
# tests use: ${CELERYFARM_REDIS_IMAGE:-redis:7-bookworm}. It behaves like the official image
# for what celeryfarm needs: redis-server and redis-cli on PATH, data in /data, runs as the
# unprivileged user "redis", default command `redis-server`. That user is uid/gid 999, as in
# the official image, so a TLS key given to group 999 (make-certs.sh --redis-group 999) is
# readable by Redis in either image.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# policy-rc.d: the package must not try to start a service inside the build.
RUN set -eux; \
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; \
    groupadd --system --gid 999 redis; \
    useradd --system --uid 999 --gid redis --home-dir /var/lib/redis --shell /usr/sbin/nologin redis; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools; \
    rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d; \
    mkdir -p /data; chown redis:redis /data; \
    redis-server --version; \
    test "$(id -u redis):$(id -g redis)" = 999:999

LABEL io.celeryfarm.image=redis \
      org.opencontainers.image.description="redis-server from Debian, built locally by celeryfarm"
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
