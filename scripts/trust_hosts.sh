#!/usr/bin/env bash
# Pin the SSH host keys of the inventory's hosts: scripts/trust_hosts.sh [SITE]   (no SITE: every host)
# over $INVENTORY, the inventory `make deploy` uses. Each host reached over SSH (ansible_connection ssh, the
# default; local hosts such as the demo's need no key) is asked for its host keys (ssh-keyscan at ansible_host,
# ansible_port), and they are appended to $HCLS_WORKSPACE/known_hosts (KNOWN_HOSTS below; ansible/ansible.cfg
# makes every Ansible SSH connection use that file alone, with StrictHostKeyChecking=yes). Each host's key
# fingerprints are printed: compare them out of band with the host's own (on the host:
# for f in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf "$f"; done) before deploying.
# A host already pinned with other keys is not replaced: the script fails naming it (its key changed: a
# reinstalled host, or someone in the middle). FORCE=1 (1, true or yes) replaces its pinned keys after you have
# checked the new fingerprints. A host that does not answer fails naming it; the others are pinned.
#   scripts/trust_hosts.sh --check [SITE]   (scripts/deploy.sh) fails naming every SSH host without pinned keys.
source "$(dirname "$0")/common.sh"
KNOWN_HOSTS=$WORK/known_hosts   # the one place of its path; ansible/ansible.cfg names it as ${HCLS_WORKSPACE}/known_hosts
check=false
if [[ ${1:-} == --check ]]; then check=true; shift; fi
site=${1:-}
check_var SITE "$site" participant
force=$(flag FORCE)
export HCLS_PROJECT_YML=$PROJECT_YML   # for inventories that list the participants of project.yml (local/, compose/)

# Every host of $INVENTORY reached over SSH (SITE: only that one), as lines "name address port".
ssh_hosts() {
  local listed errors
  errors=$(mktemp)
  # stdout alone is the inventory: Ansible and its libraries warn on stderr (e.g. cryptography's deprecations)
  listed=$(cd "$REPO/ansible" && ansible-inventory -i "$INVENTORY" --list 2>"$errors") \
    || die "ansible-inventory -i $INVENTORY failed: $(cat "$errors")"
  rm -f "$errors"
  jq -r --arg site "$site" '
    ._meta.hostvars as $vars
    | [.[] | objects | .hosts? // empty | .[]] | unique | .[]
    | select($site == "" or . == $site) as $name
    | ($vars[$name] // {}) as $v
    | select(($v.ansible_connection // "ssh") | IN("ssh", "smart", "ansible.builtin.ssh"))
    | [$name, ($v.ansible_host // $v.ansible_ssh_host // $name), ($v.ansible_port // $v.ansible_ssh_port // 22)]
    | map(tostring) | join(" ")' <<<"$listed" || die "ansible-inventory -i $INVENTORY printed no inventory: $listed"
}

# The name ssh looks a host up by in known_hosts: the address, or [address]:port for another port than 22.
host_token() { if [[ $2 == 22 ]]; then echo "$1"; else echo "[$1]:$2"; fi; }

# The keys pinned for a token, as sorted "type key" lines (ssh-keygen -F also finds hashed entries).
pinned_keys() {
  [[ -f $KNOWN_HOSTS ]] || return 0
  { ssh-keygen -F "$1" -f "$KNOWN_HOSTS" 2>/dev/null || true; } | awk '!/^#/ && $1 !~ /^@/ {print $2, $3}' | sort -u
}

# Fingerprints of "type key" lines, one indented line each.
fingerprints() { sed "s|^|$1 |" | ssh-keygen -lf - | sed 's/^/    /'; }

hosts=$(ssh_hosts)
if [[ $WORK == *[[:space:]]* && -n $hosts ]]; then
  die "HCLS_WORKSPACE '$WORK' has a space: ssh reads UserKnownHostsFile (ansible/ansible.cfg) as a list of files"
fi

if $check; then
  missing=()
  while read -r name address port; do
    [[ -n $name ]] || continue
    [[ -n $(pinned_keys "$(host_token "$address" "$port")") ]] || missing+=("$name ($(host_token "$address" "$port"))")
  done <<<"$hosts"
  (( ${#missing[@]} == 0 )) || die "no pinned SSH host key in $KNOWN_HOSTS for ${missing[*]}: run" \
    "'make trust-hosts INVENTORY=$INVENTORY' and compare the fingerprints it prints with the hosts' own"
  exit 0
fi

[[ -n $hosts ]] || { echo "no host of $INVENTORY${site:+ named $site} is reached over SSH: no host key to pin"; exit 0; }
mkdir -p "$WORK"
touch "$KNOWN_HOSTS"
failed=()
declare -A seen
while read -r name address port; do
  token=$(host_token "$address" "$port")
  [[ $address =~ ^[A-Za-z0-9_.:]([A-Za-z0-9_.:-]*)$ ]] \
    || { echo "error: $name: ansible_host '$(shown "$address")' is not a host name or address" >&2; failed+=("$name"); continue; }
  if [[ -n ${seen[$token]:-} ]]; then echo "$name ($token): the address of ${seen[$token]}, see there"; continue; fi
  seen[$token]=$name
  scanned=$(ssh-keyscan -T 10 -p "$port" "$address" 2>/dev/null | awk '!/^#/ && NF >= 3 {print $2, $3}' | sort -u) || true
  if [[ -z $scanned ]]; then
    echo "error: $name ($token): no host key: ssh-keyscan got none (unknown name, nothing listening, or no answer within 10 s)" >&2
    failed+=("$name")
    continue
  fi
  pinned=$(pinned_keys "$token")
  if [[ $scanned == "$pinned" ]]; then
    echo "$name ($token): already pinned, unchanged:"
    fingerprints "$token" <<<"$scanned"
    continue
  fi
  if [[ -n $pinned ]]; then
    if [[ $force != true ]]; then
      echo "error: $name ($token): its host key differs from the one pinned in $KNOWN_HOSTS: not replaced. A" \
        "reinstalled host, or someone in between: check the new fingerprint with the host's operator, then" \
        "make trust-hosts FORCE=1 SITE=$name" >&2
      { echo "  pinned:"; fingerprints "$token" <<<"$pinned"; echo "  offered now:"; fingerprints "$token" <<<"$scanned"; } >&2
      failed+=("$name")
      continue
    fi
    ssh-keygen -R "$token" -f "$KNOWN_HOSTS" >/dev/null 2>&1 || die "$name: could not remove its pinned keys from $KNOWN_HOSTS"
    echo "$name ($token): pinned keys replaced (FORCE), were:"
    fingerprints "$token" <<<"$pinned"
  fi
  sed "s|^|$token |" <<<"$scanned" >>"$KNOWN_HOSTS"
  echo "$name ($token): pinned now; compare with the host's own (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub there):"
  fingerprints "$token" <<<"$scanned"
done <<<"$hosts"
(( ${#failed[@]} == 0 )) || die "host keys not pinned for ${failed[*]} (see above)"
echo "host keys of $INVENTORY in $KNOWN_HOSTS"
