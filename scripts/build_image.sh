#!/usr/bin/env bash
# Build the participant image (docker/Dockerfile): scripts/build_image.sh production|airgapped
# (`scripts/build_image.sh tag` prints the image's name).
#   production: FROM $BASE_IMAGE (default in the Dockerfile: NVIDIA's PyTorch image); pip reads the index.
#   airgapped:  no registry at all. The base is a Debian root filesystem made by debootstrap from
#               $DEBIAN_MIRROR and imported; pip installs only from a local wheelhouse that
#               `pip download` filled from requirements.txt (both are the only network use, and both
#               can point at a hospital's own mirror).
# Environment: FLARE_IMAGE (tag; default hcls-flare:<nvflare version>), BASE_IMAGE, DEBIAN_MIRROR,
#   HCLS_REQUIREMENTS and TORCH_REQUIREMENT (common.sh pinned_requirements: the container tests install a CPU torch).
# An image whose build key (Dockerfile, requirements, base image) is unchanged is not built again.
source "$(dirname "$0")/common.sh"
kind=${1:-}
nvflare_version=$(pinned_requirements | sed -nE 's/^nvflare(\[[^]]*\])?==([^ #]+).*/\2/p')
[[ -n $nvflare_version ]] || die "${HCLS_REQUIREMENTS:-$REPO/requirements.txt}: no nvflare==<version> line"
image=${FLARE_IMAGE:-hcls-flare:$nvflare_version}
if [[ $kind == tag ]]; then echo "$image"; exit; fi   # scripts/build_image.sh tag: the image's name
[[ $kind == production || $kind == airgapped ]] || die "usage: $0 production|airgapped|tag"
docker info >/dev/null 2>&1 || die "no Docker engine answers ('docker info'); scripts/docker_engine.sh start starts one"
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The air-gapped base's packages (nftables: the job user's egress rule, docker/Dockerfile); the tag names them.
DEBIAN_PACKAGES=python3,python3-venv,procps,nftables
DEBIAN_BASE=hcls-debian-base:bookworm-$(sha256sum <<<"$DEBIAN_PACKAGES" | cut -c1-8)
build=$WORK/image
context=$build/context

# Import a Debian root filesystem as the base image, unless it is there already.
debian_base() {
  docker image inspect "$DEBIAN_BASE" >/dev/null 2>&1 && return
  command -v debootstrap >/dev/null || die "debootstrap not found: run scripts/setup.sh"
  (( EUID == 0 )) || die "debootstrap needs root"
  local rootfs=$build/rootfs
  rm -rf "$rootfs"
  echo "debootstrap bookworm from $DEBIAN_MIRROR"
  debootstrap --variant=minbase --include="$DEBIAN_PACKAGES" bookworm "$rootfs" "$DEBIAN_MIRROR" \
    >"$build/debootstrap.log" 2>&1 || die "debootstrap from $DEBIAN_MIRROR failed, see $build/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import -c 'CMD ["bash"]' - "$DEBIAN_BASE" >/dev/null
  rm -rf "$rootfs"
}

mkdir -p "$build"
rm -rf "$context"
mkdir -p "$context/wheelhouse"
pinned_requirements >"$context/requirements.txt"
build_args=()
if [[ $kind == airgapped ]]; then
  debian_base
  build_args+=(--build-arg "BASE_IMAGE=$DEBIAN_BASE")
  base_id=$(docker image inspect -f '{{.Id}}' "$DEBIAN_BASE")
else
  [[ -n ${BASE_IMAGE:-} ]] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  base_id=${BASE_IMAGE:-default}
fi
key=$(cat "$REPO/docker/Dockerfile" "$context/requirements.txt" <(echo "$kind $base_id") | sha256sum | cut -c1-16)
if [[ $(docker image inspect -f '{{index .Config.Labels "hcls.build-key"}}' "$image" 2>/dev/null) == "$key" ]]; then
  echo "image $image is up to date (build key $key)"
  exit 0
fi

if [[ $kind == airgapped ]]; then
  python=$(docker run --rm --network none "$DEBIAN_BASE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $python == "$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ]] \
    || die "the base image has Python $python but $VENV has $(python --version): the wheelhouse would not fit"
  echo "filling the wheelhouse $WHEELHOUSE from $context/requirements.txt"
  fill_wheels "$context/requirements.txt" "$context/wheelhouse" "$build/pip.log"
fi

echo "building $image ($kind, build key $key)"
start=$SECONDS
docker build -f "$REPO/docker/Dockerfile" "${build_args[@]}" --label "hcls.build-key=$key" -t "$image" "$context" \
  >"$build/build.log" 2>&1 || die "docker build of $image failed; the end of $build/build.log:
$(tail -n 15 "$build/build.log")"
docker image prune -f --filter "label=hcls.build-key" >/dev/null
echo "built $image in $((SECONDS - start)) s, $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec)"
