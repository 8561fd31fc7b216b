"""What every job entry point shares: ``--config FILE`` plus ``key=value`` overrides -> typed config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from spae.config import ConfigError, dumps, load_config

T = TypeVar("T")


def job_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML config file (keys as in --print-config)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def parse_job_config(
    cls: type[T],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    base: dict[str, Any] | None = None,
) -> tuple[T, argparse.Namespace]:
    """Parse argv into ``cls``; config errors exit with status 2 and a message naming the key."""
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides, base=base)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    if args.print_config:
        print(dumps(cfg))
        parser.exit(0)
    return cfg, args


def run_main(fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """``if __name__ == "__main__": run_main(main)``"""
    sys.exit(fn(argv) or 0)


BUILT_IN_SCHEMES = ("mnist://", "moving-mnist://", "runs:/", "models:/")


def require_inputs(parser: argparse.ArgumentParser, **inputs: str) -> None:
    """Exit with status 2 and a message naming the key when an input URI does not exist.

    ``require_inputs(parser, **{"source.uri": cfg.source.uri, "vocab": cfg.vocab})``: runs before any
    work starts (no Ray, no model), so a typo costs a second, not a cluster start. Built-in datasets and
    MLflow URIs are checked by the stage that reads them.
    """
    from pipeline.storage import StorageError, resolve

    for key, uri in inputs.items():
        if not uri or uri.startswith(BUILT_IN_SCHEMES):
            continue
        try:
            found = resolve(uri).exists()
        except (StorageError, ValueError) as e:
            parser.exit(2, f"{parser.prog}: input error: {key}={uri}: {e}\n")
        if not found:
            parser.exit(2, f"{parser.prog}: input error: {key}={uri} does not exist\n")
