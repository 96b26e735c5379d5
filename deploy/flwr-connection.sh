#!/usr/bin/env bash
# Write the coordinator's Flower CLI connection to a TLS SuperLink.
#
# Usage: deploy/flwr-connection.sh FLWR_HOME NAME ADDRESS ROOT_CERT
#   FLWR_HOME  the Flower CLI's home folder (`flwr` reads FLWR_HOME/config.toml)
#   NAME       the connection's name, used as `flwr run . NAME`, `flwr supernode list NAME`
#   ADDRESS    the SuperLink as host:port (one port serves the Control, Fleet and Runtime
#              APIs in Flower 1.41), e.g. superlink.example.org:9093 or 127.0.0.1:9093
#   ROOT_CERT  the study CA certificate (make-certs.sh's ca.crt)
#
# Adds a [superlink.NAME] table and makes it the default; an existing config.toml is kept
# as config.toml.bak. Example result:
#   [superlink]
#   default = "study"
#
#   [superlink.study]
#   address = "127.0.0.1:9093"
#   root-certificates = "/abs/path/ca.crt"
set -euo pipefail

if [[ $# -ne 4 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
home=$1
name=$2
address=$3
cert=$(cd "$(dirname "$4")" && pwd)/$(basename "$4")
if [[ ! -f $cert ]]; then
    echo "flwr-connection: root certificate $4 not found" >&2
    exit 1
fi
if [[ ! $name =~ ^[A-Za-z0-9_-]+$ ]]; then
    echo "flwr-connection: name '$name': use letters, digits, '_' or '-'" >&2
    exit 2
fi
mkdir -p "$home"
config=$home/config.toml
if [[ -e $config ]]; then
    cp "$config" "$config.bak"
fi
cat >"$config" <<TOML
[superlink]
default = "$name"

[superlink.$name]
address = "$address"
root-certificates = "$cert"
TOML
echo "flwr-connection: $config -> $name ($address, root certificate $cert)"
