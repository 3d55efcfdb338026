#!/usr/bin/env bash
# Add a hospital site to a running federation: scripts/add_site.sh SITE ORG [HOST]   (make add-site SITE= ORG= HOST=)
#  1. provision/project.yml gets the client SITE of ORG, an org the project already has (custom/ops/project_file.py
#     keeps every other line); with HOST, so does $INVENTORY when it is a YAML file (host SITE, ansible_host HOST);
#  2. site_configs/site_SITE/local_config.json is scaffolded with the privacy defaults (kept when it exists);
#  3. its kit is provisioned from the same root CA (workspace/provision/<project>/state) into a new kit set in which
#     every other participant's kit is the previous set's, byte for byte: a later deploy changes nothing of theirs;
#  4. its SSH host key is pinned (make trust-hosts SITE=, printing the fingerprint) and only SITE is deployed.
# Nothing else is touched: no other participant is restarted; jobs built afterwards count SITE (min_clients).
# Bad input (an existing name, an unknown org, no kit set yet, a YAML inventory without HOST) changes nothing.
source "$(dirname "$0")/common.sh"
site=${1:-} org=${2:-} host=${3:-}
[[ -n $site && -n $org ]] || die "usage: make add-site SITE=<new site> ORG=<its org> [HOST=<its address>]"
check_var SITE "$site" participant
check_var HOST "$host" host
check_var ORG "$org" org
previous=$(latest_kit_root)
configs=$REPO/site_configs/site_$site
yaml_inventory=false
[[ $INVENTORY == *.yml || $INVENTORY == *.yaml ]] && yaml_inventory=true
if $yaml_inventory && [[ -z $host ]]; then
  die "INVENTORY $INVENTORY lists hosts by address: give the new site's, make add-site SITE=$site ORG=$org HOST=<address>"
fi
# 1. project.yml (checked against the file first: nothing is written on bad input), then the inventory.
stage=$(mktemp -d -t hcls-add-site.XXXXXX)
trap 'rm -rf "$stage"' EXIT
cp -p "$PROJECT_YML" "$stage/project.yml"
python -m ops.project_file add-site "$stage/project.yml" "$site" "$org" || exit 1
if $yaml_inventory; then
  cp -p "$INVENTORY" "$stage/inventory.yml"
  python -m ops.project_file add-host "$stage/inventory.yml" "$site" "$host" || exit 1
fi
cp -p "$PROJECT_YML" "$stage/project.yml.before"
cp "$stage/project.yml" "$PROJECT_YML"
restore() { cp "$stage/project.yml.before" "$PROJECT_YML"; die "$1 (provision/project.yml restored)"; }
# 2. The site's configuration: the hospital's operator edits data_root, datasets and gpu_ids.
if [[ ! -f $configs/local_config.json ]]; then
  mkdir -p "$configs"
  jq -n '{
    data_root: "/data/hcls",
    datasets: {cxr_classification: "chexpert", ct_segmentation: "ct_multiorgan", lung_nodule_detection: "luna16"},
    resources: {num_of_gpus: 0, mem_per_gpu_in_GiB: 0},
    gpu_ids: [],
    privacy: {scope: "hospital_policy", min_dataset_size: 50,
              blocked_data_fields: ["PatientName", "PatientID", "PatientBirthDate"],
              differential_privacy: {enabled: false, mechanism: "gaussian", epsilon: 8, delta: 1e-05, max_grad_norm: 1}}
  }' >"$configs/local_config.json"
  echo "scaffolded $configs/local_config.json: EDIT data_root, datasets and gpu_ids for $site's host"
fi
# 3. A new kit set from the same root CA; every participant but SITE keeps the previous set's kit.
provision_like "$previous" "$site" || restore "provisioning $site failed"
kits=$(latest_kit_root)
[[ -d $kits/$site/startup ]] || restore "provisioning wrote no kit for $site"
keep_kits "$previous" "$kits" "$site"
echo "kit of $site: $kits/$site (root CA $(openssl x509 -in "$kits/$site/startup/rootCA.pem" -noout -fingerprint -sha256 | cut -d= -f2))"
$yaml_inventory && cp "$stage/inventory.yml" "$INVENTORY" && echo "$INVENTORY: $site at $host"
# 4. Only SITE: its host key, then its deploy.
"$REPO/scripts/trust_hosts.sh" "$site"
"$REPO/scripts/deploy.sh" "$site"
echo "$site added. Jobs built from now on count it; each site approves them again (make approve JOB=...)."
