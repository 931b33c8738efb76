#!/bin/sh
# The base image of echod's container: a minimal Debian 12 made here from
# Debian's own packages (mmdebstrap --variant=minbase, the host's apt sources),
# imported into podman. No container registry is needed or reached.
#
# Prints the base image's name (localhost/echod-base:bookworm-KEY) on stdout;
# everything else goes to stderr. Cheap when nothing changed: the image is
# reused if podman has it, and the rootfs tarball is kept in $CACHE_DIR
# (default /var/cache/echod-image) so a machine whose podman storage is new,
# as a CI run's may be, imports it again in seconds instead of a minute of
# mmdebstrap. KEY hashes every input, so a change rebuilds. The archive's
# own updates (point releases, security) are not an input: to take them,
# remove the tarball and the image (podman rmi localhost/echod-base:...).
#
# Environment: ECHOD_IMAGE_CACHE (the cache directory), ECHOD_APT_SOURCES (a
# deb822 .sources or one-line .list file; default: the host's Debian sources).
set -eu

SUITE=bookworm
# Bumped when what this script puts in the rootfs changes in a way the other
# inputs do not show.
FORMAT=3
CACHE_DIR=${ECHOD_IMAGE_CACHE:-/var/cache/echod-image}
here=$(cd "$(dirname "$0")" && pwd)
control=$here/../debian/control

sources=${ECHOD_APT_SOURCES:-}
if [ -z "$sources" ]; then
    for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$candidate" ]; then sources=$candidate; break; fi
    done
fi
[ -n "$sources" ] && [ -s "$sources" ] || { echo "base-rootfs: no apt sources found (set ECHOD_APT_SOURCES)" >&2; exit 1; }

# python3 and the package's runtime dependencies (debian/control's Depends),
# so that installing the .deb in the image build downloads nothing.
depends=$(awk '/^Package: echod$/ {p = 1} p && /^Depends:/ {d = 1} d && /^[A-Z]/ && !/^Depends:/ {d = 0} d' "$control" \
    | grep -oE 'python3-[a-z0-9.+-]+' | sort -u | tr '\n' ',')
include=python3,${depends%,}

key=$( { echo "$FORMAT $SUITE $include"; cat "$sources"; } | sha256sum | cut -c1-12)
image=localhost/echod-base:$SUITE-$key

if podman image exists "$image"; then
    echo "$image"
    exit 0
fi

mkdir -p "$CACHE_DIR"
tarball=$CACHE_DIR/rootfs-$SUITE-$key.tar
# One builder at a time per cache (two CI runs, or make image twice).
exec 9>"$CACHE_DIR/.lock"
flock 9
if [ ! -s "$tarball" ]; then
    echo "base-rootfs: mmdebstrap $SUITE ($include) into $tarball (about a minute)" >&2
    # No documentation, manuals or translations, in the base nor in what the
    # image build installs on it (dpkg keeps the setting): a container has no
    # use for them. The copyright files stay.
    # Merged /usr the way debootstrap makes it (the hook installs usr-is-merged):
    # otherwise bookworm's init-system-helpers pulls in usrmerge, and with it
    # the whole of perl (45 MB).
    mmdebstrap --quiet --variant=minbase --include="$include" --format=tar \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        "$SUITE" "$tarball.new" "$sources" >"$CACHE_DIR/mmdebstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE_DIR/mmdebstrap.log" >&2; rm -f "$tarball.new"; exit 1; }
    mv "$tarball.new" "$tarball"
fi
# Drop the tarballs of other keys: one rootfs is about 180 MB.
find "$CACHE_DIR" -maxdepth 1 -name 'rootfs-*.tar' ! -name "rootfs-$SUITE-$key.tar" -delete
# An imported tarball has no configuration at all: give it the usual PATH.
podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/sh"]' \
    "$tarball" "$image" >/dev/null
echo "$image"
