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
# The site's other terms (client/node_config.py), each passed only when set, so that unset
# ones keep the node config's default:
#   MAX_DELTA                   the largest delta it accepts, a number between 0 and 1
#   ACCOUNTANT                  rdp or prv: refuse studies that account with the other
#   REQUIRE_SECURE_AGGREGATION  true or false: refuse rounds not under SecAgg+
#   DISCLOSE_SUBJECT_COUNT      true or false: whether its exact subject count may be published
#   PUBLIC_SUBJECTS             a whole number: the subject count it declares public
#                               (needs MAX_DELTA: delta is then checked against it alone)
# The node config is one space-separated string of key="value" pairs that Flower reads as
# TOML, so a text value with whitespace, a quote, '=', '\' or a control character, a number
# TOML would not read (e.g. 07.5, .5) and any other malformed value are refused, in one
# line naming the variable.
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
# numbers as TOML reads them (Flower parses each value as TOML: no leading zeros, no
# trailing or leading '.'); awk compares them as numbers
number='^(0|[1-9][0-9]*)([.][0-9]+)?([eE][-+]?[0-9]+)?$'
in_range() { # in_range VALUE CONDITION: VALUE is a number and awk finds CONDITION on v true
    [[ $1 =~ $number ]] && awk -v v="$1" "BEGIN { v += 0; exit !($2) }"
}
flag() { # flag VAR KEY: append KEY=true|false when VAR is set (true or false, any case)
    if [[ -n ${!1+set} ]]; then
        local value=${!1,,}
        if [[ $value != true && $value != false ]]; then
            fail "$1: must be true or false"
        fi
        node_config+=" $2=$value"
    fi
}
check DATA_PATH "$data"
check STATE_DIR "$state"
check SITE_NAME "${SITE_NAME:-}"
check CHECKPOINT "$checkpoint"
if ! in_range "${MAX_EPSILON:-}" 'v > 0'; then
    fail "MAX_EPSILON: must be a positive number, e.g. 10 or 7.5"
fi
node_config="data-path=\"$data\" state-dir=\"$state\" site-name=\"$SITE_NAME\""
node_config+=" checkpoint=\"$checkpoint\" max-epsilon=$MAX_EPSILON"
if [[ -n ${MAX_DELTA+set} ]]; then
    if ! in_range "$MAX_DELTA" 'v > 0 && v < 1'; then
        fail "MAX_DELTA: must be a number between 0 and 1, e.g. 1e-5 or 0.00001"
    fi
    node_config+=" max-delta=$MAX_DELTA"
fi
if [[ -n ${ACCOUNTANT+set} ]]; then
    if [[ $ACCOUNTANT != rdp && $ACCOUNTANT != prv ]]; then
        fail "ACCOUNTANT: must be rdp or prv"
    fi
    node_config+=" accountant=\"$ACCOUNTANT\""
fi
flag REQUIRE_SECURE_AGGREGATION require-secure-aggregation
flag DISCLOSE_SUBJECT_COUNT disclose-subject-count
if [[ -n ${PUBLIC_SUBJECTS+set} ]]; then
    if [[ ! $PUBLIC_SUBJECTS =~ ^[1-9][0-9]*$ ]]; then
        fail "PUBLIC_SUBJECTS: must be a whole number of at least 1, e.g. 120"
    fi
    if [[ -z ${MAX_DELTA+set} ]]; then
        fail "PUBLIC_SUBJECTS: needs MAX_DELTA, the largest delta the site accepts (below 1/its subject count, e.g. 1e-5)"
    fi
    node_config+=" public-subjects=$PUBLIC_SUBJECTS"
fi

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
