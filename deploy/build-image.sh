#!/usr/bin/env bash
# Builds pushgw's image with podman where no image registry is reachable: first a base image made from Debian
# packages (debootstrap, then `podman import`), then the Containerfile on top of it. Prints the image's size
# and the time each step took. Safe to run again: the base is built once and reused.
#
#   bash deploy/build-image.sh            # -> localhost/pushgw:<version>
#   IMAGE=registry.example/pushgw:1 bash deploy/build-image.sh
#
# With a registry at hand, `podman build -t pushgw .` on the official python slim image is all it takes.
# Needs root (debootstrap) and Debian's podman and debootstrap packages (installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${SUITE:-bookworm}
BASE=${BASE:-localhost/pushgw-base:$SUITE}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${IMAGE:-localhost/pushgw:$VERSION}
SOURCE=${SOURCE:-$(git remote get-url origin 2>/dev/null || true)}
REVISION=${REVISION:-$(git rev-parse HEAD 2>/dev/null || true)}
# The Debian mirror this machine's apt already uses (so no other host is named or reached).
MIRROR=${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
MIRROR=${MIRROR:-$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)}

step() { printf '==> %s\n' "$*"; }
seconds() { echo $(( $(date +%s) - $1 )); }

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "missing ${need[*]}: apt-get install ${need[*]}" >&2; exit 1; }
  step "installing Debian packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! podman image exists "$BASE"; then
  [ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 1; }
  [ -n "$MIRROR" ] || { echo "no Debian mirror found in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }
  started=$(date +%s)
  root=$(mktemp -d /var/tmp/pushgw-base.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  # minbase: dpkg, apt and the essential set; python3-venv brings ensurepip for the build stage's virtualenv.
  step "debootstrap $SUITE (minbase + python3) into $root"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR" >/dev/null
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  step "podman import -> $BASE"
  tar -C "$root" -c . | podman import --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
  echo "base image built in $(seconds "$started") s"
fi

started=$(date +%s)
# chroot isolation: a RUN step needs no cgroup controller of its own (this kind of machine cannot give
# containers one; see README "Deployment", what was verified).
step "podman build -> $IMAGE (base $BASE)"
# The host's CA bundle goes to the build stage's pip (a TLS-inspecting proxy between here and PyPI), not into the image.
ca=()
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$HOST_CA" ]; then ca=(-v "$HOST_CA:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt); fi
podman build --isolation chroot --format docker "${ca[@]}" --build-arg BASE="$BASE" --build-arg VERSION="$VERSION" \
  --build-arg SOURCE="$SOURCE" --build-arg REVISION="$REVISION" -t "$IMAGE" -f Containerfile .
echo "image built in $(seconds "$started") s"
podman image inspect --format 'size: {{.Size}} bytes  user: {{.Config.User}}  stop signal: {{.Config.StopSignal}}' "$IMAGE"
podman image inspect --format 'base size: {{.Size}} bytes' "$BASE"
