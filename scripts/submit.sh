#!/usr/bin/env bash
# Submit a job through the admin startup kit: scripts/submit.sh JOB [PROFILE] [WAIT]
# JOB is a name under job_configs/ (built into workspace/jobs/) or a ready NVFlare job folder (a path without '..').
# WAIT on (1, true or yes; 0, false, no or empty: off): follow the job as scripts/wait.sh does (TIMEOUT from the
# environment, same meaning and exit codes; without WAIT it is not used).
source "$(dirname "$0")/common.sh"
job=${1:-} profile=${2:-} wait=${3:-}
check_var PROFILE "$profile" profile
wait=$(flag WAIT "$wait")
check_timeout

src=$(job_source "$job")
if [[ -f $src/meta.json ]]; then   # a ready job folder
  [[ -z $profile ]] || die "PROFILE applies to job_configs/ jobs, not to the ready job folder $job"
  job_dir=$src
else
  job_dir=$("$REPO/scripts/build_job.sh" "$job" "$profile")
fi
kit=$(admin_kit)
args=()
if [[ $wait == true ]]; then args+=(--wait ${TIMEOUT:+--timeout "$TIMEOUT"}); fi
python -m ops.flare_admin submit --kit "$kit" --job-dir "$job_dir" "${args[@]}"
