#!/usr/bin/env bash
# Follow a submitted job until it ends: scripts/wait.sh JOB_ID   (make wait JOB_ID=)
# Prints the job's status changes and its progress lines (rounds, aggregation, metrics) from the server's job log.
# If the admin connection fails (server restarted, link dropped) it reconnects with a bounded backoff and follows on.
# TIMEOUT (environment, seconds > 0; empty: no limit, until the job ends; Ctrl-C stops following, not the job).
# Exit codes: 0 FINISHED:COMPLETED; 1 any other end (each site's reason printed) or an error;
#             2 still running when TIMEOUT passed (run it again to follow on).
source "$(dirname "$0")/common.sh"
job_id=${1:-}
[[ -n $job_id ]] || die "JOB_ID is not set: make wait JOB_ID=<id> ('make status' lists the jobs)"
check_var JOB_ID "$job_id" job_id
check_timeout
kit=$(admin_kit)
python -m ops.flare_admin wait --kit "$kit" --job-id "$job_id" ${TIMEOUT:+--timeout "$TIMEOUT"}
