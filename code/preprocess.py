"""Raw dataset -> training cache. Example:

    python code/preprocess.py --dataset cremad --root /path/to/CREMA-D --out data/cremad

Datasets: cremad, kinetics_sounds, ucf101, ave, vggsound. See docs/datasets.md.
"""

import sys

if __name__ == "__main__":
    try:  # Ctrl-C while the libraries load is one line too
        from onthefly.data.raw.cli import main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
