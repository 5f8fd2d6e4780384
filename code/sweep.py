"""The benchmark protocol (tune on validation, test fresh seeds, probe, report). See docs/benchmark.md or --help."""

import sys

from onthefly.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
