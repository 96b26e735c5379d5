#!/usr/bin/env bash
# Size a site's GPU box: seconds and MiB of the site's DP-SGD step and of sampling on CUDA,
# at the config's size and at the paper's 96x96x13 (`fedsynth bench --device-report`).
#
# Usage: deploy/gpu-check.sh OUT.json [bench options, e.g. --config large --site-subjects 256]
#
# Run it on the GPU machine, in an environment where fedsynth is installed (PYTHON names
# its python, default python3). Writes OUT.json (atomically): the GPU's name, torch and
# CUDA versions, and for each size the seconds of one DP-SGD step and one plain step over
# the config's expected batch of subjects (a 300-subject site unless --site-subjects),
# the peak GPU memory of a site's round and of a sampling batch, and sampling seconds per
# volume (DDIM, guidance on, decoded). A few minutes on one GPU. Refuses in one line where
# torch sees no CUDA GPU.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
fi
out=$1
shift
python=${PYTHON:-python3}
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: $python's torch sees no CUDA GPU; run it on the GPU machine" >&2
    exit 1
fi
tmp=$(mktemp "$out.XXXXXX")
trap 'rm -f "$tmp"' EXIT
PYTHONUNBUFFERED=1 "$python" -m fedsynth.common.cli bench --device-report --json \
    -c device=cuda "$@" >"$tmp"
mv "$tmp" "$out"
echo "gpu-check: wrote $out" >&2
