#!/usr/bin/env bash
# Run a flarectl.sh action on participants over the inventory:
#   scripts/control.sh start|stop|restart|status|logs|retire [SITE] [LINES]   (no SITE: all; LINES for logs; retire: remove-site)
source "$(dirname "$0")/common.sh"
action=${1:-} site=${2:-} lines=${3:-50}
case $action in start | stop | restart | status | logs | retire) ;; *) die "usage: $0 start|stop|restart|status|logs|retire [SITE] [LINES]" ;; esac
check_var LINES "$lines" number
if [[ -n $site ]]; then
  check_var SITE "$site" participant
  participants | grep -qx -- "$site" || die "unknown SITE '$site' (participants: $(participants | tr '\n' ' '))"
fi
export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)
cd "$REPO/ansible"
extra=$(jq -cn --arg action "$action" --arg lines "$lines" '{flare_action: $action, flare_participant_log_lines: $lines}')
ansible-playbook -i "$INVENTORY" control.yml -e "$extra" ${site:+--limit "$site"}
