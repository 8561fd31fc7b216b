"""The ``spae`` command: one entry point for every job, locally or submitted to a Ray cluster.

Each subcommand is a module ``jobs.<name>`` with ``main(argv) -> int`` and a one-line ``SUMMARY``;
``spae <command> --help`` is that module's own help.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from jobs.common import preflight_argv

COMMANDS: dict[str, str] = {
    "stack": "jobs.stack",
    "vocab": "jobs.vocab",
    "pools": "jobs.pools",
    "train": "jobs.train",
    "evaluate": "jobs.evaluate",
    "tokenize": "jobs.tokenize",
    "decode": "jobs.decode",
    "report": "jobs.report",
    "demo": "jobs.demo",
    "submit": "jobs.submit",
    "icl": "jobs.icl",
}


def _summary(module_name: str) -> str:
    try:
        return getattr(importlib.import_module(module_name), "SUMMARY", "")
    except ImportError as e:
        return f"(unavailable: {e})"


def usage() -> str:
    lines = [
        "usage: spae <command> [--config FILE] [key.sub=value ...]",
        "",
        "SPAE: turn images into words of a frozen LLM vocabulary and back, as Ray jobs.",
        "",
        "commands:",
    ]
    for name, module in COMMANDS.items():
        lines.append(f"  {name:<10} {_summary(module)}")
    lines += ["", "Run 'spae <command> --help' for the options of one command."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"spae: unknown command '{name}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    problem = preflight_argv(name, rest)  # before the import: a job module loads torch (seconds)
    if problem:
        print(f"spae {name}: cannot start: {problem}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name])
    try:
        return int(module.main(rest) or 0)
    except (ConnectionError, FileNotFoundError) as e:  # unreachable cluster/endpoint, missing input
        print(f"spae {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
