"""Build the local training corpus from the Python standard library's sources.

    python -m scripts.tools.build_corpus               # -> data/stdlib/{train,validation}.jsonl
    python -m scripts.tools.build_corpus --out /tmp/c --max-files 200 --array-record
    python -m scripts.tools.build_corpus --by-package --out data/stdlib-packages   # long documents
"""

from __future__ import annotations

import argparse
import sys

from jaxprefill.data.corpus import build_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/stdlib", help="output directory")
    p.add_argument("--root", default=None, help="source tree (default: this Python's stdlib)")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--array-record", action="store_true", help="also write .array_record shards")
    p.add_argument("--by-package", action="store_true",
                   help="one document per top-level package (long documents for long context)")
    args = p.parse_args(argv)
    stats = build_corpus(args.out, root=args.root, val_fraction=args.val_fraction,
                         max_files=args.max_files, array_record=args.array_record,
                         by_package=args.by_package)
    print(f"wrote {args.out}: {stats['train']} train / {stats['validation']} validation documents, "
          f"{stats['chars'] / 1e6:.1f}M characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
