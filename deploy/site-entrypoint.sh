#!/usr/bin/env bash
# Entrypoint of deploy/Dockerfile.site: check the site's data, then start the SuperNode.
#
# Usage: site-entrypoint.sh [FLOWER_SUPERNODE_ARGS...]   (the image's ENTRYPOINT)
#
# Environment (defaults in the Dockerfile): SUPERLINK (host:port), SITE_NAME, MAX_EPSILON,
# DATA_PATH (/data), STATE_DIR (/state), CHECKPOINT (/public/checkpoint),
# ROOT_CERT (/certs/ca.crt), NODE_KEY (/keys/site.key), TRUSTED_ENTITIES
# (/trust/trusted-entities.yaml: the app signers this site accepts, see trusted-entities.sh;
# the SuperNode runs no app they did not sign; `none` turns the check off, for a try-out on
# one machine only: the SuperNode then runs ANY app the SuperLink sends). Extra arguments
# are passed on to flower-supernode (e.g. --max-retries 10).
set -euo pipefail

data=${DATA_PATH:-/data}
state=${STATE_DIR:-/state}
checkpoint=${CHECKPOINT:-/public/checkpoint}
root_cert=${ROOT_CERT:-/certs/ca.crt}
node_key=${NODE_KEY:-/keys/site.key}
trusted=${TRUSTED_ENTITIES:-/trust/trusted-entities.yaml}
trust=(--trusted-entities "$trusted")
if [[ $trusted == none ]]; then
    trust=()
    echo "site: TRUSTED_ENTITIES=none: this SuperNode runs ANY app the SuperLink sends" >&2
fi

for f in "$root_cert" "$node_key" "$checkpoint/autoencoder.pt" "$data/manifest.csv" \
    ${trust[1]+"${trust[1]}"}; do
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
    ${trust[@]+"${trust[@]}"} \
    --node-config "data-path=\"$data\" state-dir=\"$state\" max-epsilon=$MAX_EPSILON site-name=\"$SITE_NAME\" checkpoint=\"$checkpoint\"" \
    "$@"
