#!/usr/bin/env bash
# Abort a submitted or running job on the server and every site: scripts/abort.sh JOB_ID   (make abort JOB_ID=)
# Returns once the server accepted the abort; 'make wait JOB_ID=' shows the job's end (FINISHED:ABORTED).
source "$(dirname "$0")/common.sh"
job_id=${1:-}
[[ -n $job_id ]] || die "JOB_ID is not set: make abort JOB_ID=<id> ('make status' lists the jobs)"
check_var JOB_ID "$job_id" job_id
kit=$(admin_kit)
python -m ops.flare_admin abort --kit "$kit" --job-id "$job_id"
