"""Tables and plots comparing trained runs (methods x seeds). See docs/analysis.md or --help."""

import sys

from onthefly.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
