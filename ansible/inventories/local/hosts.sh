#!/usr/bin/env bash
# Executable inventory (Ansible runs it with --list; the script inventory plugin picks it by its exec bit):
# every server and client of provision/project.yml, the one list of participants, as hosts named like them
# in the groups flare_server and flare_clients. The variables of this inventory are in group_vars/ next to it.
#   local/    the embedded local federation: native processes on this machine
#   compose/  the single-node container stack (make compose-prepare); its hosts.sh runs this one
# project.yml is found beside this repository, or at $HCLS_PROJECT_YML (scripts/deploy.sh sets it,
# so a copy of an inventory directory elsewhere works too).
# Output (ansible-inventory -i ansible/inventories/local/hosts.sh --list shows Ansible's view):
#   {"flare_server": {"hosts": [server]}, "flare_clients": {"hosts": [clients...]}, "_meta": {"hostvars": {}}}
set -euo pipefail
project=${HCLS_PROJECT_YML:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../../provision/project.yml}
case ${1:-} in
  --list)
    [[ -f $project ]] || { echo "$0: no $project (set HCLS_PROJECT_YML to provision/project.yml)" >&2; exit 1; }
    yq '{flare_server: {hosts: [.participants[] | select(.type == "server") | .name]},
         flare_clients: {hosts: [.participants[] | select(.type == "client") | .name]},
         _meta: {hostvars: {}}}' "$project" \
      || { echo "$0: $project is not valid YAML" >&2; exit 1; } ;;
  --host) echo '{}' ;;
  *) echo "usage: $0 --list | --host HOST (an Ansible inventory script)" >&2; exit 2 ;;
esac
