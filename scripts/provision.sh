#!/usr/bin/env bash
# Provision the federation from provision/project.yml into workspace/provision.
# Re-running keeps the root CA (state/cert.json), so kits already deployed stay valid.
# scripts/provision.sh --he   (make provision HE=1: HE from the environment, 1, true or yes) adds NVFlare's HEBuilder: CKKS TenSEAL contexts
# for the server (no secret key) and the sites (with it), for jobs run with profiles/he.json.
source "$(dirname "$0")/common.sh"
he=${1:-}
[[ -z $he || $he == --he ]] || die "unknown option '$(shown "$he")' (only --he)"
if [[ -z $he ]] && is_on HE; then he=--he; fi
check_var SERVER_HOST "${SERVER_HOST:-}" host   # make provision SERVER_HOST=<name>
# The documented CKKS parameters; placed before SignatureBuilder so the contexts are signed too.
HE_BUILDER='{"path": "nvflare.lighter.impl.he.HEBuilder",
  "args": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40], "scale_bits": 40}}'

[[ -f $PROJECT_YML ]] || die "$PROJECT_YML not found"
project_yml . >/dev/null
before=$(kit_roots | wc -l)
# Kits already provisioned without the root CA key beside them (kept off this machine, README "Health"): nvflare would
# silently make a new root CA that no deployed kit trusts.
state=$PROVISION_DIR/$(project_name)/state/cert.json
if (( before > 0 )) && [[ ! -f $state ]]; then
  die "the root CA key $state is missing, but kits from it exist under $PROVISION_DIR/$(project_name): put the backed-up state/ back first (provisioning now would create a new root CA that the deployed kits do not trust; to start a new CA on purpose, move the old prod_* folders away)"
fi

mkdir -p "$PROVISION_DIR"
project=$PROJECT_YML
if [[ -n $he ]]; then   # project.yml stays the one list of participants; the HE variant is derived from it
  project=$PROVISION_DIR/project_he.yml
  yq -y --argjson he "$HE_BUILDER" '.builders |= (map(select(.path | endswith("SignatureBuilder") | not))
    + [$he] + map(select(.path | endswith("SignatureBuilder"))))' "$PROJECT_YML" > "$project" \
    || die "cannot derive the HE project from $PROJECT_YML"
fi
if [[ -n ${SERVER_HOST:-} ]]; then   # make provision SERVER_HOST=<name>: the name clients and admins dial
  yq -y --arg h "$SERVER_HOST" '(.participants[] | select(.type == "server"))
    |= (.default_host = $h | .host_names = ((.host_names // []) + [$h] | unique))' "$project" > "$PROVISION_DIR/project_host.yml" \
    || die "cannot set SERVER_HOST '$SERVER_HOST' on $project"
  project=$PROVISION_DIR/project_host.yml
fi
# Kits, the sites' HE contexts (secret key) and the root CA key (state/cert.json): owner only.
(umask 077 && cd "$PROVISION_DIR" && nvflare provision --force -p "$project" -w "$PROVISION_DIR") \
  || die "nvflare provision failed on $project"
chmod -R go-rwx "$PROVISION_DIR"   # also what earlier runs wrote with a laxer umask
after=$(kit_roots | wc -l)
(( after > before )) || die "nvflare provision wrote no kits from $PROJECT_YML (see its output above)"

kits=$(latest_kit_root)
echo "startup kits: $kits"
echo "root CA: $(openssl x509 -in "$kits/$(participants | head -n1)/startup/rootCA.pem" -noout -fingerprint -sha256)"
