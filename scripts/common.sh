# Shared by the scripts: paths, the one source of names (provision/project.yml), errors.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv
# Everything generated (kits, local deployments, built jobs, demo data) and fetched models;
# git-ignored. Tests point both elsewhere.
export HCLS_WORKSPACE=${HCLS_WORKSPACE:-$REPO/workspace}
WORK=$HCLS_WORKSPACE
MODELS_DIR=${MODELS_DIR:-$REPO/models}
PROJECT_YML=$REPO/provision/project.yml
PROVISION_DIR=$WORK/provision
INVENTORY=${INVENTORY:-$REPO/ansible/inventories/local/hosts.sh}
[[ $INVENTORY == /* ]] || INVENTORY=$PWD/$INVENTORY   # ansible-playbook runs in ansible/: a relative path is the caller's
export PATH=$VENV/bin:$PATH
export PYTHONPATH=$REPO/custom${PYTHONPATH:+:$PYTHONPATH}

die() { echo "error: $*" >&2; exit 1; }

# ---- Values of `make` variables and script arguments --------------------------------------------------------------
# A value (SITE=, JOB=, ... of `make`, a script's argument) is data: it is checked against a strict pattern before
# anything uses it and reaches commands only as one quoted word, never re-parsed by make or the shell (the Makefile
# passes "$$VAR", not $(VAR)). Each error names the variable and what it allows. Empty means "not set" and passes
# (a script that needs the value says so).

PATH_CHARS="letters, digits, space and _ . / + , = @ % : - (not starting with -)"

# The value as an error shows it: control characters (a newline) as '?'.
shown() { local v=$1; printf '%s' "${v//[^[:print:]]/?}"; }

# valid KIND VALUE: whether VALUE is a KIND (see describe).
valid() {
  local kind=$1 value=$2 re
  case $kind in
    participant) re='^[A-Za-z0-9][A-Za-z0-9_.-]*$' ;;
    job_name) re='^[a-z0-9_]+$' ;;
    job_id) re='^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$' ;;
    seconds) re='^[1-9][0-9]{0,8}$' ;;
    number) re='^[0-9]{1,9}$' ;;
    count) re='^[1-9][0-9]{0,5}$' ;;
    org) re='^[A-Za-z0-9_]+$' ;;
    rows) re='^[a-z_]+(,[a-z_]+)*$' ;;
    host) (( ${#value} <= 253 )) || return 1
      re='^[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$' ;;
    path) re='^[A-Za-z0-9_./+,=@%:][A-Za-z0-9_./ +,=@%:-]*$' ;;
    profile) [[ $value =~ ^[A-Za-z0-9_-]+$ ]] && return 0
      [[ $value == *.json ]] && valid path "$value"; return ;;
    *) die "valid: unknown kind '$kind'" ;;
  esac
  [[ $value =~ $re ]]
}

describe() {
  case $1 in
    participant) echo "a participant name: letters, digits, _ . - (starting with a letter or digit)" ;;
    job_name) echo "a job name: lower-case letters, digits, _" ;;
    job_id) echo "an NVFlare job id: a UUID (8-4-4-4-12 hexadecimal digits)" ;;
    seconds) echo "a whole number of seconds > 0: digits" ;;
    number) echo "a number: digits" ;;
    count) echo "a whole number > 0: digits" ;;
    org) echo "an NVFlare org name: letters, digits, _" ;;
    rows) echo "benchmark rows: lower-case names separated by commas" ;;
    host) echo "a host name: letters, digits, _ - in labels separated by dots" ;;
    path) echo "a path: $PATH_CHARS" ;;
    profile) echo "a profile name (letters, digits, _ -) or a .json file (a path: $PATH_CHARS)" ;;
  esac
}

# check_var NAME VALUE KIND: die naming NAME and what KIND allows, unless VALUE is empty or a KIND.
check_var() {
  [[ -z $2 ]] || valid "$3" "$2" || die "$1='$(shown "$2")' is not $(describe "$3")"
}

# flag NAME [VALUE]: prints true or false for a yes/no variable (VALUE; default: the variable NAME itself).
# 1, true, yes (any case) mean on; 0, false, no and empty mean off; anything else is an error naming NAME.
flag() {
  local name=$1 value=${2-${!1:-}}
  case ${value,,} in
    1 | true | yes) echo true ;;
    "" | 0 | false | no) echo false ;;
    *) die "$name='$(shown "$value")' is not a yes/no value: 1, true or yes (on); 0, false, no or empty (off)" ;;
  esac
}
# is_on NAME [VALUE]: flag as a test, for `if is_on WAIT "$wait"; then` (an invalid value stops the script).
is_on() {
  local on
  on=$(flag "$@") || exit 1
  [[ $on == true ]]
}

# TIMEOUT (environment) of submit WAIT=1 and wait: seconds > 0, or empty for no limit.
check_timeout() {
  [[ -z ${TIMEOUT:-} ]] || valid seconds "$TIMEOUT" \
    || die "TIMEOUT='$(shown "$TIMEOUT")' is not a whole number of seconds > 0: digits (empty: follow the job until it ends)"
}

# Every variable of `make` (README: Commands), checked before a target does anything (the Makefile's check-vars).
# JOB is checked in full here (job_list); SITE is a name here, the scripts check it against project.yml.
check_make_vars() {
  local var
  check_var SITE "${SITE:-}" participant
  [[ -z ${JOB:-} ]] || job_list "$JOB" >/dev/null
  check_var JOB_ID "${JOB_ID:-}" job_id
  check_var PROFILE "${PROFILE:-}" profile
  for var in WAIT KEEP HE FORCE INSTALL QUICK; do flag "$var" >/dev/null; done
  check_var DEST "${DEST:-}" path
  check_var DATA "${DATA:-}" path
  check_var EPOCHS "${EPOCHS:-}" count
  check_timeout
  check_var SERVER_HOST "${SERVER_HOST:-}" host
  check_var ORG "${ORG:-}" org
  check_var HOST "${HOST:-}" host
  check_var ONLY "${ONLY:-}" rows
  check_var INVENTORY "${INVENTORY#"$REPO"/}" path   # made absolute above: the repository's own path is not checked
}

project_yml() {
  yq -r "$1" "$PROJECT_YML" 2>/dev/null || die "$PROJECT_YML is not valid YAML (yq '$1' failed)"
}
project_name() { project_yml .name; }
# Server and clients, as named in project.yml.
participants() { project_yml '.participants[] | select(.type == "server" or .type == "client") | .name'; }
admin_name() { project_yml '.participants[] | select(.role == "project_admin") | .name' | head -n1; }

# The newest provisioned kit set (workspace/provision/<project>/prod_NN).
kit_roots() {
  local d
  for d in "$PROVISION_DIR/$(project_name)"/prod_*/; do if [[ -d $d ]]; then echo "${d%/}"; fi; done | sort -V
}
latest_kit_root() {
  local root
  root=$(kit_roots | tail -n1)
  [[ -n $root ]] || die "no startup kits under $PROVISION_DIR: run 'make provision' first"
  echo "$root"
}
admin_kit() { echo "$(latest_kit_root)/$(admin_name)"; }
server_name() { project_yml '.participants[] | select(.type == "server") | .name'; }

# The server name the sites' kits of kit set $1 dial (a client kit's startup/fed_client.json).
kit_server_host() {
  local kit
  kit=$(ls -d "$1"/*/startup/fed_client.json 2>/dev/null | head -n1)
  [[ -n $kit ]] || die "$1 has no site kit (startup/fed_client.json)"
  jq -er '.servers[0].service.target | split(":")[0]' "$kit" || die "$kit: no servers[0].service.target"
}

# provision_like PREVIOUS [ONE]: a new kit set from the same root CA, its kits dialling the server as PREVIOUS's do
# and with HE contexts where PREVIOUS's have them; prints nothing but errors (the log goes to $WORK/provision.log).
# ONE: only that participant's kit will be used (keep_kits), which HE kits do not allow: provisioning makes a new
# CKKS key pair, which the others' kits would not share.
provision_like() {
  local previous=$1 one=${2:-} server_host he=()
  server_host=$(kit_server_host "$previous") || return 1
  if [[ -n ${SERVER_HOST:-} && $SERVER_HOST != "$server_host" ]]; then
    echo "error: SERVER_HOST=$SERVER_HOST, but the deployed kits ($previous) dial '$server_host': leave SERVER_HOST unset" >&2
    return 1
  fi
  compgen -G "$previous/*/startup/*.tenseal" >/dev/null && he=(--he)
  if [[ -n $one && ${#he[@]} -gt 0 ]]; then
    echo "error: the kits of $previous carry HE contexts (make provision HE=1): a new kit for $one alone would hold" \
      "another CKKS key than the others'; renew every kit instead (make renew SITE=all)" >&2
    return 1
  fi
  SERVER_HOST=$server_host "$REPO/scripts/provision.sh" "${he[@]}" >"$WORK/provision.log" 2>&1 \
    || { tail -n 20 "$WORK/provision.log" >&2; return 1; }
  [[ $(latest_kit_root) != "$previous" ]] || { echo "provisioning wrote no new kit set, see $WORK/provision.log" >&2; return 1; }
}

# keep_kits PREVIOUS NEW NAME: in kit set NEW, every participant's kit but NAME's is PREVIOUS's, byte for byte (a
# later deploy changes nothing of theirs).
keep_kits() {
  local previous=$1 new=$2 name=$3 entry
  for entry in "$previous"/*; do
    [[ $(basename "$entry") == "$name" ]] && continue
    rm -rf "${new:?}/$(basename "$entry")"
    cp -a "$entry" "$new/"
  done
}

# ---- The pinned Python environment (requirements.txt): images (build_image.sh) and hosts' venvs (upgrade.sh) ------
# The pins rolled out: $HCLS_REQUIREMENTS (default requirements.txt), with its torch replaced by TORCH_REQUIREMENT
# when set (e.g. torch==2.13.0+cpu, a CPU build; torchvision, which needs the pinned torch, is then left out).
pinned_requirements() {
  local file=${HCLS_REQUIREMENTS:-$REPO/requirements.txt}
  [[ -f $file ]] || die "HCLS_REQUIREMENTS=$file: no such file"
  if [[ -z ${TORCH_REQUIREMENT:-} ]]; then cat "$file"; return; fi
  grep -vE '^(torch|torchvision)==' "$file"
  echo "$TORCH_REQUIREMENT"
}
# Wheels downloaded once for every image and environment (pip's own index and cache, or a hospital's mirror).
WHEELHOUSE=$WORK/wheelhouse
# fill_wheels REQUIREMENTS DEST LOG: the wheels REQUIREMENTS resolve to for this Python, downloaded into WHEELHOUSE
# where missing, and exactly those copied into DEST.
fill_wheels() {
  local requirements=$1 dest=$2 log=$3
  mkdir -p "$WHEELHOUSE" "$dest"
  pip download --only-binary=:all: -d "$WHEELHOUSE" -r "$requirements" >"$log" 2>&1 \
    || die "pip download of $requirements failed; the end of $log:
$(tail -n 5 "$log")"
  pip download --no-index --find-links "$WHEELHOUSE" --only-binary=:all: -d "$dest" -r "$requirements" >>"$log" 2>&1 \
    || die "the wheelhouse $WHEELHOUSE lacks wheels of $requirements, see $log"
}

# deploy_when_idle NAME WHAT: scripts/deploy.sh NAME, tried again every 30 s while the participant runs a job (the
# deploy refuses to restart it then) until it is idle or the deadline ($deadline, in SECONDS) passes. WHAT says what
# is deployed ("its new kit"). The log is $WORK/deploy.NAME.log.
deploy_when_idle() {
  local name=$1 what=$2 log=$WORK/deploy.$1.log busy
  while true; do
    "$REPO/scripts/deploy.sh" "$name" >"$log" 2>&1 && return 0
    busy=$(grep -o "$name runs job [^:]*" "$log" | head -n1 || true)
    if [[ -z $busy ]]; then
      tail -n 30 "$log" >&2
      die "deploying $what to $name failed (above; $log)"
    fi
    (( SECONDS < deadline )) || die "$busy for longer than TIMEOUT: $what is not deployed yet; make deploy SITE=$name when it is idle"
    echo "$busy: deploying $what when the job has ended (trying every 30 s)"
    sleep 30
  done
}

# Jobs are the job_configs/<job>/ folders with a job.json overlay (job_configs/base/ is what they share).
all_jobs() { local f; for f in "$REPO"/job_configs/*/job.json; do basename "$(dirname "$f")"; done; }

# job_configs/<JOB> for a job name, or JOB itself when it is a ready NVFlare job folder: a path (it has a '/', or
# a meta.json) without a '..' component.
job_source() {
  local job=$1
  [[ -n $job ]] || die "JOB is not set (jobs: $(all_jobs | tr '\n' ' '))"
  if [[ $job == */* || -f $job/meta.json ]]; then
    valid path "$job" || die "JOB='$(shown "$job")' is not a job of job_configs/ ($(all_jobs | tr '\n' ' ')) nor a job folder: $(describe path)"
    [[ /$job/ != */../* ]] || die "JOB='$(shown "$job")' has a '..' in its path: name a job of job_configs/ ($(all_jobs | tr '\n' ' ')) or a job folder without '..'"
    [[ -f $job/meta.json ]] || die "JOB '$job' is not a job folder (no $job/meta.json) nor a job of job_configs/ ($(all_jobs | tr '\n' ' '))"
    echo "$job"
    return
  fi
  [[ $job =~ ^[a-z0-9_]+$ && -f $REPO/job_configs/$job/job.json ]] || die "unknown JOB '$(shown "$job")' (jobs: $(all_jobs | tr '\n' ' '))"
  echo "$REPO/job_configs/$job"
}

# job_list JOB: the jobs a JOB value names, one a line: job_configs/ names separated by spaces, or one job folder
# (a value with a '/': its path may hold spaces); empty: every job. Split without globbing.
job_list() {
  local value=$1 words=() word
  if [[ -z $value ]]; then all_jobs; return; fi
  if [[ $value == */* ]]; then job_source "$value" >/dev/null; echo "$value"; return; fi
  read -ra words -d '' <<<"$value" || true
  (( ${#words[@]} )) || die "JOB='$(shown "$value")' names no job (jobs: $(all_jobs | tr '\n' ' '))"
  for word in "${words[@]}"; do job_source "$word" >/dev/null; echo "$word"; done
}

# job_name JOB: the name a job runs and is fetched under (models/<name>/): a job_configs/ job's name, or a job
# folder's meta.json name (NVFlare's default: the folder's name). Letters, digits, _ - only: it becomes a path.
job_name() {
  local src name
  src=$(job_source "$1")
  name=$(basename "$src")
  if [[ -f $src/meta.json ]]; then
    name=$(jq -r --arg d "$name" '.name // $d' "$src/meta.json") || die "$src/meta.json is not valid JSON"
  fi
  [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] \
    || die "job $src is named '$(shown "$name")' (meta.json name): not a job name: letters, digits, _ - (starting with a letter or digit)"
  echo "$name"
}

# pack_data_checks STAGE PROFILE JOB...: build each job as scripts/build_job.sh does (PROFILE may be empty), into
# STAGE/build (workspace/jobs/ is left as it is), and pack each built app's config/ and custom/ as JOB/config and
# JOB/custom into STAGE/jobs.tgz, what ansible's check_data tasks send to a site's host (make check-data, make doctor).
# Prints flare_check_jobs: [{name, script: the client app_script}, ...].
pack_data_checks() (
  set -e   # a command substitution does not inherit errexit
  local stage=$1 profile=$2 name app script checks='[]'
  shift 2
  for name in "$@"; do
    python -m ops.job_builder "$name" ${profile:+--profile "$profile"} --out "$stage/build/$name" >/dev/null
    app=$stage/build/$name/app
    script=$(jq -er '.app_script' "$app/config/config_fed_client.json") || die "the built $name has no client app_script"
    mkdir -p "$stage/jobs/$name"
    cp -R "$app/config" "$app/custom" "$stage/jobs/$name/"
    checks=$(jq -c --arg name "$name" --arg script "$script" '. + [{name: $name, script: $script}]' <<<"$checks")
  done
  find "$stage/jobs" -name __pycache__ -prune -exec rm -rf {} +
  tar -czf "$stage/jobs.tgz" -C "$stage/jobs" .
  echo "$checks"
)
