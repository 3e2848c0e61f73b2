#!/usr/bin/env bash
# Build dsphere's serving images with podman on a machine that can pull no registry image
# (docs/DEPLOYMENT.md, "Building and running without Docker"). Run as root from anywhere:
#
#   deploy/local-image.sh                  # base (cached), cpu, gpu, the Prometheus and Redis stand-ins
#   deploy/local-image.sh cpu              # only the steps named: base | cpu | gpu | prometheus | redis
#                                          # (cpu, gpu, prometheus and redis make the base when it is missing)
#
# base        Debian 12 made with debootstrap from this machine's Debian mirror (python3,
#             python3-venv, python-is-python3, ca-certificates), with this machine's CA bundle
#             copied in so that pip inside reaches PyPI the way the host does; imported as
#             $DSPHERE_BASE_IMAGE (localhost/dsphere-base:bookworm). Made once: later runs reuse
#             it (DSPHERE_REBUILD_BASE=1 makes it again). Needs root (debootstrap).
# cpu         the Dockerfile's `cpu` target, PYTHON_IMAGE=base            -> localhost/dsphere:cpu
# gpu         the `gpu` target                                             -> localhost/dsphere:gpu
#             on the Dockerfile's CUDA image when it is here or can be pulled (or on
#             $DSPHERE_CUDA_IMAGE), else on the base as a stand-in: no CUDA libraries, so the
#             image runs on the CPU provider; its build steps, onnxruntime-gpu install and guards
#             are what it checks. A stand-in carries the label dsphere.cuda-standin=<base>.
# prometheus  docker-compose.yml's Prometheus image when it is here or can be pulled, else a
#             stand-in from Debian's prometheus package (deploy/prometheus-standin.Containerfile)
#             tagged under the same name, so that docker-compose.yml itself runs.
# redis       docker-compose.yml's Redis image (the query history's shared store) when it is here
#             or can be pulled, else a stand-in from Debian's redis-server
#             (deploy/kubernetes/podman/redis-standin.Containerfile) tagged under the same name.
#
# Builds use --network=host (pip and apt inside reach the network as the host does) and
# --format docker (the OCI format drops HEALTHCHECK). Podman settings: CONTAINERS_CONF,
# default deploy/containers.conf (runc, cgroupfs, ulimits a VM without systemd accepts).
set -euo pipefail

cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/containers.conf}"
BASE_IMAGE="${DSPHERE_BASE_IMAGE:-localhost/dsphere-base:bookworm}"
CPU_TAG=localhost/dsphere:cpu
GPU_TAG=localhost/dsphere:gpu
SUITE=bookworm

say() { printf '[local-image] %s\n' "$*"; }
die() { printf '[local-image] error: %s\n' "$*" >&2; exit 1; }

# The value of `ARG NAME=value` in the Dockerfile (the upstream base image names).
dockerfile_arg() { sed -n "s/^ARG $1=//p" Dockerfile | head -n 1; }

# docker-compose.yml's image of one service (`image:` in its block).
compose_image() {
  awk -v svc="  $1:" '$0 == svc {inside = 1; next}
    inside && /^  [^ ]/ {exit}
    inside && $1 == "image:" {print $2; exit}' docker-compose.yml
}

mirror() {
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  # shellcheck disable=SC2016  # $(...) is apt's own format syntax, not the shell's
  uri=$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s {print $1; exit}') || true
  echo "${uri:-http://deb.debian.org/debian/}"
}

size_of() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

# An image that is here, or that a pull brings (quietly; no registry is a normal answer).
have_or_pull() {
  podman image exists "$1" && return 0
  timeout 900 podman pull -q "$1" >/dev/null 2>&1
}

