"""code/train.py on conftest's tiny encoders, for tests that start train.py as a process of its own
to test what surrounds it (a launcher, a requeue, the options a sweep writes), not the model.

TINY_TRAIN_PAUSE=<file>: a fresh run (no --resume) touches <file> as its second epoch begins and
waits there to be stopped (SIGTERM), so a test can preempt it at a known point however fast or
loaded the machine is.
"""

import os
import runpy
import sys
import time
from pathlib import Path

from onthefly import runner

CONFTEST = Path(__file__).resolve().with_name("conftest.py")


def pause_in_the_second_epoch(started: Path):
    real, calls = runner.train_one_epoch, []

    def train_one_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            started.touch()
            time.sleep(120)  # train.py's SIGTERM handler ends this long before
        return real(*args, **kwargs)

    return train_one_epoch


if __name__ == "__main__":
    if os.environ.get("TINY_TRAIN_PAUSE") and "--resume" not in sys.argv:
        runner.train_one_epoch = pause_in_the_second_epoch(Path(os.environ["TINY_TRAIN_PAUSE"]))
    with runpy.run_path(str(CONFTEST))["swap_in_tiny_encoders"]():
        sys.exit(runner.main(sys.argv[1:]))
