"""What every job entry point shares: ``--config FILE`` plus ``key=value`` overrides -> typed config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from pipeline.runtime.preflight import JobNeeds, PreflightError, check
from spae.config import ConfigError, dumps, load_config, merge, parse_overrides, read_yaml

T = TypeVar("T")


def _actor_gpus(cfg: Any) -> float:
    return cfg.num_gpus_per_actor


def _worker_gpus(cfg: Any) -> float:
    return float(cfg.num_workers) if cfg.use_gpu else 0.0


def _device_gpus(cfg: Any) -> float:
    return 1.0 if cfg.device.startswith("cuda") else 0.0


def _demo_gpus(cfg: Any) -> float:  # stopping before training (probe, vocab, pools) needs no GPU
    return 0.0 if cfg.stop_after in ("probe", "vocab", "pools") else _worker_gpus(cfg)


# what each job checks before it starts (pipeline.runtime.preflight): URIs it writes, URIs it reads, GPUs
PREFLIGHT: dict[str, JobNeeds] = {
    "vocab": JobNeeds(outputs=("output",), gpus=_actor_gpus),
    "pools": JobNeeds(outputs=("output",), inputs=("source.uri", "vocab"), gpus=_actor_gpus),
    "train": JobNeeds(
        outputs=("storage",),
        inputs=("data.images.uri", "data.pools", "data.vocab", "data.eval.uri", "data.eval_pools"),
        gpus=_worker_gpus,
    ),
    "evaluate": JobNeeds(
        outputs=("output",), inputs=("tokenizer", "source.uri", "pools", "vocab"), gpus=_device_gpus
    ),
    "tokenize": JobNeeds(outputs=("output",), inputs=("source.uri", "tokenizer"), gpus=_actor_gpus),
    "report": JobNeeds(outputs=("output",), inputs=("corpus", "tokenizer", "pools"), mlflow=False),
    "decode": JobNeeds(outputs=("output",), inputs=("corpus", "tokenizer", "text_file"), mlflow=False),
    "icl": JobNeeds(outputs=("output",), inputs=("corpus",)),
    # a local output and its own local MLflow store: nothing to check before its config is validated
    "demo": JobNeeds(outputs=("output",), gpus=_demo_gpus, mlflow=False, early=False),
}


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
    """Parse argv into ``cls``; config errors exit with status 2 and a message naming the key.

    Then the job's pre-flight (``PREFLIGHT``, by the command in ``parser.prog``): what it will need is
    checked before any work starts; a failure exits with status 2 and one line naming the URI.
    """
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides, base=base)
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    if args.print_config:
        print(dumps(cfg))
        parser.exit(0)
    preflight(parser, cfg)
    return cfg, args


def preflight(parser: argparse.ArgumentParser, cfg: Any) -> None:
    """``pipeline.runtime.preflight.check`` for the command ``spae <name>`` of ``parser.prog``; exit 2, one
    line."""
    name = parser.prog.split()[1] if parser.prog.startswith("spae ") else ""
    needs = PREFLIGHT.get(name)
    if needs is None:
        return
    try:
        check(cfg, needs)
    except PreflightError as e:
        parser.exit(2, f"{parser.prog}: cannot start: {e}\n")


def split_job_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[--config FILE] [key=value ...]`` -> (FILE or None, the overrides); other flags are ignored."""
    config_path, overrides = None, []
    it = iter(argv)
    for item in it:
        if item == "--config":
            config_path = next(it, None)
        elif item.startswith("--config="):
            config_path = item.split("=", 1)[1]
        elif "=" in item and not item.startswith("-"):
            overrides.append(item)
    return config_path, overrides


def preflight_argv(name: str, argv: Sequence[str]) -> str:
    """The pre-flight of ``spae <name>`` on what argv names (config file + overrides), before the job's
    module is imported (torch: seconds on a busy machine); "" = nothing wrong found. Config errors are
    left to the job, which reports them by key; defaults are checked by ``parse_job_config``."""
    needs = PREFLIGHT.get(name)
    if needs is None or not needs.early or any(a in ("-h", "--help", "--print-config") for a in argv):
        return ""
    config_path, overrides = split_job_argv(argv)
    try:
        data = merge(read_yaml(config_path) if config_path else {}, parse_overrides(overrides))
    except ConfigError:
        return ""
    try:
        check(data, replace(needs, gpus=None))
    except PreflightError as e:
        return str(e)
    return ""


def run_main(fn: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """``if __name__ == "__main__": run_main(main)``"""
    sys.exit(fn(argv) or 0)
