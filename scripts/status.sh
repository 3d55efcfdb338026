#!/usr/bin/env bash
# Which participants run (per host), and what the server says about clients and jobs.
source "$(dirname "$0")/common.sh"
# JSON results: one line per message (the YAML format wraps long ones, e.g. a container's restarts).
ANSIBLE_CALLBACK_RESULT_FORMAT=json "$REPO/scripts/control.sh" status | sed -nE 's/^ *"msg": "(.*)",?$/msg: \1/p'
kit=$(admin_kit 2>/dev/null) || { echo "not provisioned yet"; exit 0; }
python -m ops.flare_admin status --kit "$kit" || true
