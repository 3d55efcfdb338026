#!/usr/bin/env bash
# Install what the project needs: Debian tools and the pinned project venv.
# Idempotent; `make` runs it whenever requirements.txt, requirements-coordinator.txt or constraints.txt is newer than
# the venv.
source "$(dirname "$0")/common.sh"

# openssh-server, iproute2: the SSH test hosts of tests/deploy; docker-compose: compose files of the container runtime;
# docker.io, debootstrap: the air-gapped image build and the container tests (scripts/docker_engine.sh starts dockerd).
apt_packages=(jq yq openssl openssh-server iproute2 nftables libcap2-bin docker-compose docker.io debootstrap)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if (( ${#missing[@]} )); then
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "creating $VENV"
  python3 -m venv "$VENV"
fi
echo "installing requirements.txt and requirements-coordinator.txt into $VENV, as constraints.txt pins them (first time: a few minutes)"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -r "$REPO/requirements.txt" -r "$REPO/requirements-coordinator.txt" -c "$REPO/constraints.txt"
"$VENV/bin/pip" check
touch "$VENV/.installed"
