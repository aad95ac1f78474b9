"""Run hnm's mining pipeline: `python launch.py --num-gpus 8 --config configs/train.yaml`."""

import sys

from hnm.cli import main

if __name__ == "__main__":
    sys.exit(main())
