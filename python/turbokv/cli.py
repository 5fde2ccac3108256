"""The ``turbokv`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turbokv", description="KV-cache compression for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize real-looking K/V with every format and print the errors")
    demo.add_argument("--tokens", type=int, default=2048, help="tokens of K/V per head (default 2048)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from turbokv import demo as demo_mod

        demo_mod.main(args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
