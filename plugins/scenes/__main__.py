"""Save a street-scene frame with its lidar points drawn into the camera image, coloured by class:

    python -m anymodal.plugins.scenes overlay.png --split test --index 3
"""

from __future__ import annotations

import argparse
import sys

from ...core.errors import DataError
from .data import StreetScenesDataset, save_overlay


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anymodal.plugins.scenes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the PNG to write (the plain image, then the image with the points)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--index", type=int, default=0, help="the frame")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        data = StreetScenesDataset(args.split, size=args.index + 1, seed=args.seed)
        sample = data[args.index]
    except (DataError, IndexError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    path = save_overlay(sample, args.out)
    print(f"wrote {path}: frame {sample['frame']}, \"{sample['text']}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
