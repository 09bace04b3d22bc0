#!/usr/bin/env bash
# Make a local Debian 12 base image for the image test, where no registry can be reached:
# debootstrap a minimal rootfs with python3.11 (the same minor version as the python:3.11 base
# the real build uses), pack it, and import it into buildah's storage as one layer.
#
#   docker/local_base.sh WORKDIR IMAGE_NAME [MIRROR]
#
# Needs root, debootstrap and buildah. BUILDAH_OPTS (e.g. "--root X --runroot Y --storage-driver vfs")
# is passed to every buildah call.
set -euo pipefail
workdir=${1:?usage: local_base.sh WORKDIR IMAGE_NAME [MIRROR]}
image=${2:?usage: local_base.sh WORKDIR IMAGE_NAME [MIRROR]}
mirror=${3:-http://deb.debian.org/debian}
read -r -a buildah_opts <<<"${BUILDAH_OPTS:-}"

mkdir -p "$workdir"
workdir=$(cd "$workdir" && pwd)
rootfs="$workdir/rootfs"
tarball="$workdir/rootfs.tar"
if [ ! -f "$tarball" ]; then
  rm -rf "$rootfs"
  # python3-venv brings ensurepip (the image creates its virtual environment with it);
  # ca-certificates lets the converter download hf:// and https:// checkpoints; libpython3.11-dev is
  # Python.h, which the python:3.11 image has too (Triton compiles its launcher against it).
  debootstrap --variant=minbase --include=python3,python3-venv,libpython3.11-dev,ca-certificates \
    bookworm "$rootfs" "$mirror"
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" --numeric-owner -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
  rm -rf "$rootfs"
fi
container=$(buildah "${buildah_opts[@]}" from scratch)
buildah "${buildah_opts[@]}" add "$container" "$tarball" /
buildah "${buildah_opts[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd /bin/bash "$container"
buildah "${buildah_opts[@]}" commit --rm "$container" "$image"
