#!/usr/bin/env bash
# start|stop|status participants over the inventory: scripts/control.sh ACTION [SITE]
source "$(dirname "$0")/common.sh"
action=$1 site=${2:-}
if [[ -n $site ]]; then
  participants | grep -qx -- "$site" || die "unknown SITE '$site' (participants: $(participants | tr '\n' ' '))"
fi
cd "$REPO/ansible"
ansible-playbook -i "$INVENTORY" control.yml -e "flare_action=$action" ${site:+--limit "$site"}
