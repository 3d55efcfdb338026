#!/usr/bin/env bash
# Fetch the best global model of a finished job: scripts/fetch_model.sh JOB [JOB_ID] [DEST]
# Writes models/<JOB>/best_model.pt (plain state_dict), best_model.json, cross_site_val.json, tensorboard/,
# update_bytes.json (sparse jobs) and bundle/ (the model as a MONAI bundle with its passport).
# The network and settings come from the downloaded job itself, whatever profile it was built with.
# Without JOB_ID: the latest finished JOB job that this admin kit's admin submitted; a job that someone else
# submitted under the name is fetched only by its JOB_ID. Model files load as weights only (a checkpoint whose
# pickle would run code is refused). The new set is staged next to models/<JOB>/ and swapped in with one rename;
# the set it replaces stays as models/<JOB>.prev/ (one generation); an error leaves both as they were.
# Weight files (*.pt) are 0600, the other files 0644.
source "$(dirname "$0")/common.sh"
job=${1:-} job_id=${2:-} dest=${3:-}
check_var JOB_ID "$job_id" job_id
check_var DEST "$dest" path
name=$(job_name "$job")   # a job_configs/ name, or a job folder's meta.json name
latest_kit_root >/dev/null   # no startup kits: one error, and stop
kit=$(admin_kit)
python -m ops.flare_admin fetch --kit "$kit" --job "$name" \
  --out "$MODELS_DIR/$name" ${job_id:+--job-id "$job_id"} ${dest:+--dest "$dest"}