base_done=0
make_base() {
  [[ $base_done == 0 ]] || return 0
  base_done=1
  if podman image exists "$BASE_IMAGE" && [[ "${DSPHERE_REBUILD_BASE:-0}" != 1 ]]; then
    say "base: reusing $BASE_IMAGE ($(size_of "$BASE_IMAGE"))"
    return
  fi
  [[ $(id -u) == 0 ]] || die "making $BASE_IMAGE needs root (debootstrap); run as root, or set DSPHERE_BASE_IMAGE to an existing Debian 12 image with python3.11 and python3-venv"
  command -v debootstrap >/dev/null || die "debootstrap not installed (apt-get install -y debootstrap)"
  [[ -r /etc/ssl/certs/ca-certificates.crt ]] || die "/etc/ssl/certs/ca-certificates.crt missing (apt-get install -y ca-certificates)"
  local root t0 url
  root=$(mktemp -d /var/tmp/dsphere-base.XXXXXX)
  # shellcheck disable=SC2064  # expand now: the path is fixed
  trap "rm -rf '$root'" EXIT
  url=$(mirror)
  t0=$SECONDS
  say "base: debootstrap $SUITE from $url (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$root" "$url" >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; die "debootstrap failed (log above)"; }
  rm -f "$root.log"
  # pip inside must trust what the host trusts (a TLS-inspecting proxy's CA, a private index).
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $SUITE + python3 (deploy/local-image.sh)" \
    --quiet - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  trap - EXIT
  say "base: $BASE_IMAGE made in $((SECONDS - t0)) s ($(size_of "$BASE_IMAGE"))"
}

build() {  # build TARGET TAG [podman build options...]
  local target=$1 tag=$2 t0=$SECONDS
  shift 2
  say "$target: podman build --target $target -t $tag"
  podman build --format docker --network host --target "$target" -t "$tag" \
    --build-arg "PYTHON_IMAGE=$BASE_IMAGE" "$@" -f Dockerfile . \
    || die "$target: podman build failed"
  say "$target: $tag built in $((SECONDS - t0)) s, $(size_of "$tag")"
}

build_cpu() { make_base; build cpu "$CPU_TAG"; }

build_gpu() {
  local cuda="${DSPHERE_CUDA_IMAGE:-$(dockerfile_arg CUDA_IMAGE)}"
  if have_or_pull "$cuda"; then
    build gpu "$GPU_TAG" --build-arg "CUDA_IMAGE=$cuda"
  else
    make_base
    say "gpu: $cuda cannot be pulled here: building on the stand-in base $BASE_IMAGE (no CUDA libraries)"
    build gpu "$GPU_TAG" --build-arg "CUDA_IMAGE=$BASE_IMAGE" --label "dsphere.cuda-standin=$BASE_IMAGE"
  fi
}

# build_standin SERVICE PACKAGE CONTAINERFILE CONTEXT: docker-compose.yml's image of SERVICE when it is
# here or can be pulled, else a stand-in from Debian's PACKAGE tagged under the same name.
build_standin() {
  local service=$1 package=$2 containerfile=$3 context=$4 image t0=$SECONDS
  image=$(compose_image "$service")
  [[ -n "$image" ]] || die "docker-compose.yml: no image for the $service service"
  if have_or_pull "$image"; then
    say "$service: $image is here"
    return
  fi
  make_base
  say "$service: $image cannot be pulled here: stand-in from Debian's $package package"
  podman build --format docker --network host -t "$image" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --label "dsphere.standin-for=$image" -f "$containerfile" "$context" \
    || die "$service: podman build of the stand-in failed"
  say "$service: stand-in $image built in $((SECONDS - t0)) s, $(size_of "$image")"
}

build_prometheus() { build_standin prometheus prometheus deploy/prometheus-standin.Containerfile deploy; }

build_redis() {
  build_standin redis redis-server deploy/kubernetes/podman/redis-standin.Containerfile deploy/kubernetes/podman
}

command -v podman >/dev/null || die "podman not installed (apt-get install -y podman runc)"
steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(base cpu gpu prometheus redis)
for step in "${steps[@]}"; do
  case "$step" in
    base) make_base ;;
    cpu) build_cpu ;;
    gpu) build_gpu ;;
    prometheus) build_prometheus ;;
    redis) build_redis ;;
    *) die "unknown step '$step' (base, cpu, gpu, prometheus, redis)" ;;
  esac
done
