#!/usr/bin/env bash
# Build an NVFlare job folder: scripts/build_job.sh JOB [PROFILE]  -> prints the folder (workspace/jobs/<JOB>)
# job_configs/base/ + job_configs/<JOB>/job.json + the profile (a name under job_configs/<JOB>/profiles/ or a
# .json file), merged as custom/ops/job_builder.py describes; the job's code is custom/*.py and custom/hcls/.
source "$(dirname "$0")/common.sh"
job=${1:-} profile=${2:-}
check_var PROFILE "$profile" profile
src=$(job_source "$job")
[[ $src == "$REPO/job_configs/$job" ]] || die "JOB '$job' is a ready job folder: only jobs of job_configs/ are built ($(all_jobs | tr '\n' ' '))"
python -m ops.job_builder "$job" ${profile:+--profile "$profile"} --out "$WORK/jobs/$job"
