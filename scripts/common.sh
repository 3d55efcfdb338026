# Shared by the scripts: paths, the one source of names (provision/project.yml), errors.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv
# Everything generated (kits, local deployments, built jobs, demo data) and fetched models;
# git-ignored. Tests point both elsewhere.
export HCLS_WORKSPACE=${HCLS_WORKSPACE:-$REPO/workspace}
WORK=$HCLS_WORKSPACE
MODELS_DIR=${MODELS_DIR:-$REPO/models}
PROJECT_YML=$REPO/provision/project.yml
PROVISION_DIR=$WORK/provision
INVENTORY=${INVENTORY:-$REPO/ansible/inventories/local/hosts.sh}
export PATH=$VENV/bin:$PATH
export PYTHONPATH=$REPO/custom${PYTHONPATH:+:$PYTHONPATH}

die() { echo "error: $*" >&2; exit 1; }

# TIMEOUT (environment) of submit WAIT=1 and wait: seconds > 0, or empty for no limit.
check_timeout() {
  [[ -z ${TIMEOUT:-} || $TIMEOUT =~ ^[1-9][0-9]*$ ]] \
    || die "TIMEOUT must be a whole number of seconds > 0, not '$TIMEOUT' (empty: follow the job until it ends)"
}

project_yml() {
  yq -r "$1" "$PROJECT_YML" 2>/dev/null || die "$PROJECT_YML is not valid YAML (yq '$1' failed)"
}
project_name() { project_yml .name; }
# Server and clients, as named in project.yml.
participants() { project_yml '.participants[] | select(.type == "server" or .type == "client") | .name'; }
admin_name() { project_yml '.participants[] | select(.role == "project_admin") | .name' | head -n1; }

# The newest provisioned kit set (workspace/provision/<project>/prod_NN).
kit_roots() {
  local d
  for d in "$PROVISION_DIR/$(project_name)"/prod_*/; do if [[ -d $d ]]; then echo "${d%/}"; fi; done | sort -V
}
latest_kit_root() {
  local root
  root=$(kit_roots | tail -n1)
  [[ -n $root ]] || die "no startup kits under $PROVISION_DIR: run 'make provision' first"
  echo "$root"
}
admin_kit() { echo "$(latest_kit_root)/$(admin_name)"; }

# Jobs are the job_configs/<job>/ folders with a job.json overlay (job_configs/base/ is what they share).
all_jobs() { local f; for f in "$REPO"/job_configs/*/job.json; do basename "$(dirname "$f")"; done; }

# job_configs/<JOB> for a job name, or JOB itself when it is a ready NVFlare job folder.
job_source() {
  local job=$1
  [[ -n $job ]] || die "JOB is not set (jobs: $(all_jobs | tr '\n' ' '))"
  if [[ -f $job/meta.json ]]; then echo "$job"; return; fi
  [[ $job =~ ^[a-z0-9_]+$ && -f $REPO/job_configs/$job/job.json ]] || die "unknown JOB '$job' (jobs: $(all_jobs | tr '\n' ' '))"
  echo "$REPO/job_configs/$job"
}
