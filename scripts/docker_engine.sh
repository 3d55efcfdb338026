#!/usr/bin/env bash
# A private Docker engine for the air-gapped image build and the container tests, on machines
# without one:   scripts/docker_engine.sh start|stop|status
# start runs Debian's dockerd (scripts/setup.sh installs it; this installs nothing) with its own
# data root, exec root and socket, inside its own network namespace: the engine has no network
# (builds are offline by construction) and the ports the single-node stack publishes (the server's of
# provision/project.yml, TensorBoard's) cannot collide with a federation on this machine. No iptables rules (they would drop namespace traffic).
# nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup mounts dockerd needs.
# Use it with:   export DOCKER_HOST=unix:///run/hcls-docker/docker.sock
# stop stops it (images stay in the data root); nothing else is touched.
# start refuses while another Docker engine has files open in the data root (the SSH test hosts' container
# site runs one on it): two engines must never share a data root.
source "$(dirname "$0")/common.sh"
NETNS=hcls-docker
EXEC_ROOT=/run/$NETNS
SOCKET=$EXEC_ROOT/docker.sock
PIDFILE=$EXEC_ROOT/dockerd.pid
DATA_ROOT=${HCLS_DOCKER_DATA_ROOT:-/var/lib/$NETNS}
LOG=$DATA_ROOT.log
export DOCKER_HOST=unix://$SOCKET

answers() { docker info >/dev/null 2>&1; }

# Another Docker engine (e.g. a test host's, tests/deploy/conftest.py) with files open in DATA_ROOT: two engines
# must never use one data root at the same time. Prints its pid.
other_engine() {
  local pid
  for pid in $(pgrep -x dockerd) $(pgrep -x containerd); do
    if [[ -n $(find "/proc/$pid/fd" -lname "$DATA_ROOT/*" -print -quit 2>/dev/null) ]]; then echo "$pid"; return; fi
  done
}

start() {
  if answers; then echo "docker engine running: DOCKER_HOST=$DOCKER_HOST"; return; fi
  command -v dockerd >/dev/null || die "dockerd not found: run scripts/setup.sh (Debian package docker.io)"
  (( EUID == 0 )) || die "starting dockerd needs root"
  other=$(other_engine)
  [[ -z $other ]] || die "another Docker engine (pid $other) uses the data root $DATA_ROOT: stop it first"
  mkdir -p "$DATA_ROOT" "$EXEC_ROOT"
  ip netns list | grep -qx "$NETNS" || ip netns add "$NETNS" || die "cannot create network namespace $NETNS"
  ip netns exec "$NETNS" ip link set lo up
  nsenter --net="/run/netns/$NETNS" setsid dockerd --host "$DOCKER_HOST" --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" \
    --pidfile "$PIDFILE" --iptables=false >>"$LOG" 2>&1 </dev/null &
  for _ in $(seq 60); do answers && break; sleep 0.5; done
  answers || die "dockerd did not start within 30 s; the end of $LOG:
$(tail -n 5 "$LOG")"
  echo "docker engine started (pid $(cat "$PIDFILE"), data root $DATA_ROOT): DOCKER_HOST=$DOCKER_HOST"
}

stop() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || true
  if [[ -n $pid ]] && kill -TERM "$pid" 2>/dev/null; then
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    echo "docker engine stopped"
  else
    echo "docker engine not running"
  fi
  if ip netns list | grep -qx "$NETNS"; then ip netns delete "$NETNS"; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then echo "docker engine running: DOCKER_HOST=$DOCKER_HOST"; else echo "docker engine not running"; exit 3; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
