#!/usr/bin/env bash
# Register hospital SuperNode public keys with a SuperLink that runs with
# --enable-supernode-auth (the coordinator's side of node authentication).
#
# Usage: deploy/register-sites.sh CONNECTION KEY.pub [KEY.pub ...]
#   CONNECTION  a Flower CLI connection in $FLWR_HOME/config.toml (see flwr-connection.sh)
#   KEY.pub     a site's public key, as made by make-node-key.sh at the site
#
# Runs `flwr supernode register KEY.pub CONNECTION --format json` for each key and prints
# "SITE NODE_ID". A key that is already registered is reported and skipped. Waits up to
# WAIT seconds (default 60) for the SuperLink to answer. SuperNodes whose key is not
# registered are refused ("Failed to activate SuperNode"). To revoke a site:
#   flwr supernode list CONNECTION ; flwr supernode unregister NODE_ID CONNECTION
set -euo pipefail

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
connection=$1
shift
flwr=${FLWR:-flwr}
deadline=$((SECONDS + ${WAIT:-60}))

field() { # field JSON KEY: a top-level value of flwr's --format json answer
    python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get(sys.argv[2], ""))' "$1" "$2"
}

for key in "$@"; do
    if [[ ! -f $key ]]; then
        echo "register-sites: $key not found" >&2
        exit 1
    fi
    site=$(basename "$key" .pub)
    site=${site%.key}
    while true; do
        answer=$("$flwr" supernode register "$key" "$connection" --format json 2>&1 || true)
        if [[ $(field "$answer" success 2>/dev/null) == True ]]; then
            echo "$site $(field "$answer" node-id)"
            break
        fi
        message=$(field "$answer" error-message 2>/dev/null || echo "$answer")
        if [[ $message == *"already in use"* ]]; then
            echo "$site already-registered"
            break
        fi
        if [[ $message != *unavailable* || $SECONDS -ge $deadline ]]; then
            echo "register-sites: $key: $message" >&2
            exit 1
        fi
        sleep 1
    done
done
