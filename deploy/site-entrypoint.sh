#!/usr/bin/env bash
# Entrypoint of deploy/Dockerfile.site: check the site's data with the study's config, then
# start the SuperNode.
#
# Usage: site-entrypoint.sh [FLOWER_SUPERNODE_ARGS...]   (the image's ENTRYPOINT)
#
# Environment:
#   STUDY_CONFIG      required: the study's config, a preset name (e.g. default) or a YAML
#                     file mounted into the container; the data are checked against it
#   SUPERLINK         the SuperLink as host:port
#   SITE_NAME         the site's name in the ledgers
#   MAX_EPSILON       the most this site allows to spend (a number)
#   DATA_PATH (/data), STATE_DIR (/state), CHECKPOINT (/public/checkpoint)
#   ROOT_CERT (/certs/ca.crt), NODE_KEY (/keys/site.key)
#   TRUSTED_ENTITIES  (/trust/trusted-entities.yaml) the app signers this site accepts (see
#                     trusted-entities.sh): the SuperNode runs no app they did not sign.
#                     `none` turns the check off (a try-out on one machine only: the
#                     SuperNode then runs ANY app the SuperLink sends)
# The node config is one space-separated string of key="value" pairs, so a value with
# whitespace, a quote, '=', '\' or a control character is refused (one line naming it).
# Extra arguments are passed on to flower-supernode (e.g. --max-retries 10).
set -euo pipefail

fail() {
    echo "site: $*" >&2
    exit 2
}

study_config=${STUDY_CONFIG:-}
data=${DATA_PATH:-/data}
state=${STATE_DIR:-/state}
checkpoint=${CHECKPOINT:-/public/checkpoint}
root_cert=${ROOT_CERT:-/certs/ca.crt}
node_key=${NODE_KEY:-/keys/site.key}
trusted=${TRUSTED_ENTITIES:-/trust/trusted-entities.yaml}

if [[ -z $study_config ]]; then
    fail "STUDY_CONFIG is not set: give the study's config (preset name or YAML path)"
fi
unsafe='[[:space:][:cntrl:]"'\''=\\]'
check() { # check VAR VALUE: the value must survive Flower's key="value" node-config parsing
    if [[ -z $2 || $2 =~ $unsafe ]]; then
        fail "$1: must be non-empty, without whitespace, quotes, '=' or '\\'"
    fi
}
check DATA_PATH "$data"
check STATE_DIR "$state"
check SITE_NAME "${SITE_NAME:-}"
check CHECKPOINT "$checkpoint"
if [[ ! ${MAX_EPSILON:-} =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    fail "MAX_EPSILON: must be a number, e.g. 10 or 7.5"
fi
node_config="data-path=\"$data\" state-dir=\"$state\" site-name=\"$SITE_NAME\""
node_config+=" checkpoint=\"$checkpoint\" max-epsilon=$MAX_EPSILON"

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
fedsynth site-check --config "$study_config" --data-path "$data" --json

exec flower-supernode \
    --superlink "${SUPERLINK:?SUPERLINK (host:port) is not set}" \
    --root-certificates "$root_cert" \
    --auth-supernode-private-key "$node_key" \
    ${trust[@]+"${trust[@]}"} \
    --node-config "$node_config" \
    "$@"
