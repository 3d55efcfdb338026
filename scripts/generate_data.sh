#!/usr/bin/env bash
# Generate demo data in the real file formats for every client site of provision/project.yml:
#   scripts/generate_data.sh [JOB]   -> workspace/data/<site>/<datasets[JOB] of its site config>
# Deterministic: each site has its own seed; sizes come from the environment (demo defaults).
source "$(dirname "$0")/common.sh"
job=${1:-cxr_classification}
CXR_N_TRAIN=${CXR_N_TRAIN:-160} CXR_N_VAL=${CXR_N_VAL:-60} CXR_SIZE=${CXR_SIZE:-128}

seed=0
for site in $(project_yml '.participants[] | select(.type == "client") | .name'); do
  seed=$((seed + 1))
  cfg=$REPO/site_configs/site_$site/local_config.json
  [[ -f $cfg ]] || die "$cfg not found (site '$site' of $PROJECT_YML)"
  dataset=$(jq -er --arg j "$job" '.datasets[$j]' "$cfg") || die "$cfg: no datasets.$job"
  out=$WORK/data/$site/$dataset
  case $job in
    cxr_classification)
      python -m datagen.cxr --out "$out" --n-train "$CXR_N_TRAIN" --n-val "$CXR_N_VAL" --size "$CXR_SIZE" \
        --seed "$seed" --site-prefix "$(echo "${site##*_}" | tr a-z A-Z)" \
        --labels-from "$REPO/job_configs/$job/config_fed_client.json" ;;
    *) die "no data generator for JOB '$job' yet" ;;
  esac
  echo "$site: $out"
done
