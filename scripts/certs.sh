#!/usr/bin/env bash
# Every certificate of the newest provisioned kits (workspace/provision/<project>/prod_NN), root CA included, with
# the days left: a table, also kept as $HCLS_WORKSPACE/certs.json. Exit status 1 when one has expired; fewer than
# 30 days left is a warning (custom/ops/certs.py). Reads only certificates (public), never a key.
source "$(dirname "$0")/common.sh"
kits=$(latest_kit_root)
python -m ops.certs "$kits" --json "$WORK/certs.json"
