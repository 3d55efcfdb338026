#!/usr/bin/env bash
# Prepare the single-node stack docker/docker-compose.flare.yml (make compose-prepare):
#   workspace/compose/<participant>/  kit + local/ rendered with the Ansible role's templates
#   workspace/compose/admin/          the project admin's kit
#   workspace/compose/compose.env     image, workspaces, each site's data (workspace/data/<site>, or
#                                     HOSPITAL_A_DATA=... for real data), job folders, uid, GPUs
# Re-running updates kits and local/ in place: job runs and the server's job storage stay.
# Then: docker compose --env-file workspace/compose/compose.env -f docker/docker-compose.flare.yml up -d
source "$(dirname "$0")/common.sh"
COMPOSE_FILE=$REPO/docker/docker-compose.flare.yml
out=$WORK/compose
kits=$(latest_kit_root)
server=$(project_yml '.participants[] | select(.type == "server") | .name')
clients=$(project_yml '.participants[] | select(.type == "client") | .name')

# Sites and admin reach the server as the compose service named like it.
for p in $clients "$(admin_name)"; do
  f=$kits/$p/startup/fed_client.json
  [[ -f $f ]] || f=$kits/$p/startup/fed_admin.json
  dials=$(jq -r '.servers[0].service.target // .admin.host' "$f" | cut -d: -f1)
  [[ $dials == "$server" ]] || die "$f: $p dials '$dials', but in the compose stack the server is the service" \
    "'$server': provision with 'make provision SERVER_HOST=$server'"
done

# Each site's data on this machine, and its GPUs.
env_lines=()
for site in $clients; do
  var=$(tr 'a-z-' 'A-Z_' <<<"$site")
  name=${var}_DATA
  data=${!name:-$WORK/data/$site}
  [[ -d $data ]] || die "$site: data directory $data does not exist ('make data', or ${var}_DATA=<dir>)"
  gpus=$(jq -r '.gpu_ids // [] | map(tostring) | join(",")' "$REPO/site_configs/site_$site/local_config.json")
  env_lines+=("${var}_DATA=$(cd "$data" && pwd)" "${var}_GPUS=${gpus:-none}")
done

mkdir -p "$out"
(cd "$REPO/docker" && ansible-playbook -i "$(echo $server $clients | tr ' ' ,)," compose_workspaces.yml \
  -e "flare_kit_root=$kits" -e "compose_workspaces=$out") >"$out/prepare.log" \
  || die "rendering the compose workspaces failed; the end of $out/prepare.log:
$(tail -n 20 "$out/prepare.log")"
mkdir -p "$out/admin"
cp -a "$kits/$(admin_name)/." "$out/admin/"
mkdir -p "$WORK/jobs"

# The image's user (uid 2710) owns the workspaces when root prepares them; otherwise the caller does.
if (( EUID == 0 )); then uid=2710 gid=2710; chown -R "$uid:$gid" "$out"; else uid=$(id -u) gid=$(id -g); fi
sites=$(wc -w <<<"$clients")
{
  echo "FLARE_IMAGE=$("$REPO/scripts/build_image.sh" tag)"
  echo "FLARE_WORKSPACES=$out"
  echo "FLARE_JOBS=$WORK/jobs"
  echo "FLARE_UID=$uid"
  echo "FLARE_GID=$gid"
  echo "OMP_NUM_THREADS=$(( $(nproc) > sites ? $(nproc) / sites : 1 ))"   # the sites share this machine's cores
  printf '%s\n' "${env_lines[@]}"
} >"$out/compose.env"

docker-compose --env-file "$out/compose.env" -f "$COMPOSE_FILE" config -q 2>"$out/config.err" \
  || die "$COMPOSE_FILE is invalid: $(cat "$out/config.err")"
echo "compose workspaces in $out; start the stack with:"
echo "  docker network create imaging-network   # once"
echo "  docker compose --env-file $out/compose.env -f $COMPOSE_FILE up -d"
