#!/usr/bin/env bash
# Approve a job's code at the sites: scripts/approve.sh [--install] JOB [PROFILE] [SITE]   (make approve)
# Builds JOB exactly as scripts/submit.sh does (scripts/build_job.sh JOB PROFILE; a ready job folder is taken as it
# is), prints the sha256 of its app (site_privacy.approval.app_digest: what each site computes when the job is
# deployed to it) and records it under the job's name in site_configs/site_<site>/approved_jobs.json of SITE, or of
# every site of provision/project.yml ($HCLS_SITE_CONFIGS instead of site_configs/ when set). make deploy installs
# it at the sites (local/approved_jobs.json); --install (make approve INSTALL=1) also writes it into the deployed
# local federation's sites now (workspace/local/<site>), which read it for each job: no restart, no redeploy.
source "$(dirname "$0")/common.sh"
install=
if [[ ${1:-} == --install ]]; then install=true; shift; fi
job=${1:-} profile=${2:-} site=${3:-}
if [[ -z $install ]] && is_on INSTALL; then install=true; fi
check_var PROFILE "$profile" profile
check_var SITE "$site" participant
SITE_CONFIGS=${HCLS_SITE_CONFIGS:-$REPO/site_configs}

clients() { project_yml '.participants[] | select(.type == "client") | .name'; }
if [[ -n $site ]]; then
  clients | grep -qx -- "$site" || die "unknown SITE '$site' (sites in $PROJECT_YML: $(clients | tr '\n' ' '))"
  sites=("$site")
else
  mapfile -t sites < <(clients)
fi

src=$(job_source "$job")
if [[ -f $src/meta.json ]]; then   # a ready job folder, approved under its meta.json name
  [[ -z $profile ]] || die "PROFILE applies to job_configs/ jobs, not to the ready job folder $job"
  job_dir=$src
else
  job_dir=$("$REPO/scripts/build_job.sh" "$job" "$profile")
fi
name=$(job_name "$job")

files=()
for s in "${sites[@]}"; do
  files+=("$SITE_CONFIGS/site_$s/approved_jobs.json")
  if [[ -n $install ]]; then
    ws=$WORK/local/$s
    [[ -d $ws/local ]] || die "--install: site $s is not deployed at $ws (make deploy installs approvals on any host)"
    files+=("$ws/local/approved_jobs.json")
  fi
done
python -m site_privacy.approval record "$job_dir" "$name" "${files[@]}"
