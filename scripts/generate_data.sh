#!/usr/bin/env bash
# Generate demo data in the real file formats for every client site of provision/project.yml:
#   scripts/generate_data.sh [JOB]   (no JOB: every job)
#   -> workspace/data/<site>/<datasets[JOB] of site_configs/site_<site>/local_config.json>
# Deterministic: each site has its own seed. Sizes are the demo's; the environment overrides them.
# Each site holds its data in a real release's layout: the Nth client site gets the Nth layout of the
# job's list (cycled), so the demo federation trains across layouts as hospitals would. The environment
# overrides the lists (the tests keep CXR in the project's layout, whose CSV carries the identifiers the
# privacy tests plant and look for). CT layouts: project (the decathlon-style lists), msd (an MSD task's
# dataset.json), +dicom (images as DICOM series folders).
source "$(dirname "$0")/common.sh"
CXR_N_TRAIN=${CXR_N_TRAIN:-160} CXR_N_VAL=${CXR_N_VAL:-60} CXR_SIZE=${CXR_SIZE:-128}
CT_N_TRAIN=${CT_N_TRAIN:-10} CT_N_VAL=${CT_N_VAL:-4} CT_SIZE=${CT_SIZE:-48}
LUNA_N_TRAIN=${LUNA_N_TRAIN:-10} LUNA_N_VAL=${LUNA_N_VAL:-6} LUNA_SIZE=${LUNA_SIZE:-48}
CXR_LAYOUTS=${CXR_LAYOUTS:-chexpert-small nih}
CT_LAYOUTS=${CT_LAYOUTS:-project msd+dicom}
LUNA_LAYOUTS=${LUNA_LAYOUTS:-nifti luna16}

nth() {  # nth INDEX WORD... : the INDEXth word (0-based), cycled
  local i=$1; shift
  local words=("$@")
  echo "${words[i % ${#words[@]}]}"
}

generate() {  # generate JOB SITE INDEX OUT  (INDEX: the site's place among the clients, 0-based)
  local job=$1 site=$2 index=$3 out=$4 layout seed=$(($3 + 1))
  case $job in
    cxr_classification)
      layout=$(nth "$index" $CXR_LAYOUTS)
      python -m datagen.cxr --out "$out" --n-train "$CXR_N_TRAIN" --n-val "$CXR_N_VAL" --size "$CXR_SIZE" --seed "$seed" \
        --site-prefix "$(tr a-z A-Z <<<"${site##*_}")" --layout "$layout" ;;
    ct_segmentation)
      layout=$(nth "$index" $CT_LAYOUTS)
      python -m datagen.ct --out "$out" --n-train "$CT_N_TRAIN" --n-val "$CT_N_VAL" --size "$CT_SIZE" --seed "$seed" \
        --layout "${layout%+dicom}" $([[ $layout == *+dicom ]] && echo --dicom) ;;
    lung_nodule_detection)
      layout=$(nth "$index" $LUNA_LAYOUTS)
      python -m datagen.luna16 --out "$out" --n-train "$LUNA_N_TRAIN" --n-val "$LUNA_N_VAL" --size "$LUNA_SIZE" --seed "$seed" \
        --layout "$layout" ;;
    *) die "no data generator for JOB '$job'" ;;
  esac
}

listed=$(job_list "${1:-}")   # job_configs/ names separated by spaces; empty: every job
mapfile -t jobs <<<"$listed"
for job in "${jobs[@]}"; do
  valid job_name "$job" || die "no data generator for JOB '$(shown "$job")': data is generated for jobs of job_configs/"
  index=0
  for site in $(project_yml '.participants[] | select(.type == "client") | .name'); do
    cfg=$REPO/site_configs/site_$site/local_config.json
    [[ -f $cfg ]] || die "$cfg not found (site '$site' of $PROJECT_YML)"
    dataset=$(jq -er --arg j "$job" '.datasets[$j]' "$cfg") || die "$cfg: no datasets.$job"
    out=$WORK/data/$site/$dataset
    rm -rf "$out"   # generated data only: a layout left from an earlier run would be detected too
    generate "$job" "$site" "$index" "$out"
    index=$((index + 1))
  done
done
