#!/usr/bin/env bash
# Entrypoint of deploy/Dockerfile.site: check the site's data, then start the SuperNode.
#
# Usage: site-entrypoint.sh [FLOWER_SUPERNODE_ARGS...]   (the image's ENTRYPOINT)
#
# Environment (defaults in the Dockerfile): SUPERLINK (host:port), SITE_NAME, MAX_EPSILON,
# DATA_PATH (/data), STATE_DIR (/state), CHECKPOINT (/public/checkpoint),
# ROOT_CERT (/certs/ca.crt), NODE_KEY (/keys/site.key). Extra arguments are passed on to
# flower-supernode (e.g. --max-retries 10).
set -euo pipefail

data=${DATA_PATH:-/data}
state=${STATE_DIR:-/state}
checkpoint=${CHECKPOINT:-/public/checkpoint}
root_cert=${ROOT_CERT:-/certs/ca.crt}
node_key=${NODE_KEY:-/keys/site.key}

for f in "$root_cert" "$node_key" "$checkpoint/autoencoder.pt" "$data/manifest.csv"; do
    if [[ ! -e $f ]]; then
        echo "site: $f is missing (see deploy/README.md)" >&2
        exit 1
    fi
done

# exit 1 when no row of the manifest is usable; the JSON names every rejected row
fedsynth site-check --data-path "$data" --json

exec flower-supernode \
    --superlink "$SUPERLINK" \
    --root-certificates "$root_cert" \
    --auth-supernode-private-key "$node_key" \
    --node-config "data-path=\"$data\" state-dir=\"$state\" max-epsilon=$MAX_EPSILON site-name=\"$SITE_NAME\" checkpoint=\"$checkpoint\"" \
    "$@"
