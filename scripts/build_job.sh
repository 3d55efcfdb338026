#!/usr/bin/env bash
# Build an NVFlare job folder: scripts/build_job.sh JOB [PROFILE]  -> prints the folder (workspace/jobs/<JOB>)
# job_configs/base/ + job_configs/<JOB>/job.json + the profile (a name under job_configs/<JOB>/profiles/ or a
# .json file), merged as custom/ops/job_builder.py describes; the job's code is custom/*.py and custom/hcls/.
source "$(dirname "$0")/common.sh"
job=$1 profile=${2:-}
name=$(basename "$(job_source "$job")")
python -m ops.job_builder "$name" ${profile:+--profile "$profile"} --out "$WORK/jobs/$name"
