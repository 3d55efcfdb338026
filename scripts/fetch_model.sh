#!/usr/bin/env bash
# Fetch the best global model of a finished job: scripts/fetch_model.sh JOB [JOB_ID] [DEST]
# Writes models/<JOB>/best_model.pt (plain state_dict), best_model.json, cross_site_val.json.
source "$(dirname "$0")/common.sh"
job=$1 job_id=${2:-} dest=${3:-}
src=$(job_source "$job")
if [[ -d $src/app/config ]]; then   # a ready NVFlare job folder
  name=$(jq -r .name "$src/meta.json") config=$src/app/config
else
  name=$(basename "$src") config=$src
fi
python -m ops.flare_admin fetch --kit "$(admin_kit)" --job "$name" --job-config "$config" \
  --out "$MODELS_DIR/$name" ${job_id:+--job-id "$job_id"} ${dest:+--dest "$dest"}
