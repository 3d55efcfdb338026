#!/usr/bin/env bash
# Generate demo data in the real file formats for every client site of provision/project.yml:
#   scripts/generate_data.sh [JOB]   (no JOB: every job)
#   -> workspace/data/<site>/<datasets[JOB] of site_configs/site_<site>/local_config.json>
# Deterministic: each site has its own seed. Sizes are the demo's; the environment overrides them.
source "$(dirname "$0")/common.sh"
CXR_N_TRAIN=${CXR_N_TRAIN:-160} CXR_N_VAL=${CXR_N_VAL:-60} CXR_SIZE=${CXR_SIZE:-128}
CT_N_TRAIN=${CT_N_TRAIN:-10} CT_N_VAL=${CT_N_VAL:-4} CT_SIZE=${CT_SIZE:-48}
LUNA_N_TRAIN=${LUNA_N_TRAIN:-10} LUNA_N_VAL=${LUNA_N_VAL:-6} LUNA_SIZE=${LUNA_SIZE:-48}

generate() {  # generate JOB SITE SEED OUT
  local job=$1 site=$2 seed=$3 out=$4
  case $job in
    cxr_classification)
      python -m datagen.cxr --out "$out" --n-train "$CXR_N_TRAIN" --n-val "$CXR_N_VAL" --size "$CXR_SIZE" --seed "$seed" \
        --site-prefix "$(tr a-z A-Z <<<"${site##*_}")" ;;
    ct_segmentation)
      python -m datagen.ct --out "$out" --n-train "$CT_N_TRAIN" --n-val "$CT_N_VAL" --size "$CT_SIZE" --seed "$seed" ;;
    lung_nodule_detection)
      python -m datagen.luna16 --out "$out" --n-train "$LUNA_N_TRAIN" --n-val "$LUNA_N_VAL" --size "$LUNA_SIZE" --seed "$seed" ;;
    *) die "no data generator for JOB '$job'" ;;
  esac
}

jobs=${1:-$(all_jobs)}
for job in $jobs; do
  job_source "$job" >/dev/null
  seed=0
  for site in $(project_yml '.participants[] | select(.type == "client") | .name'); do
    seed=$((seed + 1))
    cfg=$REPO/site_configs/site_$site/local_config.json
    [[ -f $cfg ]] || die "$cfg not found (site '$site' of $PROJECT_YML)"
    dataset=$(jq -er --arg j "$job" '.datasets[$j]' "$cfg") || die "$cfg: no datasets.$job"
    out=$WORK/data/$site/$dataset
    generate "$job" "$site" "$seed" "$out"
  done
done
