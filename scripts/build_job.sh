#!/usr/bin/env bash
# Build an NVFlare job folder: scripts/build_job.sh JOB [PROFILE]  -> prints the folder
# job_configs/<JOB>/ gives meta.json and the app configs, custom/*.py the trainer code.
# PROFILE (e.g. demo) deep-merges job_configs/<JOB>/profiles/<PROFILE>.json
#   {"meta": {...}, "server": {...}, "client": {...}} over the three files (meta keys replace whole).
source "$(dirname "$0")/common.sh"
job=$1 profile=${2:-}
src=$(job_source "$job")
name=$(basename "$src")
out=$WORK/jobs/$name

for f in meta.json config_fed_server.json config_fed_client.json; do
  [[ -f $src/$f ]] || die "$src/$f not found"
  jq empty "$src/$f" 2>/dev/null || die "$src/$f is not valid JSON: $(jq empty "$src/$f" 2>&1 | head -n1)"
done
overlay='{}'
if [[ -n $profile ]]; then
  overlay_file=$src/profiles/$profile.json
  [[ -f $profile ]] && overlay_file=$profile   # a profile may also be given as a file
  [[ -f $overlay_file ]] || die "no profile '$profile' for $name ($overlay_file not found)"
  jq empty "$overlay_file" 2>/dev/null || die "$overlay_file is not valid JSON"
  overlay=$(cat "$overlay_file")
fi

rm -rf "$out"
mkdir -p "$out/app/config" "$out/app/custom"
merge() { jq --argjson o "$overlay" --arg k "$2" '. * ($o[$k] // {})' "$src/$1"; }
jq --argjson o "$overlay" '. + ($o.meta // {})' "$src/meta.json" > "$out/meta.json"  # meta keys are replaced whole
merge config_fed_server.json server > "$out/app/config/config_fed_server.json"
merge config_fed_client.json client > "$out/app/config/config_fed_client.json"
cp "$REPO"/custom/*.py "$out/app/custom/"
echo "$out"
