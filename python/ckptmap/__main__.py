"""``python -m ckptmap ARGS`` runs the ckptmap binary with ARGS."""

import os
import subprocess
import sys

from . import binary


def main():
    path = binary()
    if os.name == "posix":
        os.execv(path, [path, *sys.argv[1:]])
    sys.exit(subprocess.call([path, *sys.argv[1:]]))


if __name__ == "__main__":
    main()
