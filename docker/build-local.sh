#!/usr/bin/env bash
# Builds the nbpy image with podman from binaries built on this machine,
# without pulling anything: FROM scratch plus a root filesystem assembled
# here (the nbpy binaries, exactly the shared libraries `ldd` says they need,
# /etc/passwd with the non-root user). Same layout, user, HEALTHCHECK and
# default command as docker/Dockerfile.
#
#   docker/build-local.sh [--profile release|debug] [--tag NAME] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
tag=localhost/nbpy:latest
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "usage: $0 [--profile release|debug] [--tag NAME] [--no-build]" >&2; exit 64 ;;
  esac
done
case "$profile" in
  release) cargo_profile=release ;;
  debug) cargo_profile=dev ;;
  *) echo "--profile: release or debug" >&2; exit 64 ;;
esac
command -v podman >/dev/null || { echo "podman is not installed (apt-get install podman)" >&2; exit 69; }

if [ "$build" = 1 ]; then
  cargo build --locked --profile "$cargo_profile" --bins
fi
bindir=target/$profile

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/var/lib/nbpy" "$root/etc/nbpy" \
  "$root/etc/grafana/provisioning"
chmod 1777 "$root/tmp"

bins=()
for f in "$bindir"/nbpy*; do
  # The executables only (not nbpy.d dependency files).
  if [ -f "$f" ] && [ -x "$f" ] && [[ "$(basename "$f")" != *.* ]]; then
    bins+=("$f")
  fi
done
[ ${#bins[@]} -gt 0 ] || { echo "no nbpy binaries in $bindir" >&2; exit 66; }
for f in "${bins[@]}"; do
  # Debug info is for the build host; the image gets the code only.
  objcopy --strip-debug "$f" "$root/usr/local/bin/$(basename "$f")"
  # Every library the dynamic loader will open, at the path it will look.
  ldd "$f" | grep -oE '/[^ ]+' | while read -r lib; do
    cp --parents -nL "$lib" "$root/"
  done
done

cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
nbpy:x:10001:10001:nbpy:/var/lib/nbpy:/usr/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
nbpy:x:10001:
GROUP
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"

cp docker/Containerfile.local "$ctx/"
# docker format: OCI image configs have no HEALTHCHECK.
podman build --format docker -f "$ctx/Containerfile.local" -t "$tag" "$ctx"
echo "built $tag from ${#bins[@]} binaries in $bindir; smoke test (non-root):"
if ! podman run --rm "$tag" nbpy --version; then
  # Hosts with hybrid cgroups and without CAP_SYS_RESOURCE: crun refuses
  # them and the default rlimits cannot be raised; runc with lower ones works.
  echo "podman run failed; retrying with runc and lower rlimits" >&2
  podman --runtime runc run --rm --ulimit nofile=1024:4096 --ulimit nproc=1000:1000 \
    "$tag" nbpy --version
fi
