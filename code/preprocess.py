"""Raw dataset -> training cache. Example:

    python code/preprocess.py --dataset cremad --root /path/to/CREMA-D --out data/cremad

Datasets: cremad, kinetics_sounds, ucf101, ave, vggsound. See docs/datasets.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from onthefly.data.raw.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
