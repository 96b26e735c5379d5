#!/usr/bin/env bash
# Write a SuperNode's trusted-entities file: the app signers whose signature it accepts.
#
# Usage: deploy/trusted-entities.sh OUT.yaml KEY_ID SIGNER.pub [KEY_ID SIGNER.pub ...]
#   OUT.yaml    the file for `flower-supernode --trusted-entities OUT.yaml` (written 0644;
#               an existing file is never overwritten)
#   KEY_ID      the signer's Flower public key id, fpk_<UUID>: the id Flower Hub shows for
#               this key in the signer's account profile, and that names the signature in
#               the app's verification records
#   SIGNER.pub  the signer's Ed25519 public key in OpenSSH format (`ssh-keygen -t ed25519`);
#               Flower 1.41 accepts no other key type here
#
# A SuperNode started with --trusted-entities runs a run's ClientApp only when the app
# bundle (FAB) carries a signature by one of these keys over its SHA-256; any other app
# (unsigned, e.g. a plain `flwr run .`, signed by someone else, or changed after signing)
# gets an error reply and none of its code runs at the site. See deploy/README.md.
set -euo pipefail

if [[ $# -lt 3 || $(($# % 2)) -ne 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
if [[ -e $out ]]; then
    echo "trusted-entities: $out exists; refusing to overwrite (remove it first)" >&2
    exit 1
fi
lines=""
while [[ $# -gt 0 ]]; do
    id=$1
    pub=$2
    shift 2
    if [[ ! $id =~ ^fpk_[0-9A-Fa-f-]{36}$ ]]; then
        echo "trusted-entities: key id '$id' is not fpk_<UUID>" >&2
        exit 2
    fi
    if [[ ! -f $pub ]]; then
        echo "trusted-entities: $pub not found" >&2
        exit 1
    fi
    read -r kind key _ <"$pub"
    if [[ $kind != ssh-ed25519 || ! $key =~ ^[A-Za-z0-9+/=]+$ ]]; then
        echo "trusted-entities: $pub is not an OpenSSH ssh-ed25519 public key" >&2
        exit 2
    fi
    lines+="$id: \"$kind $key\""$'\n'
done
mkdir -p "$(dirname "$out")"
printf '%s' "$lines" >"$out"
chmod 644 "$out"
echo "trusted-entities: $out ($(grep -c . "$out") signer(s))"
