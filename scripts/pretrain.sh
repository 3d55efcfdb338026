#!/usr/bin/env bash
# Pre-train a job's network on a public data set as it ships, for the dp_pretrained profiles:
#   scripts/pretrain.sh JOB DATA [EPOCHS] [DEST] [PROFILE]
# Writes DEST/<JOB>.pt (default custom/pretrained/<JOB>.pt, where the profiles name it; shipped inside each job
# that names it, never committed), the best epoch on DATA's own validation split; custom/ops/pretrain.py says how.
source "$(dirname "$0")/common.sh"
job=${1:-} data=${2:-} epochs=${3:-10} dest=${4:-$REPO/custom/pretrained} profile=${5:-}
[[ -n $job && -n $data ]] || die "usage: make pretrain JOB=<job> DATA=<public data set folder> [EPOCHS=10] [DEST=<dir>] [PROFILE=]"
src=$(job_source "$job")
[[ $src == "$REPO/job_configs/$job" ]] || die "JOB '$job' is a ready job folder: only jobs of job_configs/ are pre-trained ($(all_jobs | tr '\n' ' '))"
check_var DATA "$data" path
check_var EPOCHS "$epochs" count
check_var DEST "$dest" path
check_var PROFILE "$profile" profile
[[ -d $data ]] || die "DATA='$data': no such folder (the public data set as it ships, e.g. CheXpert-v1.0-small/)"
python -m ops.pretrain "$job" "$data" --epochs "$epochs" --out "$dest/$job.pt" ${profile:+--profile "$profile"}
