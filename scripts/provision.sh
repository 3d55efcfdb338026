#!/usr/bin/env bash
# Provision the federation from provision/project.yml into workspace/provision.
# Re-running keeps the root CA (state/cert.json), so kits already deployed stay valid.
source "$(dirname "$0")/common.sh"

[[ -f $PROJECT_YML ]] || die "$PROJECT_YML not found"
project_yml . >/dev/null
before=$(kit_roots | wc -l)

mkdir -p "$PROVISION_DIR"
(cd "$PROVISION_DIR" && nvflare provision --force -p "$PROJECT_YML" -w "$PROVISION_DIR") \
  || die "nvflare provision failed on $PROJECT_YML"
after=$(kit_roots | wc -l)
(( after > before )) || die "nvflare provision wrote no kits from $PROJECT_YML (see its output above)"

kits=$(latest_kit_root)
echo "startup kits: $kits"
echo "root CA: $(openssl x509 -in "$kits/$(participants | head -n1)/startup/rootCA.pem" -noout -fingerprint -sha256)"
