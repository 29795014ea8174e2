#!/usr/bin/env bash
# Copy this working tree to a Pi over ssh and run deploy/install.sh there (`make deploy HOST=pi@xnorcam.local`).
#
# The host and the installer's flags come in as data (XNORCAM_DEPLOY_HOST, XNORCAM_DEPLOY_ARGS), never as shell
# text: the Makefile used to paste them into its recipe, so `HOST='pi@h; touch /tmp/x #'` ran the touch here, a
# HOST starting with -o was an ssh option, and a quote in INSTALL_ARGS escaped the remote command. Both are now
# checked against what they can legitimately be, and refused with exit 2 otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

host=${XNORCAM_DEPLOY_HOST-}
args_text=${XNORCAM_DEPLOY_ARGS-}
# install.sh's own flags (its parse_args); --help is left out because it installs nothing.
allowed_flags=(--dry-run --uninstall --purge --no-start --no-camera)

usage() {
    echo "usage: make deploy HOST=[user@]host [INSTALL_ARGS='${allowed_flags[*]}']" >&2
}

if [[ -z $host ]]; then
    usage
    exit 2
fi
# [user@]host: a user name, then a host name, an IPv4/IPv6 address or an ssh config alias. Nothing that a shell or
# ssh would read as syntax or as an option: no leading '-', no spaces, quotes, ';', '$', '`', '|', '&' or newlines.
user_re='[A-Za-z0-9_][A-Za-z0-9._-]*'
host_re='[A-Za-z0-9_][A-Za-z0-9._-]*|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9]+)?|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9]+)?\]'
if ! [[ $host =~ ^($user_re@)?($host_re)$ ]]; then
    printf 'make deploy: HOST=%q is not [user@]host (letters, digits, . _ - in a name, or an IP address; not an option)\n' \
        "$host" >&2
    exit 2
fi

# INSTALL_ARGS is split on blanks, never evaluated: each word must be one of install.sh's flags.
read -r -a install_args <<<"$args_text" || true
for word in "${install_args[@]}"; do
    ok=0
    for flag in "${allowed_flags[@]}"; do
        [[ $word == "$flag" ]] && ok=1
    done
    if ((!ok)); then
        printf 'make deploy: INSTALL_ARGS word %q is not one of install.sh'\''s flags: %s\n' \
            "$word" "${allowed_flags[*]}" >&2
        exit 2
    fi
done

# '--' ends ssh's options, so even a host that slipped past the check could not become one.
tar --exclude-vcs --exclude=./.venv --exclude=./runs --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude=./.hypothesis --exclude=./.ruff_cache --exclude=./.numba_cache \
    --exclude=./.emulated --exclude=./.whl -czf - . |
    ssh -- "$host" 'rm -rf xnorcam-src && mkdir xnorcam-src && tar -xzf - -C xnorcam-src'
# The flags are fixed words from the list above, so the remote command holds no text from the caller.
ssh -t -- "$host" "sudo bash xnorcam-src/deploy/install.sh${install_args[*]:+ ${install_args[*]}}"
