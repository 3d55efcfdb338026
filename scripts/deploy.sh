#!/usr/bin/env bash
# Deploy participants with Ansible: scripts/deploy.sh [SITE]   (no SITE: all)
# over $INVENTORY (default: ansible/inventories/local/hosts.sh, native processes on this machine).
# A participant whose files changed is restarted, unless it runs a job: that host fails naming the job;
# FORCE=1 (1, true or yes) restarts it anyway.
source "$(dirname "$0")/common.sh"
site=${1:-}

kits=$(latest_kit_root)
if [[ -n $site ]]; then
  participants | grep -qx -- "$site" \
    || die "unknown SITE '$site' (participants in $PROJECT_YML: $(participants | tr '\n' ' '))"
fi
case ${FORCE:-} in
  1 | true | yes) force=true ;;
  "" | 0 | false | no) force=false ;;
  *) die "FORCE='$FORCE' is not 1, true or yes (FORCE=1 restarts participants that run a job; leave it unset otherwise)" ;;
esac
export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)
cd "$REPO/ansible"
ansible-playbook -i "$INVENTORY" deploy.yml -e "flare_kit_root=$kits" -e "flare_participant_force=$force" ${site:+--limit "$site"}
