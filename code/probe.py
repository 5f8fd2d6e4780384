"""Linear probes on the frozen encoders of trained checkpoints. See docs/analysis.md or --help."""

import sys

from onthefly.analysis.probe import main

if __name__ == "__main__":
    sys.exit(main())
