#!/usr/bin/env bash
# Run a flarectl.sh action on participants over the inventory:
#   scripts/control.sh start|stop|status|logs [SITE] [LINES]   (no SITE: all; LINES for logs)
source "$(dirname "$0")/common.sh"
action=$1 site=${2:-} lines=${3:-50}
if [[ -n $site ]]; then
  participants | grep -qx -- "$site" || die "unknown SITE '$site' (participants: $(participants | tr '\n' ' '))"
fi
export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)
cd "$REPO/ansible"
ansible-playbook -i "$INVENTORY" control.yml -e "flare_action=$action" -e "flare_participant_log_lines=$lines" \
  ${site:+--limit "$site"}
