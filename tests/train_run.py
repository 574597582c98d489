"""The trainer's own entry (pre-flight, the method's loop) under torchrun, optionally stopped as if killed
right after a step: `python -m whetstone_trainer train` has no such switch, tests of resumption need one.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/train_run.py JOB.yaml OUT \
        [--stop-after K]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from whetstone_trainer.entry import load_job_file, prepare, train


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args()
    train(prepare(load_job_file(args.job)), args.out, stop_after_step=args.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
