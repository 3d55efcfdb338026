#!/usr/bin/env bash
# Deploy participants with Ansible: scripts/deploy.sh [SITE]   (no SITE: all)
# over $INVENTORY (default: ansible/inventories/local/hosts.sh, native processes on this machine).
# A participant whose files changed is restarted, unless it runs a job: that host fails naming the job;
# FORCE=1 (1, true or yes, any case) restarts it anyway. Hosts reached over SSH need their host keys pinned
# first (make trust-hosts, scripts/trust_hosts.sh): a host without them stops the deploy before anything runs,
# naming it; a host whose key changed fails its part ("Host key verification failed"), naming it.
source "$(dirname "$0")/common.sh"
site=${1:-}
check_var SITE "$site" participant

kits=$(latest_kit_root)
if [[ -n $site ]]; then
  participants | grep -qx -- "$site" \
    || die "unknown SITE '$site' (participants in $PROJECT_YML: $(participants | tr '\n' ' '))"
fi
force=$(flag FORCE)   # 1, true, yes (any case): restart participants that run a job; 0, false, no, empty: refuse
export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)
# SSH hosts must have pinned host keys (make trust-hosts): ansible.cfg checks them strictly against that file.
"$REPO/scripts/trust_hosts.sh" --check "$site"
# From scripts/upgrade.sh: HCLS_ENVIRONMENT, the pinned environment (requirements, wheels) the hosts build and run;
# HCLS_ENVIRONMENT_BUILD_ONLY=1: only build it (each host stops there; nothing else changes, nothing restarts).
extra=$(jq -cn --arg root "$kits" --argjson force "$force" --arg environment "${HCLS_ENVIRONMENT:-}" \
  --argjson build_only "$( [[ ${HCLS_ENVIRONMENT_BUILD_ONLY:-} == 1 ]] && echo true || echo false)" \
  '{flare_kit_root: $root, flare_participant_force: $force, flare_participant_environment: $environment,
    flare_participant_environment_build_only: $build_only}')
cd "$REPO/ansible"
ansible-playbook -i "$INVENTORY" deploy.yml -e "$extra" ${site:+--limit "$site"}
