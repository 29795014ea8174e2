#!/usr/bin/env bash
# Install xnorcam as a systemd service on Raspberry Pi OS 64-bit (Bookworm or
# Trixie), e.g. on a Pi Zero 2 W. Run from a copy of the project:
#
#   sudo deploy/install.sh               install or upgrade (idempotent)
#   sudo deploy/install.sh --dry-run     print every action, change nothing
#   sudo deploy/install.sh --no-camera   without python3-picamera2 (a Debian
#                                        without Raspberry Pi's packages, as in
#                                        make test-emulated)
#   sudo deploy/install.sh --uninstall   remove service, program and user;
#                                        keep /etc/xnorcam, /var/lib/xnorcam (snapshots,
#                                        recordings) and /var/log/xnorcam
#   sudo deploy/install.sh --uninstall --purge   remove those too
#
# XNORCAM_SKIP_PI_CHECK=1 skips the Raspberry Pi / 64-bit checks (CI uses it
# with --dry-run).
#
# Why these choices:
# - picamera2 exists only as an apt package, so the venv is created with
#   --system-site-packages and numpy is apt's (picamera2 is built against it).
#   pip is constrained to that numpy so it never installs a second one.
# - OpenCV is the pip opencv-python-headless wheel pinned in requirements.txt
#   to fit the system numpy; apt's python3-opencv pulls in a desktop's worth
#   of libraries a headless Zero does not need.
# - --only-binary: building numba or OpenCV from source on a Zero takes hours.
set -euo pipefail
# Everything installed must be readable by the service user, whatever sudo's umask.
umask 022

readonly PREFIX=/opt/xnorcam
readonly APP_DIR=$PREFIX/app
readonly VENV=$PREFIX/venv
readonly CONSTRAINTS=$PREFIX/constraints.txt
readonly CONF_DIR=/etc/xnorcam
readonly CONF=$CONF_DIR/config.toml
readonly UNIT_NAME=xnorcam.service
readonly UNIT_DST=/etc/systemd/system/$UNIT_NAME
# The network for [mqtt]: a drop-in present only while the config turns MQTT on.
readonly MQTT_DROPIN_SRC=systemd/mqtt-network.conf
readonly MQTT_DROPIN=$UNIT_DST.d/mqtt.conf
# The network for the web preview ([web]): a drop-in present only while the config turns it on.
readonly WEB_DROPIN_SRC=systemd/web-network.conf
readonly WEB_DROPIN=$UNIT_DST.d/web.conf
readonly CACHE_DIR=/var/cache/xnorcam
readonly NUMBA_CACHE=$CACHE_DIR/numba
readonly STATE_DIR=/var/lib/xnorcam
readonly LOG_DIR=/var/log/xnorcam
readonly SERVICE_USER=xnorcam
readonly SERVICE_GROUPS=(video render)
readonly APT_PACKAGES=(python3-picamera2 python3-numpy python3-venv)
readonly SYSTEM_PYTHON=/usr/bin/python3

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly SRC

DRY_RUN=0
UNINSTALL=0
PURGE=0
START=1
NO_CAMERA=0

usage() {
    cat <<EOF
usage: $0 [--dry-run] [--no-start] [--no-camera] [--uninstall [--purge]]

  --dry-run     print every action and change nothing
  --no-start    install and enable, but do not (re)start the service now
  --no-camera   leave out python3-picamera2 (not in Debian): files and images only
  --uninstall   stop and remove the service, program, venv, cache and user;
                keeps $CONF_DIR, $STATE_DIR and $LOG_DIR
  --purge       with --uninstall: remove $CONF_DIR, $STATE_DIR and $LOG_DIR as well
Environment: XNORCAM_SKIP_PI_CHECK=1 skips the Raspberry Pi / 64-bit checks.
EOF
}

say() { printf '==> %s\n' "$*"; }

# Arguments as a shell would need them typed, for the action log.
quoted() {
    local arg out=()
    for arg in "$@"; do
        if [[ $arg =~ ^[][A-Za-z0-9_./:=,@%+-]+$ ]]; then
            out+=("$arg")
        else
            out+=("'${arg//\'/\'\\\'\'}'")
        fi
    done
    printf '%s' "${out[*]}"
}
die() {
    printf 'install.sh: error: %s\n' "$*" >&2
    exit 1
}

# Every change to the system goes through run(), so --dry-run shows it all.
run() {
    if ((DRY_RUN)); then
        printf '[dry-run] %s\n' "$(quoted "$@")"
    else
        printf '+ %s\n' "$(quoted "$@")"
        "$@"
    fi
}

