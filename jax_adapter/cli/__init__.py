"""The jax-adapter command line: convert, export, inspect, demo, show, train and plan.

Each command is a thin module of its own (``weights``, ``demo``, ``train``, ``plan``). Bad input (the
library's own errors, :class:`~jax_adapter.errors.JaxAdapterError`, and ``OSError`` for files)
prints one line on stderr and exits with code 2; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from jax_adapter.cli import demo, plan, train, weights
from jax_adapter.cli.common import CliError  # noqa: F401 - the commands' error type
from jax_adapter.errors import JaxAdapterError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-adapter", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    weights.add_parsers(sub)
    demo.add_parsers(sub)
    train.add_parser(sub)
    plan.add_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "release_memory", False):
        # The package's import applied the allocator setting (jax_adapter.memory): undo it.
        from jax_adapter.memory import release_freed_memory
        release_freed_memory()
    try:
        return args.func(args)
    except (JaxAdapterError, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"jax-adapter {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
