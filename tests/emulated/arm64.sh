#!/usr/bin/env bash
# The whole stack on an emulated arm64 Debian: deploy/install.sh, the numba
# warm-up and 20 frames of an images: source through the aarch64 numpy, OpenCV
# and numba wheels that a Raspberry Pi OS of the same release gets.
#
#   sudo tests/emulated/arm64.sh [bookworm|trixie]      (make test-emulated)
#
# Needs root, debootstrap and the network (Debian's mirror and PyPI). The
# static aarch64 emulator is qemu-user-static's: the installed one if there is
# one, else the package's .deb unpacked into the cache (not installed, so a
# machine's qemu-user-binfmt stays as it is). Without a registered aarch64
# binfmt_misc handler that opens its emulator at registration ('F'), this
# registers one, which the kernel keeps until reboot.
#
# The cache (XNORCAM_EMULATED_CACHE, default .emulated/ in the clone, ignored
# by git) holds the debootstrapped root, apt's and pip's downloads; each run
# copies the root afresh, so install.sh always meets a system it has never
# seen, and a second run needs no debootstrap and no downloads.
#
# What cannot exist in a chroot is left out, and only that: picamera2 (not in
# Debian; install.sh --no-camera), the camera itself (the images: source) and
# systemd as PID 1 (systemctl works offline on the unit files and ignores
# daemon-reload and restart offline; install.sh --no-start).
set -euo pipefail

SUITE=${1:-bookworm}
case $SUITE in
    bookworm | trixie) ;;
    *)
        echo "usage: $0 [bookworm|trixie]" >&2
        exit 2
        ;;
esac
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${XNORCAM_EMULATED_CACHE:-$REPO/.emulated}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
FRAMES=20
BASE=$CACHE/$SUITE-base
ROOT=$CACHE/$SUITE-run
# What the base root gets beyond minbase: a Raspberry Pi OS image has these.
INCLUDE=ca-certificates,systemd,python3

say() { printf '==> %s\n' "$*"; }
die() {
    printf 'test-emulated: %s\n' "$*" >&2
    exit 1
}

((EUID == 0)) || die "needs root (debootstrap, chroot, binfmt_misc): sudo $0 $*"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
mkdir -p "$CACHE"

qemu_static() {
    local q
    q=$(command -v qemu-aarch64-static || true)
    if [[ -n $q ]]; then
        printf '%s\n' "$q"
        return
    fi
    q=$CACHE/qemu/usr/bin/qemu-aarch64-static
    if [[ ! -x $q ]]; then
        say "unpacking qemu-user-static's .deb into $CACHE/qemu (not installing it)" >&2
        rm -rf "$CACHE/qemu" "$CACHE/qemu-deb"
        mkdir -p "$CACHE/qemu-deb"
        (cd "$CACHE/qemu-deb" && apt-get download qemu-user-static >&2) ||
            die "apt-get download qemu-user-static failed"
        dpkg-deb -x "$CACHE"/qemu-deb/qemu-user-static_*.deb "$CACHE/qemu"
        rm -rf "$CACHE/qemu-deb"
    fi
    printf '%s\n' "$q"
}

# An aarch64 handler that works inside a chroot: enabled, with the 'F' flag
# (the emulator opened now, so the chroot needs no copy of it).
ensure_binfmt() {
    local dir=/proc/sys/fs/binfmt_misc entry q
    if [[ ! -e $dir/register ]]; then
        mount -t binfmt_misc binfmt_misc "$dir" || die "cannot mount binfmt_misc on $dir"
    fi
    for entry in "$dir"/*; do
        [[ -f $entry && $entry != */register && $entry != */status ]] || continue
        if grep -qx enabled "$entry" && grep -q '^magic 7f454c460201010000000000000000000200b700' "$entry" &&
            grep -q '^flags:.*F' "$entry"; then
            say "binfmt_misc: aarch64 through $(sed -n 's/^interpreter //p' "$entry") ($(basename "$entry"))"
            return
        fi
    done
    q=$(qemu_static)
    say "binfmt_misc: registering xnorcam-aarch64 -> $q (flags OCF)"
    printf '%s\n' ":xnorcam-aarch64:M::\\x7fELF\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:$q:OCF" \
        >"$dir/register" || die "cannot register the aarch64 handler in $dir/register"
}

MOUNTS=()
unmount_all() {
    local i
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -l "${MOUNTS[i]}" 2>/dev/null || true
    done
    MOUNTS=()
}
trap unmount_all EXIT

bind() {
    mkdir -p "$1" "$2"
    mount --bind "$1" "$2"
    MOUNTS+=("$2")
}

build_base() {
    if [[ -f $BASE/.xnorcam-base-ok ]]; then
        say "base root: $BASE (cached)"
        return
    fi
    say "debootstrap $SUITE arm64 into $BASE (minutes under emulation)"
    rm -rf "$BASE"
    mkdir -p "$CACHE/$SUITE-debs"
    debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" \
        --cache-dir="$CACHE/$SUITE-debs" "$SUITE" "$BASE" "$MIRROR"
    touch "$BASE/.xnorcam-base-ok"
}

# Mounts left under the run root by a run that was killed before its trap ran.
mounts_under_root() {
    awk -v r="$ROOT" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}