parse_args() {
    while (($#)); do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --uninstall) UNINSTALL=1 ;;
            --purge) PURGE=1 ;;
            --no-start) START=0 ;;
            --no-camera) NO_CAMERA=1 ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                usage >&2
                exit 2
                ;;
        esac
        shift
    done
    if ((PURGE && !UNINSTALL)); then
        usage >&2
        exit 2
    fi
}

check_platform() {
    if [[ ${XNORCAM_SKIP_PI_CHECK:-0} == 1 ]]; then
        say "XNORCAM_SKIP_PI_CHECK=1: skipping the Raspberry Pi and 64-bit checks"
        return
    fi
    local model="" arch dpkg_arch=""
    if [[ -r /proc/device-tree/model ]]; then
        model=$(tr -d '\0' </proc/device-tree/model)
    fi
    [[ $model == "Raspberry Pi"* ]] ||
        die "this is not a Raspberry Pi (/proc/device-tree/model: '${model:-absent}'). xnorcam installs on Raspberry Pi OS 64-bit; set XNORCAM_SKIP_PI_CHECK=1 to override."
    arch=$(uname -m)
    if command -v dpkg >/dev/null; then
        dpkg_arch=$(dpkg --print-architecture)
    fi
    [[ $arch == aarch64 && $dpkg_arch == arm64 ]] ||
        die "$model runs a ${dpkg_arch:-non-Debian} userland on a $arch kernel; xnorcam needs Raspberry Pi OS 64-bit (arm64). Reflash with the 64-bit image."
    say "platform: $model, $arch/$dpkg_arch"
}

check_os() {
    local codename=""
    if [[ -r /etc/os-release ]]; then
        # shellcheck source=/dev/null
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    fi
    case $codename in
        bookworm | trixie) say "OS: $codename" ;;
        *) say "warning: tested on Raspberry Pi OS bookworm and trixie, this is '${codename:-unknown}'" ;;
    esac
}

check_root() {
    if ((!DRY_RUN)) && ((EUID != 0)); then
        die "run as root: sudo $0 $*"
    fi
}

missing_apt_packages() {
    local pkg status
    for pkg in "${APT_PACKAGES[@]}"; do
        if ((NO_CAMERA)) && [[ $pkg == python3-picamera2 ]]; then
            continue
        fi
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        if [[ $status != "install ok installed" ]]; then
            printf '%s\n' "$pkg"
        fi
    done
}

