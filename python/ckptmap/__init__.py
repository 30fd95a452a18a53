"""Thin Python access to the ``ckptmap`` binary installed by this wheel.

``ckptmap.convert(src, dst, **options)`` runs ``ckptmap convert SRC DST --json`` with the
options as flags (``img_size=512`` -> ``--img-size 512``, ``verify=True`` -> ``--verify``)
and returns the JSON report as a dict. ``ckptmap.run(args)`` runs any command. A failure
raises :class:`CkptmapError` carrying the one-line error and the exit code.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

__all__ = ["CkptmapError", "binary", "convert", "run"]


class CkptmapError(RuntimeError):
    """A ckptmap command failed: ``message`` is its error line, ``code`` its exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.message = message
        self.code = code


def binary():
    """The path of the ``ckptmap`` executable: next to this Python first, then on PATH."""
    name = "ckptmap.exe" if os.name == "nt" else "ckptmap"
    dirs = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    user = sysconfig.get_path("scripts", f"{os.name}_user")
    if user:
        dirs.append(user)
    for d in dirs:
        path = os.path.join(d, name)
        if d and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError("the ckptmap binary is not installed next to this Python nor on PATH (pip install ckptmap)")


def run(args, check=True):
    """Runs ``ckptmap ARGS``; returns the CompletedProcess (text mode, output captured)."""
    proc = subprocess.run([binary(), *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise CkptmapError(lines[-1] if lines else f"ckptmap exited with {proc.returncode}", proc.returncode)
    return proc


def _flags(options):
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def convert(src, dst, **options):
    """Converts SRC (a path or URL) into DST; returns the JSON report as a dict."""
    proc = run(["convert", os.fspath(src), os.fspath(dst), "--json", *_flags(options)])
    return json.loads(proc.stdout)
