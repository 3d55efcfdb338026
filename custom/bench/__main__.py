"""python -m bench [--only ROW[,ROW]] [--quick] [--out DIR] [--work DIR]: run the rows, print the table, write it."""

import argparse
import time
from pathlib import Path

from . import demo, learning, operations, overhead, recovery, table

# each row: run(quick, work) -> list[Measurement]
ROWS = {"federated": learning.federated, "bandwidth": learning.bandwidth, "dp": learning.dp,
        "overhead": overhead.run, "operations": operations.run, "demo": demo.run,
        "recovery": recovery.run}  # fmt: skip
REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--only", default="", help=f"comma-separated rows of: {', '.join(ROWS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="one repeat, smallest sizes: checks the rows run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--work", type=Path, default=REPO / "workspace" / "bench")
    args = parser.parse_args()
    chosen = [r for r in args.only.split(",") if r] or list(ROWS)
    unknown = [r for r in chosen if r not in ROWS]
    if unknown:
        parser.error(f"ONLY={args.only}: no row {', '.join(unknown)} (rows: {', '.join(ROWS)})")
    started, measurements = time.time(), []
    for row in chosen:
        print(f"bench: {row} ...", flush=True)
        measurements += ROWS[row](args.quick, args.work / row)
        markdown = table.write(measurements, args.out, started)  # after each row: a late failure keeps the others
    print(markdown)
    print(f"written: {args.out / 'bench.md'}, {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
