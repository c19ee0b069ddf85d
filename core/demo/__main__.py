"""``python -m core.demo [--seed N]``: the demo world's checksum and how it was built (building
it first when it is not cached), so figures from two machines can be told apart."""

from __future__ import annotations

import argparse

from core.demo.world import ensure_demo_world


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.demo", description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(ensure_demo_world(args.seed).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
