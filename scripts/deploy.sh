#!/usr/bin/env bash
# Deploy participants with Ansible: scripts/deploy.sh [SITE]   (no SITE: all)
# over $INVENTORY (default: ansible/inventories/local/hosts.sh, native processes on this machine).
source "$(dirname "$0")/common.sh"
site=${1:-}

kits=$(latest_kit_root)
if [[ -n $site ]]; then
  participants | grep -qx -- "$site" \
    || die "unknown SITE '$site' (participants in $PROJECT_YML: $(participants | tr '\n' ' '))"
fi
export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)
cd "$REPO/ansible"
ansible-playbook -i "$INVENTORY" deploy.yml -e "flare_kit_root=$kits" ${site:+--limit "$site"}
