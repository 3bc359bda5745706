#!/usr/bin/env bash
# Make the certificates for TLS between the farm's hosts and Redis, with openssl:
#   DIR/ca/ca.key, ca.crt                     the farm's CA (its key never leaves DIR/ca)
#   DIR/redis/redis.crt, redis.key, ca.crt    Redis's certificate, mounted into Redis only
#   DIR/client/client.crt, client.key, ca.crt a client certificate for the nodes, Flower and
#                                             the Katana hosts (Redis asks for one when it
#                                             runs with tls-auth-clients yes)
#
#   worker_image/make-certs.sh [--dir DIR] [--host NAME]... [--redis-group GID]
#                              [--client-group GID] [--days N]
#
# DIR defaults to ./.celeryfarm/tls (git ignores .celeryfarm/). Nothing here is committed or
# built into an image: docker-compose.tls.yml mounts DIR/redis and DIR/client at run time.
# Redis's certificate names the compose service `redis`, localhost, 127.0.0.1 and ::1; add
# each name or address the Katana hosts use to reach Redis with --host (DNS names and IP
# addresses both work). An existing CA is kept, so running the script again issues new
# certificates that every host already trusts; delete DIR/ca to start a new CA.
#
# Private keys are 0600, owned by whoever runs this. --redis-group and --client-group make a
# key 0640 and give it to a group instead (chgrp: needs root, or membership of that group):
# the compose farm's Redis runs as uid/gid 999 and its nodes and Flower as the `node` user,
# whose own group is CELERYFARM_NODE_UID (1001); renders run as another user in another
# group, so they cannot read the client key. For docker-compose.tls.yml:
#   sudo worker_image/make-certs.sh --redis-group 999 --client-group 1001 --host farm.example
set -euo pipefail

dir=./.celeryfarm/tls
days=825
hosts=(redis localhost 127.0.0.1 ::1)
redis_group=""
client_group=""

die() { printf 'make-certs: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
    case $1 in
        --dir) dir=${2:?--dir needs a folder}; shift 2 ;;
        --host) hosts+=("${2:?--host needs a name or an address}"); shift 2 ;;
        --redis-group) redis_group=${2:?--redis-group needs a group}; shift 2 ;;
        --client-group) client_group=${2:?--client-group needs a group}; shift 2 ;;
        --days) days=${2:?--days needs a number}; shift 2 ;;
        -h|--help) usage 0 ;;
        *) printf 'make-certs: unknown argument %s\n' "$1" >&2; usage ;;
    esac
done
[[ $days =~ ^[1-9][0-9]*$ ]] || die "--days: expected a number of days, got $days"
command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"

# Every file is made private first; certificates are opened up once written.
umask 077
mkdir -p "$dir/ca" "$dir/redis" "$dir/client"
chmod 0755 "$dir" "$dir/redis" "$dir/client"
chmod 0700 "$dir/ca"
# On the same file system as DIR, so the keys are moved into place, not copied.
work=$(mktemp -d "$dir/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

subject_alt_names() {
    local name names=()
    for name in "${hosts[@]}"; do
        if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
            names+=("IP:$name")
        else
            names+=("DNS:$name")
        fi
    done
    local IFS=,
    printf '%s' "${names[*]}"
}

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ ! -s "$dir/ca/ca.key" ] || [ ! -s "$dir/ca/ca.crt" ]; then
    new_key "$dir/ca/ca.key"
    openssl req -x509 -new -key "$dir/ca/ca.key" -sha256 -days 3650 \
        -subj "/O=celeryfarm/CN=celeryfarm farm CA $(date -u +%Y%m%dT%H%M%SZ)" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out "$dir/ca/ca.crt"
    chmod 0644 "$dir/ca/ca.crt"
    echo "make-certs: new CA in $dir/ca (keep ca.key there, never copy it to a host)"
else
    echo "make-certs: keeping the CA in $dir/ca"
fi

# issue NAME EXTENDED_KEY_USAGE SUBJECT_CN [SANS]: $work/NAME.{key,crt}
issue() {
    local folder=$1 usage=$2 cn=$3 sans=${4:-}
    local key="$work/$folder.key" csr="$work/$folder.csr" ext="$work/$folder.ext"
    new_key "$key"
    openssl req -new -key "$key" -subj "/O=celeryfarm/CN=$cn" -out "$csr"
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$usage"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid,issuer"
        [ -n "$sans" ] && echo "subjectAltName=$sans"
    } >"$ext"
    openssl x509 -req -in "$csr" -CA "$dir/ca/ca.crt" -CAkey "$dir/ca/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" -sha256 -days "$days" -extfile "$ext" \
        -out "$work/$folder.crt" 2>/dev/null
    openssl verify -CAfile "$dir/ca/ca.crt" "$work/$folder.crt" >/dev/null
}

# give KEY FOLDER NAME GROUP: the key into place, 0600, or 0640 for GROUP.
give() {
    local key=$1 target=$2 group=$3
    if [ -n "$group" ]; then
        chgrp "$group" "$key" 2>/dev/null \
            || die "cannot give $target to group $group (run as root, or as a member of it)"
        chmod 0640 "$key"
    else
        chmod 0600 "$key"
    fi
    mv -f "$key" "$target"
}

# Redis shows its certificate as a client too: to its own health check (redis-cli), and to
# its primary when it is a replica.
issue redis serverAuth,clientAuth redis "$(subject_alt_names)"
issue client clientAuth celeryfarm-client
for folder in redis client; do
    cp "$dir/ca/ca.crt" "$work/$folder.crt" "$dir/$folder/"
    chmod 0644 "$dir/$folder/ca.crt" "$dir/$folder/$folder.crt"
done
give "$work/redis.key" "$dir/redis/redis.key" "$redis_group"
give "$work/client.key" "$dir/client/client.key" "$client_group"
echo "make-certs: Redis's certificate for $(subject_alt_names) in $dir/redis"
echo "make-certs: client certificate in $dir/client"
