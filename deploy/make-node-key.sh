#!/usr/bin/env bash
# Make a SuperNode's authentication key pair (one per hospital site).
#
# Usage: deploy/make-node-key.sh OUT_DIR SITE_NAME
#
# Run it AT THE SITE: the private key never leaves the hospital. Writes
#   OUT_DIR/SITE_NAME.key      (0600) the SuperNode's private key (OpenSSH format):
#                              flower-supernode --auth-supernode-private-key OUT_DIR/SITE_NAME.key
#   OUT_DIR/SITE_NAME.key.pub  the public key: send it to the study coordinator, who
#                              registers it with `flwr supernode register SITE_NAME.key.pub`.
# Flower 1.41 node authentication takes ECDSA keys on a NIST curve (here P-384), the
# OpenSSH format `ssh-keygen -t ecdsa` writes; ed25519 and RSA keys are refused.
set -euo pipefail

if [[ $# -ne 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
site=$2
if [[ ! $site =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "make-node-key: site name '$site': use letters, digits, '.', '_' or '-'" >&2
    exit 2
fi
key=$out/$site.key
if [[ -e $key || -e $key.pub ]]; then
    echo "make-node-key: $key exists; refusing to overwrite (remove it first)" >&2
    exit 1
fi
mkdir -p "$out"
umask 077
ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedsynth-$site" -f "$key"
chmod 600 "$key"
chmod 644 "$key.pub"
echo "make-node-key: $key (private, 0600), $key.pub (send to the coordinator)"
ssh-keygen -l -f "$key.pub"
