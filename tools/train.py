"""Entry point for ``accelerate launch tools/train.py CONFIG [--fast-dev-run] ...`` (same flags as ``crossmodal-kd run``)."""

import sys

from crossmodal_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
