#!/usr/bin/env bash
# Fetch the best global model of a finished job: scripts/fetch_model.sh JOB [JOB_ID] [DEST]
# Writes models/<JOB>/best_model.pt (plain state_dict), best_model.json, cross_site_val.json, tensorboard/,
# update_bytes.json (sparse jobs) and bundle/ (the model as a MONAI bundle with its passport).
# The network and settings come from the downloaded job itself, whatever profile it was built with.
source "$(dirname "$0")/common.sh"
job=$1 job_id=${2:-} dest=${3:-}
src=$(job_source "$job")
if [[ -f $src/meta.json ]]; then   # a ready NVFlare job folder: its job name
  name=$(jq -r .name "$src/meta.json")
else
  name=$(basename "$src")
fi
latest_kit_root >/dev/null   # no startup kits: one error, and stop
kit=$(admin_kit)
python -m ops.flare_admin fetch --kit "$kit" --job "$name" \
  --out "$MODELS_DIR/$name" ${job_id:+--job-id "$job_id"} ${dest:+--dest "$dest"}
