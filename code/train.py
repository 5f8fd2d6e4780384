"""Train an audio-visual classifier with on-the-fly modulation. See README.md or --help."""

import sys

from onthefly.runner import main

if __name__ == "__main__":
    sys.exit(main())
