"""``python tools/benchmark.py BENCH.yaml [--seeds ...]`` (or under ``accelerate launch``): same as ``crossmodal-kd bench``."""

import sys

from crossmodal_kd.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
