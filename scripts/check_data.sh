#!/usr/bin/env bash
# Check a site's data for each job on the site's host, with its deployed configuration, without training and
# without contacting the server:   scripts/check_data.sh SITE [JOB] [PROFILE]   (no JOB: every job)
# Each job is built (as scripts/build_job.sh JOB PROFILE builds it) and its own check, custom/<app_script> --check,
# runs on SITE's host over $INVENTORY as the site's trainers run (ansible/check_data.yml, flarectl.sh check-data).
# Only the summaries come back: each is printed and kept in $HCLS_WORKSPACE/check-data/<SITE>/<JOB>.json. Exit
# status 1 when any job's data has a problem or a check did not run (after every job's summary is printed).
source "$(dirname "$0")/common.sh"
site=${1:-} job=${2:-} profile=${3:-}

clients() { project_yml '.participants[] | select(.type == "client") | .name'; }
[[ -n $site ]] || die "SITE is not set (sites in $PROJECT_YML: $(clients | tr '\n' ' '))"
check_var SITE "$site" participant
clients | grep -qx -- "$site" || die "unknown SITE '$site' (sites in $PROJECT_YML: $(clients | tr '\n' ' '))"
check_var PROFILE "$profile" profile
listed=$(job_list "$job")   # job_configs/ names separated by spaces; empty: every job
mapfile -t jobs <<<"$listed"
for name in "${jobs[@]}"; do
  valid job_name "$name" || die "unknown JOB '$(shown "$name")' (jobs: $(all_jobs | tr '\n' ' ')): check-data runs jobs of job_configs/"
done

out=$WORK/check-data
stage=$(mktemp -d -t hcls-check-data.XXXXXX)
trap 'rm -rf "$stage"' EXIT
checks=$(pack_data_checks "$stage" "$profile" "${jobs[@]}")
for name in "${jobs[@]}"; do rm -f "$out/$site/$name.json"; done

export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)
# Ansible's own report goes to stderr; stdout carries the summaries.
rc=0
extra=$(jq -cn --argjson jobs "$checks" --arg archive "$stage/jobs.tgz" --arg out "$out" \
  '{flare_check_jobs: $jobs, flare_check_archive: $archive, flare_check_out_dir: $out}')
(cd "$REPO/ansible" && ansible-playbook -i "$INVENTORY" check_data.yml --limit "$site" -e "$extra") >&2 || rc=$?

failed=()
for name in "${jobs[@]}"; do
  summary=$out/$site/$name.json
  if [[ -f $summary ]] && jq -e 'has("ok")' "$summary" >/dev/null 2>&1; then
    if jq -e '.ok == true' "$summary" >/dev/null; then
      echo "== $site $name: ok"
    else
      echo "== $site $name: FAILED (errors: $(jq '.errors | length' "$summary"))"
      failed+=("$name")
    fi
    cat "$summary"; echo
  else
    echo "== $site $name: no summary (the check did not run on $site: see Ansible's report above)"
    failed+=("$name")
  fi
done
echo "summaries: $out/$site/" >&2
if (( ${#failed[@]} )); then
  echo "check-data $site: failed: ${failed[*]}"
  exit 1
fi
(( rc == 0 )) || die "ansible-playbook check_data.yml failed ($rc) though every summary is ok"
echo "check-data $site: ok (${jobs[*]})"
