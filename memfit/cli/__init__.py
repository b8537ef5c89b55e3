"""The `memfit` command: plan | opt | passes | demo (one module per subcommand).

Bad input (malformed budget, missing file or factory, untraceable model) is reported as one
line on stderr with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from memfit.errors import MemfitError


def build_parser() -> argparse.ArgumentParser:
    from memfit.cli import demo, opt, plan

    parser = argparse.ArgumentParser(prog="memfit", description="Train PyTorch models inside a memory budget.")
    sub = parser.add_subparsers(dest="command", required=True)
    plan.add_subcommand(sub)
    demo.add_subcommand(sub)
    opt.add_subcommands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="memfit: %(message)s")
    try:
        return args.func(args)
    except (MemfitError, ValueError, TypeError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"memfit: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
