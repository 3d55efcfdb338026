#!/usr/bin/env bash
# The single-node container stack (make compose-prepare): scripts/compose_prepare.sh [down]
#  1. Every server and client of provision/project.yml becomes a compose service on this machine, deployed
#     by ansible/deploy.yml (the playbook of `make deploy`) over ansible/inventories/compose/hosts.sh:
#     the role flare_participant validates, lays out workspace/compose/<participant>/ (kit, local/ rendered
#     from site_configs/, compose.yml, flarectl.sh), creates the Docker network, starts each participant
#     and waits until the server listens and every site has registered. Sites and admin reach the server
#     on that network by its participant name, so the kits must dial it: make provision SERVER_HOST=<it>.
#     Each site's data: workspace/data/<site> (make data), or <SITE>_DATA=<dir> (HOSPITAL_A_DATA=...).
#  2. The console, docker/docker-compose.console.yml (project flare-console): flare-admin with the project
#     admin's kit (workspace/compose/admin) and the built job folders (workspace/jobs, read-only), and
#     flare-tensorboard over the server's TensorBoard events only (workspace/compose/<server>/tensorboard, read-only:
#     no key, nothing else of the server's workspace), published on 127.0.0.1:6006 (TENSORBOARD_BIND=<address> and
#     TENSORBOARD_PORT=<port> change it; 0.0.0.0 opens it to the network without authentication); settings in
#     workspace/compose/console.env.
# Re-running changes nothing that is up to date (Ansible reports changed=0; a changed kit or site
# configuration restarts only that participant); job runs and the server's job storage stay.
# down: stops the console and every participant (docker-compose down) and removes their network when
# nothing else uses it; workspaces and data stay.
# Day-2 operations: make status|logs|stop|deploy INVENTORY=ansible/inventories/compose/hosts.sh [SITE=...].
# A Docker engine must answer (DOCKER_HOST; scripts/docker_engine.sh start runs a private one).
source "$(dirname "$0")/common.sh"
export INVENTORY=$REPO/ansible/inventories/compose/hosts.sh
out=$WORK/compose
console=(docker-compose -p flare-console --env-file "$out/console.env" -f "$REPO/docker/docker-compose.console.yml")

tb_bind=${TENSORBOARD_BIND:-127.0.0.1} tb_port=${TENSORBOARD_PORT:-6006}
[[ $tb_bind =~ ^[0-9A-Fa-f.:]+$ ]] || die "TENSORBOARD_BIND='$(shown "$tb_bind")' is not an IP address (default 127.0.0.1)"
if ! [[ $tb_port =~ ^[1-9][0-9]{0,4}$ ]] || (( tb_port > 65535 )); then
  die "TENSORBOARD_PORT='$(shown "$tb_port")' is not a port: 1-65535 (default 6006)"
fi

docker info >/dev/null 2>&1 || die "no Docker engine answers ('docker info'): scripts/docker_engine.sh start starts a" \
  "private one (then export DOCKER_HOST=unix:///run/hcls-docker/docker.sock)"

case ${1:-} in
  down)
    if [[ -f $out/console.env ]]; then "${console[@]}" down --timeout 20; fi
    "$REPO/scripts/control.sh" stop
    network=$(sed -n 's/^FLARE_NETWORK=//p' "$out/console.env" 2>/dev/null) || true
    if [[ -n $network ]]; then docker network rm "$network" >/dev/null 2>&1 || true; fi   # when nothing else uses it
    exit ;;
  "") ;;
  *) die "usage: $0 [down]" ;;
esac

kits=$(latest_kit_root)
server=$(project_yml '.participants[] | select(.type == "server") | .name')
admin_kit=$kits/$(admin_name)
dials=$(jq -r '.servers[0].service.target // .admin.host' "$admin_kit/startup/fed_admin.json" | cut -d: -f1)
[[ $dials == "$server" ]] || die "$admin_kit dials '$dials', but in the compose stack the server is reachable as" \
  "'$server': provision with 'make provision SERVER_HOST=$server'"

# 1. The participants, by the role (its validation also checks every site's kit and data).
"$REPO/scripts/deploy.sh"

# 2. The console, as the owner of the server's workspace, on the participants' network.
server_ws=$out/$server
uid=$(stat -c %u "$server_ws") gid=$(stat -c %g "$server_ws")
image=$(yq -r '.services[].image' "$server_ws/compose.yml")
network=$(yq -r '(.networks // {})[].name' "$server_ws/compose.yml")
[[ -n $network && $network != null ]] || die "$server_ws/compose.yml joins no Docker network: the compose inventory" \
  "must set flare_participant_compose_network"
mkdir -p "$out/admin" "$WORK/jobs" "$server_ws/tensorboard"   # the server links its runs' events there
chown "$uid:$gid" "$server_ws/tensorboard"
cp -a "$admin_kit/." "$out/admin/"
chown -R "$uid:$gid" "$out/admin"
cat >"$out/console.env" <<EOF
FLARE_IMAGE=$image
FLARE_NETWORK=$network
FLARE_UID=$uid
FLARE_GID=$gid
FLARE_ADMIN_KIT=$out/admin
FLARE_JOBS=$WORK/jobs
FLARE_TENSORBOARD_EVENTS=$server_ws/tensorboard
EOF
"${console[@]}" config -q 2>"$out/console.err" || die "docker/docker-compose.console.yml is invalid: $(cat "$out/console.err")"
"${console[@]}" up -d 2>"$out/console.err" || die "starting the console failed: $(cat "$out/console.err")"
echo "compose stack up on network $network: participants in $out/<participant>, console containers flare-admin" \
  "and flare-tensorboard (http://$tb_bind:$tb_port, over $server_ws/tensorboard)"
echo "  docker exec -it flare-admin bash startup/fl_admin.sh    # job folders in /jobs (scripts/build_job.sh)"
echo "  make status INVENTORY=$INVENTORY"
