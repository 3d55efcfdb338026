#!/usr/bin/env bash
# Which participants run (per host), and what the server says about clients and jobs.
source "$(dirname "$0")/common.sh"
"$REPO/scripts/control.sh" status | grep -E '"msg"|msg:' | sed 's/^ *//'
kit=$(admin_kit 2>/dev/null) || { echo "not provisioned yet"; exit 0; }
python -m ops.flare_admin status --kit "$kit" || true