install_apt_packages() {
    local missing
    mapfile -t missing < <(missing_apt_packages)
    if ((${#missing[@]} == 0)); then
        say "apt packages already installed: ${APT_PACKAGES[*]}"
        return
    fi
    say "installing apt packages: ${missing[*]}"
    run apt-get update
    # --no-install-recommends: picamera2 recommends Qt and OpenGL, not needed headless.
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

# The system numpy version, which the venv must keep using.
system_numpy() {
    "$SYSTEM_PYTHON" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true
}

system_python_version() {
    "$SYSTEM_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

create_user() {
    local group present=()
    if getent passwd "$SERVICE_USER" >/dev/null; then
        say "user $SERVICE_USER exists"
    else
        run useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "xnorcam camera service" "$SERVICE_USER"
    fi
    for group in "${SERVICE_GROUPS[@]}"; do
        if getent group "$group" >/dev/null; then
            present+=("$group")
        else
            say "warning: group $group does not exist; the unit's SupplementaryGroups= needs it"
        fi
    done
    if ((${#present[@]})); then
        run usermod --append --groups "$(
            IFS=,
            echo "${present[*]}"
        )" "$SERVICE_USER"
    fi
}

copy_project() {
    local staging=$APP_DIR.new
    say "copying the project to $APP_DIR"
    [[ -d $SRC/app ]] || die "$SRC/app is missing: run install.sh from a copy of the xnorcam project"
    if ! compgen -G "$SRC/models/*.xnc" >/dev/null; then
        say "warning: no model file in $SRC/models; the service will refuse to start (exit 65)"
    fi
    run install -d -m 0755 -o root -g root "$PREFIX"
    run rm -rf "$staging"
    run install -d -m 0755 -o root -g root "$staging"
    # Only what runs on the Pi: no tests, training code, caches or venvs.
    run tar -C "$SRC" --exclude=__pycache__ --exclude='*.pyc' -cf "$PREFIX/app.tar" \
        app models requirements.txt README.md LICENSE
    run tar -C "$staging" --no-same-owner -xf "$PREFIX/app.tar"
    run rm -f "$PREFIX/app.tar"
    run chmod -R u=rwX,go=rX "$staging"
    # Swap in the new copy whole, so a failed copy never leaves half an app.
    run rm -rf "$APP_DIR.old"
    if [[ -d $APP_DIR ]]; then
        run mv -T "$APP_DIR" "$APP_DIR.old"
    fi
    run mv -T "$staging" "$APP_DIR"
    run rm -rf "$APP_DIR.old"
    # Bytecode compiled now: the service may not write to /opt, and a Zero
    # would otherwise recompile every module at each start.
    run "$SYSTEM_PYTHON" -m compileall -q "$APP_DIR/app"
}

setup_venv() {
    local pyver numpy_version venv_pyver=""
    pyver=$(system_python_version)
    numpy_version=$(system_numpy)
    if [[ -z $numpy_version ]]; then
        ((DRY_RUN)) || die "$SYSTEM_PYTHON cannot import numpy; is python3-numpy installed?"
        numpy_version="<python3-numpy version>"
    fi
    say "system Python ${pyver:-?}, numpy $numpy_version"
    if [[ -x $VENV/bin/python ]]; then
        venv_pyver=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
    fi
    if [[ -n $venv_pyver && $venv_pyver == "$pyver" ]] && grep -qs 'include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
        say "venv $VENV exists (Python $venv_pyver)"
    else
        # Missing, or left from another Python (e.g. after a Bookworm to Trixie upgrade).
        run rm -rf "$VENV"
        run "$SYSTEM_PYTHON" -m venv --system-site-packages "$VENV"
    fi
    say "writing $CONSTRAINTS: numpy==$numpy_version (the system's)"
    if ((DRY_RUN)); then
        printf '[dry-run] write %s: numpy==%s\n' "$CONSTRAINTS" "$numpy_version"
    else
        printf '# Written by deploy/install.sh: keep the system numpy.\nnumpy==%s\n' "$numpy_version" >"$CONSTRAINTS"
    fi
    # requirements.txt without its numpy pins: the system numpy is the one used.
    local reqs=$PREFIX/requirements-pi.txt
    if ((DRY_RUN)); then
        printf '[dry-run] write %s: %s without its numpy lines\n' "$reqs" "$SRC/requirements.txt"
    else
        grep -Ev '^[[:space:]]*numpy[[:space:]]*(==|;|$)' "$SRC/requirements.txt" >"$reqs"
    fi
    run "$VENV/bin/python" -m pip install --disable-pip-version-check --only-binary=:all: \
        -c "$CONSTRAINTS" -r "$reqs"
}

install_config() {
    run install -d -m 0755 -o root -g root "$CONF_DIR"
    if [[ -e $CONF ]]; then
        say "keeping the existing $CONF"
        return
    fi
    # Readable by the service group only: it may hold paths and stream URLs.
    run install -m 0640 -o root -g "$SERVICE_USER" "$SRC/deploy/config.example.toml" "$CONF"
}

# Whether the config the service will read (the installed one, else the example about to be
# installed) says enabled = true in its [mqtt] table.
mqtt_enabled() {
    local conf=$CONF
    [[ -e $conf ]] || conf=$SRC/deploy/config.example.toml
    [[ -r $conf ]] || return 1
    awk '
        /^[[:space:]]*\[/ { section = $0; gsub(/[[:space:]]|#.*/, "", section); next }
        section == "[mqtt]" && /^[[:space:]]*enabled[[:space:]]*=[[:space:]]*true[[:space:]]*(#.*)?$/ { on = 1 }
        END { exit !on }' "$conf"
}

# Whether the config the service will read (the installed one, else the example about to be
# installed) says enabled = true in its [web] table.
web_enabled() {
    local conf=$CONF
    [[ -e $conf ]] || conf=$SRC/deploy/config.example.toml
    [[ -r $conf ]] || return 1
    awk '
        /^[[:space:]]*\[/ { section = $0; gsub(/[[:space:]]|#.*/, "", section); next }
        section == "[web]" && /^[[:space:]]*enabled[[:space:]]*=[[:space:]]*true[[:space:]]*(#.*)?$/ { on = 1 }
        END { exit !on }' "$conf"
}

install_unit() {
    run install -m 0644 -o root -g root "$SRC/systemd/$UNIT_NAME" "$UNIT_DST"
    if mqtt_enabled; then
        say "[mqtt] is on: the service gets the home network ($MQTT_DROPIN)"
        run install -d -m 0755 -o root -g root "$(dirname "$MQTT_DROPIN")"
        run install -m 0644 -o root -g root "$SRC/$MQTT_DROPIN_SRC" "$MQTT_DROPIN"
    else
        say "[mqtt] is off: no network for MQTT"
        if [[ -e $MQTT_DROPIN ]]; then
            # It was on: take the camera out of Home Assistant (discovery and retained topics) while
            # the broker is still named in the config.
            run runuser -u "$SERVICE_USER" -- env -C "$APP_DIR" PYTHONDONTWRITEBYTECODE=1 \
                "$VENV/bin/python" -m app --config "$CONF" --mqtt-clear ||
                say "warning: could not clear the camera's MQTT topics (see above); delete the device in Home Assistant"
            run rm -f "$MQTT_DROPIN"
        fi
    fi
    if web_enabled; then
        say "[web] is on: the service gets the home network ($WEB_DROPIN)"
        run install -d -m 0755 -o root -g root "$(dirname "$WEB_DROPIN")"
        run install -m 0644 -o root -g root "$SRC/$WEB_DROPIN_SRC" "$WEB_DROPIN"
    else
        say "[web] is off: no web preview"
        run rm -f "$WEB_DROPIN"
    fi
    run systemctl daemon-reload
}

warm_numba_cache() {
    # The first compile takes minutes on a Zero; doing it now, as the service
    # user and into the service's cache, makes the first boot start quickly.
    local warm
    run install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$CACHE_DIR" "$NUMBA_CACHE"
    if grep -qs -- '--warmup-only' "$SRC/app/__main__.py"; then
        warm=(-m app --warmup-only --config "$CONF")
    else
        warm=(-c 'from app.detector import Detector; Detector().warmup()')
    fi
    say "compiling the numba kernels into $NUMBA_CACHE (a few minutes on a Zero)"
    run runuser -u "$SERVICE_USER" -- env -C "$APP_DIR" NUMBA_CACHE_DIR="$NUMBA_CACHE" \
        PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" "${warm[@]}"
}

start_service() {
    run systemctl enable "$UNIT_NAME"
    if ((START)); then
        run systemctl restart "$UNIT_NAME"
        if ((!DRY_RUN)); then
            systemctl --no-pager --lines=5 status "$UNIT_NAME" || true
        fi
    else
        say "--no-start: start it with: sudo systemctl start $UNIT_NAME"
    fi
}

check_sources() {
    local f
    for f in "$SRC/requirements.txt" "$SRC/systemd/$UNIT_NAME" "$SRC/$MQTT_DROPIN_SRC" "$SRC/$WEB_DROPIN_SRC"; do
        [[ -f $f ]] || die "$f is missing: run install.sh from a complete copy of the project"
    done
    if [[ ! -f $SRC/deploy/config.example.toml && ! -e $CONF ]]; then
        if ((DRY_RUN)); then
            say "warning: $SRC/deploy/config.example.toml is missing and $CONF does not exist; a real install stops here"
        else
            die "$SRC/deploy/config.example.toml is missing and $CONF does not exist: nothing to configure the service with"
        fi
    fi
}

do_install() {
    check_sources
    install_apt_packages
    create_user
    copy_project
    setup_venv
    install_config
    install_unit
    warm_numba_cache
    start_service
    say "installed. Logs: journalctl -u xnorcam; detections: $LOG_DIR/detections.jsonl"
}

do_uninstall() {
    if [[ -e $UNIT_DST ]] || ((DRY_RUN)); then
        run systemctl disable --now "$UNIT_NAME"
        run rm -f "$UNIT_DST" "$MQTT_DROPIN" "$WEB_DROPIN"
        run systemctl daemon-reload
    fi
    run rm -rf "$PREFIX" "$CACHE_DIR"
    # The state directory holds what the camera made (snapshots, recordings: the example config writes
    # there, the only places besides the logs the unit's sandbox lets it write): kept like the logs.
    if ((PURGE)); then
        run rm -rf "$CONF_DIR" "$STATE_DIR" "$LOG_DIR"
    else
        say "keeping $CONF_DIR, $STATE_DIR and $LOG_DIR (--purge removes them)"
    fi
    if getent passwd "$SERVICE_USER" >/dev/null || ((DRY_RUN)); then
        run userdel "$SERVICE_USER"
    fi
    say "apt packages (${APT_PACKAGES[*]}) are left installed"
}

main() {
    parse_args "$@"
    ((DRY_RUN)) && say "dry run: nothing will be changed"
    check_platform
    check_root "$@"
    check_os
    if ((UNINSTALL)); then
        do_uninstall
    else
        do_install
    fi
}

main "$@"
