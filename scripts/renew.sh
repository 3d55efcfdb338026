#!/usr/bin/env bash
# Renew certificates from the same root CA: scripts/renew.sh SITE|all   (make renew SITE=<participant>|all)
# A new kit set (make provision's: the root CA of workspace/provision/<project>/state, the server name and HE contexts
# of the deployed kits) in which SITE's kit is new and every other's is the previous set's, byte for byte (all:
# every kit new, the admins' too). Then each renewed participant is deployed, one at a time, the server first, and
# restarted only between jobs: one that runs a job is tried again every 30 s until it is idle (TIMEOUT=<s> bounds
# that wait; default 6 hours). The participants keep trusting each other throughout: the root CA is the same, so old
# and new certificates are both valid until the old ones expire. But a site's session token is signed with the
# server's key: after the server's restart with its new key, the server refuses every site's heartbeat ("invalid
# auth token signature") and NVFlare's sites do not register again by themselves; so every site is restarted after
# the server (the renewed ones by their deploy, the others by flarectl.sh restart) and registers afresh.
source "$(dirname "$0")/common.sh"
site=${1:-}
[[ -n $site ]] || die "usage: make renew SITE=<participant>|all"
check_var SITE "$site" participant
check_timeout
previous=$(latest_kit_root)
state=$(dirname "$previous")/state/cert.json
[[ -f $state ]] || die "renewing needs the root CA key, $state: restore it from its backup (README: Certificates)"
if [[ $site == all ]]; then
  renewed=$( (server_name; participants | grep -vx -- "$(server_name)") )
else
  participants | grep -qx -- "$site" || die "unknown SITE '$site' (participants: $(participants | tr '\n' ' '), or all)"
  renewed=$site
fi

# NVFlare's provisioning keeps each participant's certificate and key in the state file and reuses them: the renewed
# ones are dropped from it first (the root CA's stay), from a backup that is put back if provisioning fails.
backup=$state.$(date +%Y%m%d-%H%M%S).bak
(umask 077 && cp -p "$state" "$backup")
if [[ $site == all ]]; then
  jq 'with_entries(select(.value | type != "object"))' "$backup" >"$state"
else
  jq --arg s "$site" 'del(.[$s])' "$backup" >"$state"
fi
if ! provision_like "$previous" "${site#all}"; then
  cp -p "$backup" "$state"
  die "provisioning failed: nothing was renewed ($state as it was)"
fi
echo "the previous certificates and keys: $backup (owner only; delete it once the renewed kits run)"
kits=$(latest_kit_root)
[[ $site == all ]] || keep_kits "$previous" "$kits" "$site"
for name in $renewed; do
  echo "$name: $(openssl x509 -in "$kits/$name/startup/$( [[ $name == "$(server_name)" ]] && echo server || echo client).crt" \
    -noout -enddate | sed 's/notAfter=/certificate valid until /')"
done

deadline=$((SECONDS + ${TIMEOUT:-21600}))
for name in $renewed; do
  deploy_when_idle "$name" "its new kit"
  echo "$name: renewed and deployed"
  if [[ $name == "$(server_name)" ]]; then   # the sites' tokens were signed with the server's old key
    for other in $(participants | grep -vx -- "$(server_name)"); do
      grep -qx -- "$other" <<<"$renewed" && continue   # its own deploy restarts it
      "$REPO/scripts/control.sh" restart "$other" >"$WORK/renew.$other.log" 2>&1 \
        || { tail -n 20 "$WORK/renew.$other.log" >&2; die "$other did not restart after the server's renewal: make deploy SITE=$other"; }
      echo "$other: restarted to register with the renewed server"
    done
  fi
done
