"""What the service's sandbox hides or protects, said where a configured path fails.

systemd/xnorcam.service runs the app with ``ProtectHome=yes`` (``/home``, ``/root``
and ``/run/user`` are empty and inaccessible to it) and ``ProtectSystem=strict``
(the whole file system read-only except the unit's ``StateDirectory=``,
``LogsDirectory=`` and ``CacheDirectory=``, and a private ``/tmp``). A path that
works from a shell (``/home/pi/photos``, ``/srv/rec.mp4``) then fails inside the
service with a bare "Permission denied" or "Read-only file system", or looks like
an empty folder. ``hint`` turns that into the reason and the fix.

The hint is only given when the app runs under systemd (``$INVOCATION_ID``, which
systemd sets for every unit it starts) or when ``/home`` (``/root``, ``/run/user``)
is the inaccessible node ProtectHome= mounts there: a plain permission problem in a
shell is not blamed on a sandbox.
"""

from __future__ import annotations

import errno
import os
import stat

# ProtectHome=yes: these trees are empty and inaccessible inside the service.
HIDDEN_TREES = ("/home", "/root", "/run/user")
# What the shipped unit makes writable (StateDirectory=, LogsDirectory=, CacheDirectory= = xnorcam), used
# when systemd did not pass them in $STATE_DIRECTORY, $LOGS_DIRECTORY and $CACHE_DIRECTORY.
UNIT_WRITABLE = ("/var/lib/xnorcam", "/var/log/xnorcam", "/var/cache/xnorcam")
# The errors a sandbox gives: an inaccessible tree (EACCES, EPERM, or ENOENT below an empty tmpfs/ro bind),
# a read-only bind mount (EROFS).
SANDBOX_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT)


def _within(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _abs(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def hidden_tree(path: str) -> str | None:
    """The ProtectHome= tree ``path`` lies in (``/home``...), or None."""
    p = _abs(path)
    return next((t for t in HIDDEN_TREES if _within(p, t)), None)


def writable_dirs(environ: dict[str, str] | None = None) -> list[str]:
    """The directories the service may write: systemd's $STATE_DIRECTORY, $LOGS_DIRECTORY, $CACHE_DIRECTORY
    (colon-separated lists) when it passed them, else the shipped unit's."""
    env = os.environ if environ is None else environ
    found: list[str] = []
    for var in ("STATE_DIRECTORY", "LOGS_DIRECTORY", "CACHE_DIRECTORY"):
        found += [d for d in env.get(var, "").split(":") if d]
    return found or list(UNIT_WRITABLE)


def _looks_protected(tree: str) -> bool:
    """``tree`` is the inaccessible node ProtectHome= mounts (mode 000): we run inside such a sandbox."""
    try:
        return stat.S_IMODE(os.stat(tree).st_mode) == 0
    except OSError:
        return False


def sandboxed(path: str, environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("INVOCATION_ID"):
        return True
    tree = hidden_tree(path)
    return tree is not None and _looks_protected(tree)


def hint(path: str, error: int | None, writing: bool, environ: dict[str, str] | None = None) -> str:
    """'; <why the service cannot use path, and where it can>' for a failure with ``error`` (an errno, or
    None for "nothing there"), or '' when the sandbox is not the likely cause."""
    if not path or (error is not None and error not in SANDBOX_ERRNOS) or not sandboxed(path, environ):
        return ""
    dirs = writable_dirs(environ)
    where = ", ".join(dirs)
    tree = hidden_tree(path)
    if tree is not None:
        what = ("the service's sandbox hides /home, /root and /run/user from it (ProtectHome=yes in "
                "xnorcam.service)")
        if writing:
            return f"; {what}: it may write only under {where}"
        return (f"; {what}: put it where the service can read it, e.g. under {dirs[0]} "
                f"(readable by the service user)")
    if writing and not any(_within(_abs(path), d) for d in dirs) and error in (errno.EROFS, errno.EACCES,
                                                                                errno.EPERM, None):
        return (f"; the service's sandbox keeps the file system read-only (ProtectSystem=strict in "
                f"xnorcam.service): it may write only under {where} (or add ReadWritePaths= with "
                f"`systemctl edit xnorcam`)")
    return ""
