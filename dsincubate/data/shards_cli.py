"""`dsincubate shards`: convert an ImageFolder tree or a `path label` list file into WebDataset shards + manifest.

    dsincubate shards /data/imagenet/train /data/shards/train --prefix train --maxcount 1250
    dsincubate shards /data/imagenet/val   /data/shards/val   --prefix val --maxsize 1e9
    dsincubate shards --verify /data/shards/train           # check the manifest against the shards on disk

Re-running the same command keeps shards that are complete and match the manifest (sha256, keys, labels). The CLI
owner wires add_arguments/run into the `dsincubate` command; `python -m dsincubate.data.shards_cli` also works.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dsincubate.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="ImageFolder root (one folder per class) or list file of 'path label' lines; "
                                    "with --verify: the shard directory")
    parser.add_argument("out", nargs="?", default="", help="output directory for shards and manifest.json")
    parser.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar (default: shard)")
    parser.add_argument("--maxcount", type=int, default=1000, help="max samples per shard (default: 1000)")
    parser.add_argument("--maxsize", type=float, default=1e9, help="max bytes per shard (default: 1e9)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards (default: 0)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count of a list file without a classes.txt beside it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify", action="store_true", help="only verify an existing shard directory")


def run(args) -> int:
    from dsincubate.data.writer import convert, verify_shards

    if args.verify:
        if not os.path.isfile(os.path.join(args.src, "manifest.json")):
            raise UserError(f"{args.src} holds no manifest.json to verify")
        problems = verify_shards(args.src)
        for p in problems:
            print(p)
        print(f"{args.src}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 0 if not problems else 1
    if not args.out:
        raise UserError("give an output directory: dsincubate shards SRC OUT")
    if os.path.abspath(args.out) == os.path.abspath(args.src):
        raise UserError("output directory must differ from the input")
    man = convert(args.src, args.out, prefix=args.prefix, maxcount=args.maxcount, maxsize=args.maxsize,
                  seed=args.seed, progress=not args.no_progress, num_classes=args.num_classes)
    print(json.dumps({"out": args.out, "samples": man["num_samples"], "classes": man["num_classes"],
                      "shards": len(man["shards"]), "written": man["written"], "kept": man["kept"]}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsincubate shards", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