fresh_root() {
    local m
    say "fresh copy of the base root: $ROOT"
    while read -r m; do
        umount -l "$m"
    done < <(mounts_under_root)
    # Never delete through a bind mount (/dev, the caches).
    [[ -z $(mounts_under_root) ]] || die "cannot unmount what is mounted under $ROOT: $(mounts_under_root)"
    rm -rf --one-file-system "$ROOT"
    cp -a "$BASE" "$ROOT"
    rm -f "$ROOT/.xnorcam-base-ok"
    cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # This machine's trust store for pip, in case it reaches PyPI through a proxy with its own CA.
    if [[ -r /etc/ssl/certs/ca-certificates.crt ]]; then
        cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/host-ca-certificates.crt"
    fi
    mount -t proc proc "$ROOT/proc"
    MOUNTS+=("$ROOT/proc")
    bind /dev "$ROOT/dev"
    # A bind of /dev leaves out the mounts under it: without the tmpfs on /dev/shm, numba's threading layer
    # (detector.threads > 1) cannot make its semaphore there and warns at every start, which a Pi never does.
    bind /dev/shm "$ROOT/dev/shm"
    bind "$CACHE/$SUITE-apt" "$ROOT/var/cache/apt/archives"
    bind "$CACHE/pip" "$ROOT/root/.cache/pip"
    say "copying the project (tracked and untracked, not ignored) to /root/xnorcam-src"
    mkdir -p "$ROOT/root/xnorcam-src"
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
        tar -C "$REPO" --null -T - -cf - | tar -C "$ROOT/root/xnorcam-src" -xf -
}

# SYSTEMD_OFFLINE=1: systemctl edits the unit files (enable) and skips what needs
# a running systemd (daemon-reload, restart) instead of failing for want of one.
in_root() {
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 SYSTEMD_OFFLINE=1 "$@"
}

# As the service runs: its user, its cache, its working directory.
as_service() {
    in_root runuser -u xnorcam -- env -C /opt/xnorcam/app NUMBA_CACHE_DIR=/var/cache/xnorcam/numba \
        PYTHONDONTWRITEBYTECODE=1 "$@"
}

ensure_binfmt
build_base
fresh_root

say "deploy/install.sh --no-camera --no-start"
pip_cert=()
[[ -f $ROOT/etc/ssl/host-ca-certificates.crt ]] && pip_cert=(PIP_CERT=/etc/ssl/host-ca-certificates.crt)
in_root env XNORCAM_SKIP_PI_CHECK=1 "${pip_cert[@]}" bash /root/xnorcam-src/deploy/install.sh --no-camera --no-start

# Peak RSS of a command in the root, as the kernel counts it for the emulator
# process (the guest's memory plus the emulator's own; see docs/memory.md).
PEAK='import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"peak RSS {sys.argv[1]}: {peak:.1f} MiB (under emulation)", file=sys.stderr)
sys.exit(rc)'

say "versions in the venv"
as_service /opt/xnorcam/venv/bin/python -c 'import platform, cv2, llvmlite, numba, numpy
print("machine", platform.machine(), "python", platform.python_version(), "numpy", numpy.__version__,
      "opencv", cv2.__version__, "numba", numba.__version__, "llvmlite", llvmlite.__version__)'

# The app's stderr is shown and kept: a Python warning there (numba's, numpy's) would land in the
# journal of every start on a Pi, so it fails the run.
no_warnings() {
    cat "$1" >&2
    if grep -n 'Warning' "$1" >&2; then
        die "$2 printed a warning (above)"
    fi
}

say "python -m app --warmup-only (the cache install.sh filled)"
as_service python3 -c "$PEAK" warmup-only /opt/xnorcam/venv/bin/python -m app --warmup-only \
    --config /etc/xnorcam/config.toml 2>"$CACHE/$SUITE-warmup.err" ||
    { cat "$CACHE/$SUITE-warmup.err" >&2; die "python -m app --warmup-only failed"; }
no_warnings "$CACHE/$SUITE-warmup.err" "python -m app --warmup-only"

say "$FRAMES frames of images: through the installed app"
images=/opt/xnorcam/app/app/assets/demo
args=(--source "images:$images" --loop --fps 0 --max-frames "$FRAMES" --preview none --no-tracks --log -)
arm_out=$CACHE/$SUITE-frames.jsonl
host_out=$CACHE/host-frames.jsonl
as_service python3 -c "$PEAK" "$FRAMES-frames" /opt/xnorcam/venv/bin/python -m app \
    --config /etc/xnorcam/config.toml "${args[@]}" >"$arm_out" 2>"$CACHE/$SUITE-frames.err" ||
    { cat "$CACHE/$SUITE-frames.err" >&2; die "the $FRAMES-frame run failed"; }
no_warnings "$CACHE/$SUITE-frames.err" "the $FRAMES-frame run"
HOST_PY=${XNORCAM_HOST_PYTHON:-$REPO/.venv/bin/python}
n_images=$(find "$ROOT$images" -maxdepth 1 -type f -iname '*.jpg' | wc -l)
host_args=(--source "images:$REPO/app/assets/demo" "${args[@]:2}")
(cd "$REPO" && "$HOST_PY" -m app "${host_args[@]}" >"$host_out" 2>/dev/null) ||
    die "the same run on this machine failed: $HOST_PY -m app ${host_args[*]}"
"$HOST_PY" "$REPO/tests/emulated/check_frames.py" "$arm_out" "$host_out" "$n_images" "$FRAMES"
say "$SUITE arm64: passed"
