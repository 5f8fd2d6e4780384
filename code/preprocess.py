"""Raw dataset -> training cache. Example:

    python code/preprocess.py --dataset cremad --root /path/to/CREMA-D --out data/cremad

Datasets: cremad, kinetics_sounds, ucf101, ave, vggsound. See docs/datasets.md.
"""
import sys

from onthefly.data.raw.cli import main

if __name__ == "__main__":
    sys.exit(main())
