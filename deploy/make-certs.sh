#!/usr/bin/env bash
# Make a study CA and the SuperLink's TLS server certificate.
#
# Usage: deploy/make-certs.sh OUT_DIR HOST [HOST ...]
#   OUT_DIR  where to write (created; existing files are never overwritten)
#   HOST     every name or IP address sites use to reach the SuperLink, e.g.
#            `superlink.example.org`, `superlink` (compose), `127.0.0.1`; each becomes a
#            subjectAltName (DNS: for names, IP: for addresses). The first is the CN.
#
# Writes OUT_DIR/ca.key (0600, keep it offline), OUT_DIR/ca.crt (give it to every site and
# to whoever runs `flwr`: it is the root certificate they trust), OUT_DIR/server.key (0600,
# stays on the SuperLink), OUT_DIR/server.crt (SuperLink's certificate, signed by the CA).
# The SuperLink is then started with
#   --ssl-ca-certfile OUT_DIR/ca.crt --ssl-certfile OUT_DIR/server.crt --ssl-keyfile OUT_DIR/server.key
# Environment: DAYS (validity, default 365).
set -euo pipefail

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
days=${DAYS:-365}

mkdir -p "$out"
for f in ca.key ca.crt server.key server.crt; do
    if [[ -e $out/$f ]]; then
        echo "make-certs: $out/$f exists; refusing to overwrite (remove it first)" >&2
        exit 1
    fi
done

san=""
for host in "$@"; do
    if [[ $host =~ ^[0-9]+(\.[0-9]+){3}$ || $host == *:* ]]; then
        san+="${san:+,}IP:$host"
    else
        san+="${san:+,}DNS:$host"
    fi
done

umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# CA: a self-signed certificate that may only sign certificates
openssl ecparam -name prime256v1 -genkey -noout -out "$out/ca.key"
openssl req -new -x509 -sha256 -days "$days" -key "$out/ca.key" -out "$out/ca.crt" \
    -subj "/CN=fedsynth study CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"

# SuperLink server certificate with every host as subjectAltName
openssl ecparam -name prime256v1 -genkey -noout -out "$out/server.key"
openssl req -new -sha256 -key "$out/server.key" -out "$tmp/server.csr" -subj "/CN=$1"
cat >"$tmp/server.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -sha256 -days "$days" -in "$tmp/server.csr" -CA "$out/ca.crt" \
    -CAkey "$out/ca.key" -CAcreateserial -CAserial "$tmp/ca.srl" \
    -extfile "$tmp/server.ext" -out "$out/server.crt" 2>/dev/null

chmod 600 "$out/ca.key" "$out/server.key"
chmod 644 "$out/ca.crt" "$out/server.crt"
openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null
echo "make-certs: $out/ca.crt, $out/server.crt (subjectAltName $san), keys 0600"
