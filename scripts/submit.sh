#!/usr/bin/env bash
# Submit a job through the admin startup kit: scripts/submit.sh JOB [PROFILE] [WAIT]
# JOB is a name under job_configs/ (built into workspace/jobs/) or a ready NVFlare job folder.
# WAIT non-empty: follow the job as scripts/wait.sh does (TIMEOUT from the environment, same meaning and exit
# codes; without WAIT it is not used).
source "$(dirname "$0")/common.sh"
job=$1 profile=${2:-} wait=${3:-}
check_timeout

if [[ -f $job/meta.json ]]; then
  [[ -z $profile ]] || die "PROFILE applies to job_configs/ jobs, not to the ready job folder $job"
  job_dir=$job
else
  job_dir=$("$REPO/scripts/build_job.sh" "$job" "$profile")
fi
python -m ops.flare_admin submit --kit "$(admin_kit)" --job-dir "$job_dir" ${wait:+--wait} ${TIMEOUT:+--timeout "$TIMEOUT"}
