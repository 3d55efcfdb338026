#!/usr/bin/env bash
# One health report of the federation, participant by participant, read through Ansible on each host:
#   scripts/doctor.sh [SITE] [JOB] [PROFILE]    (make doctor; no SITE: every participant; no JOB: every job)
# ansible/doctor.yml reads each host (versions, certificates, clock, privacy scopes, GPUs, free disk, the server's
# ports and NVFlare's client preflight rule from each site) and runs each job's data check on the sites (the one
# `make check-data` runs; only counts come back); custom/ops/doctor.py compares and prints the table. The report is
# kept in $HCLS_WORKSPACE/doctor.json, Ansible's own output in $HCLS_WORKSPACE/doctor/ansible.log. Exit status 1 on
# any error (an unreachable host is one; the other hosts are still reported).
source "$(dirname "$0")/common.sh"
site=${1:-} job=${2:-} profile=${3:-}
if [[ -n $site ]]; then
  check_var SITE "$site" participant
  participants | grep -qx -- "$site" || die "unknown SITE '$site' (participants: $(participants | tr '\n' ' '))"
fi
check_var PROFILE "$profile" profile
listed=$(job_list "$job")   # job_configs/ names; empty: every job
mapfile -t jobs <<<"$listed"
for name in "${jobs[@]}"; do
  valid job_name "$name" || die "unknown JOB '$(shown "$name")' (jobs: $(all_jobs | tr '\n' ' ')): doctor checks jobs of job_configs/"
done

out=$WORK/doctor
rm -rf "$out"
mkdir -p "$out/hosts" "$out/check-data"
stage=$(mktemp -d -t hcls-doctor.XXXXXX)
trap 'rm -rf "$stage"' EXIT
checks=$(pack_data_checks "$stage" "$profile" "${jobs[@]}")

export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)
extra=$(jq -cn --arg out "$out" --argjson jobs "$checks" --arg archive "$stage/jobs.tgz" \
  '{flare_doctor_out_dir: $out, flare_check_jobs: $jobs, flare_check_archive: $archive, flare_check_out_dir: ($out + "/check-data")}')
echo "doctor: reading the hosts of $INVENTORY (Ansible's output: $out/ansible.log)" >&2
rc=0
(cd "$REPO/ansible" && ansible-playbook -i "$INVENTORY" doctor.yml -e "$extra" ${site:+--limit "$site"}) >"$out/ansible.log" 2>&1 || rc=$?
# rc 2 and 4 (a host failed, unreachable) are the report's to explain; anything else is Ansible's own failure.
if (( rc != 0 && rc != 2 && rc != 4 )); then
  tail -n 30 "$out/ansible.log" >&2
  die "ansible-playbook doctor.yml failed ($rc): see $out/ansible.log"
fi
python -m ops.doctor "$out" --project "$PROJECT_YML" --jobs-dir "$stage/build" ${site:+--site "$site"} --json "$WORK/doctor.json"
