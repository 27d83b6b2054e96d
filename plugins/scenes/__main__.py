"""Tools for the generated street scenes:

    python -m anymodal.plugins.scenes overlay overlay.png --split test --index 3
    python -m anymodal.plugins.scenes export-mcap recordings --streets 8     # recordings/{train,test}/*.mcap
    python -m anymodal.plugins.scenes export-nuscenes nuscenes-mini          # the v1.0-mini layout

overlay draws a frame's lidar points into its camera image by class; the exports write generated
streets as ROS 2 MCAP recordings and as a nuScenes-layout folder (`anymodal.plugins.scenes.export`).
"""

from __future__ import annotations

import argparse
import sys

from ...core.errors import DataError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anymodal.plugins.scenes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("overlay", help="save a frame with its lidar points drawn into the camera image")
    s.add_argument("out", help="the PNG to write (the plain image, then the image with the points)")
    s.add_argument("--split", default="test", choices=("train", "test"))
    s.add_argument("--index", type=int, default=0, help="the frame")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("export-mcap", help="write generated streets as ROS 2 MCAP recordings, one per street")
    s.add_argument("out", help="folder: recordings go to OUT/train/ and OUT/test/")
    s.add_argument("--streets", type=int, default=4, help="streets (recordings) per split")
    s.add_argument("--test-streets", type=int, default=None, help="streets of the test split (default: --streets)")
    s.add_argument("--frames-per-street", type=int, default=4)
    s.add_argument("--image", default="jpeg", choices=("jpeg", "png", "raw"), help="CompressedImage jpeg/png or raw rgb8 Image")
    s.add_argument("--radar", action="store_true", help="add the front radar's point clouds")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("export-nuscenes", help="write generated streets as the nuScenes v1.0-mini layout")
    s.add_argument("out", help="the dataset root to write (v1.0-mini/, samples/, lidarseg/)")
    s.add_argument("--frames-per-street", type=int, default=4, help="samples per scene")
    s.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        if args.command == "overlay":
            from .data import StreetScenesDataset, save_overlay

            data = StreetScenesDataset(args.split, size=args.index + 1, seed=args.seed)
            sample = data[args.index]
            path = save_overlay(sample, args.out)
            print(f"wrote {path}: frame {sample['frame']}, \"{sample['text']}\"")
        elif args.command == "export-mcap":
            from .export import export_mcap
            from .mcap_data import require_mcap

            require_mcap("export-mcap")
            for split, streets in (("train", args.streets), ("test", args.test_streets or args.streets)):
                files = export_mcap(args.out, split, streets, args.frames_per_street, args.seed, args.image, args.radar)
                print(f"wrote {len(files)} {split} recordings of {args.frames_per_street} frames to {files[0].parent}")
        else:
            from .export import export_nuscenes

            root = export_nuscenes(args.out, args.frames_per_street, args.seed)
            print(f"wrote the nuScenes v1.0-mini layout (10 scenes of {args.frames_per_street} samples) to {root}")
    except (DataError, IndexError, OSError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
