"""Evaluate a trained checkpoint on a split. See README.md or --help."""

import sys

from onthefly.infer import main

if __name__ == "__main__":
    sys.exit(main())
