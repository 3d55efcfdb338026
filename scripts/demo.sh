#!/usr/bin/env bash
# One-command local federation: scripts/demo.sh [KEEP] [JOB...]   (no JOB: every job; a JOB argument may hold
# several names separated by spaces, as make demo JOB="a b" passes them; KEEP: 1, true or yes keeps it running)
# provision (once) -> demo data -> approve the jobs' code at every site (site_configs/site_<site>/approved_jobs.json)
# -> deploy server and sites -> submit with the demo profile
# -> wait with progress -> fetch the best model -> stop the federation (KEEP=1 leaves it running).
source "$(dirname "$0")/common.sh"
keep=$(flag KEEP "${1:-}")
shift || true
listed=$(job_list "$*")   # empty: every job
mapfile -t jobs <<<"$listed"
for job in "${jobs[@]}"; do
  valid job_name "$job" || die "JOB '$(shown "$job")': the demo runs jobs of job_configs/ ($(all_jobs | tr '\n' ' '))"
done
start=$SECONDS

stop_federation() { [[ $keep == true ]] || "$REPO/scripts/control.sh" stop >/dev/null || true; }
trap stop_federation EXIT

step() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - start))"; }

step "provision"
if kit_roots | grep -q .; then echo "kits exist: $(latest_kit_root) (make provision makes new ones)"
else "$REPO/scripts/provision.sh"; fi

for job in "${jobs[@]}"; do step "generate $job data"; "$REPO/scripts/generate_data.sh" "$job"; done

for job in "${jobs[@]}"; do step "approve $job (demo profile) at every site"; "$REPO/scripts/approve.sh" "$job" demo; done

step "deploy"
"$REPO/scripts/deploy.sh" | grep -E '^(PLAY RECAP|[a-z_@.-]+ +: ok=)'

for job in "${jobs[@]}"; do
  step "train $job (demo profile)"
  "$REPO/scripts/submit.sh" "$job" demo 1 | tee "$WORK/demo_submit.log"
  job_id=$(sed -n 's/^submitted .*: job id \(.*\)$/\1/p' "$WORK/demo_submit.log")
  step "fetch $job model"
  "$REPO/scripts/fetch_model.sh" "$job" "$job_id"
done

step "done"
for job in "${jobs[@]}"; do
  jq -r '"\(.job): best \(.key_metric) \(.value) (round \(.round)), untrained \(.initial_value) -> \(input_filename | sub("json$"; "pt"))"' \
    "$MODELS_DIR/$job/best_model.json"
done
[[ $keep == true ]] && echo "federation left running: 'make status', 'make down'" || echo "stopping the federation (KEEP=1 leaves it running)"
