#!/usr/bin/env bash
# Roll the pinned Python environment out to the hosts: scripts/upgrade.sh [SITE]   (make upgrade [SITE=] [TIMEOUT=])
# After a change of requirements.txt (a patch release of a pinned package): the wheels it resolves to are downloaded
# once here (workspace/wheelhouse: pip's index or a hospital's mirror; the hosts need no network). Every native
# participant's host then builds a new venv, /opt/hcls-flare/venvs/<id> (<id>: the pins and the Python version), from
# those wheels alone and checks it (pip check, the imports the participant needs), all hosts at once, nothing
# restarted (the role's environment.yml). Only then is each native participant of INVENTORY, one at a time, the
# server first, deployed with it: venvs/current names it and the participant restarts from it, only between jobs:
# one that runs a job is tried again every 30 s until it is idle (TIMEOUT=<s>, default 6 hours). A participant
# already on <id> is not restarted. Every later deploy keeps it on venvs/current. The previous venv stays on the
# host (rollback: README "Upgrading the Python packages").
# A container participant's environment is its image: make image (or image-airgapped) builds it from the same pins;
# this script names such participants and leaves them as they are.
# HCLS_REQUIREMENTS and TORCH_REQUIREMENT (common.sh pinned_requirements) choose other pins (the tests' CPU torch).
source "$(dirname "$0")/common.sh"
site=${1:-}
check_var SITE "$site" participant
check_timeout
if [[ -n $site ]]; then
  participants | grep -qx -- "$site" || die "unknown SITE '$site' (participants: $(participants | tr '\n' ' '))"
  names=$site
else
  names=$( (server_name; participants | grep -vx -- "$(server_name)") )
fi
pins=$(pinned_requirements)
grep -qE '^nvflare(\[[^]]*\])?==' <<<"$pins" || die "${HCLS_REQUIREMENTS:-$REPO/requirements.txt}: no nvflare==<version> line"
latest_kit_root >/dev/null

python=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mkdir -p "$WORK/environments"
echo "$pins" >"$WORK/environments/requirements.txt"
pins=$WORK/environments/requirements.txt
id=$( (cat "$pins"; echo "python $python") | sha256sum | cut -c1-12)
environment=$WORK/environments/$id
if [[ ! -f $environment/python ]]; then
  echo "environment $id: downloading the wheels of ${HCLS_REQUIREMENTS:-requirements.txt} for Python $python"
  rm -rf "$environment"
  fill_wheels "$pins" "$environment/wheels" "$WORK/environments/$id.pip.log"
  cp "$pins" "$environment/requirements.txt"
  echo "$python" >"$environment/python"   # written last: the environment is complete
fi
echo "environment $id: $(ls "$environment/wheels" | wc -l) wheels, $(du -sh "$environment/wheels" | cut -f1)"

export HCLS_PROJECT_YML=$PROJECT_YML
runtime() {
  (cd "$REPO/ansible" && ansible-inventory -i "$INVENTORY" --host "$1" 2>/dev/null) \
    | jq -r '.flare_participant_runtime // "native"' || echo native
}
export HCLS_ENVIRONMENT=$environment   # scripts/deploy.sh passes it to the role
# First every host builds the venv (at once; running participants and their jobs are not touched), so that a host
# that cannot build it stops the upgrade before any participant has changed.
echo "environment $id: building it on the native participants' hosts (nothing restarts yet)"
HCLS_ENVIRONMENT_BUILD_ONLY=1 "$REPO/scripts/deploy.sh" "$site" >"$WORK/upgrade.build.log" 2>&1 \
  || { tail -n 30 "$WORK/upgrade.build.log" >&2; die "building environment $id failed (above; $WORK/upgrade.build.log): no participant changed"; }
deadline=$((SECONDS + ${TIMEOUT:-21600}))
for name in $names; do
  if [[ $(runtime "$name") == container ]]; then
    echo "$name: container runtime, its environment is the image (make image or image-airgapped, loaded on its host): left as it is"
    continue
  fi
  deploy_when_idle "$name" "environment $id"
  started=$(grep -oE "$name (re)?started [^\"]*" "$WORK/deploy.$name.log" | head -n1 || true)
  echo "$name: runs environment $id${started:+ ($started)}"
done
