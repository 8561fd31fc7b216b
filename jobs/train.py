"""``spae train``: train an SPAE tokenizer with Ray Train from images, their pools and the vocab table."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.runtime.ray_utils import init_ray
from pipeline.steps.train import TrainJobConfig, preset_base, run_train_job
from spae.config import ConfigError, parse_overrides, read_yaml

SUMMARY = "train an SPAE tokenizer on Ray Train (DDP workers, checkpoints, resume, MLflow)"
CONFIG_CLASS = TrainJobConfig

EPILOG = """\
examples:
  spae train data.images.uri=mnist://train data.pools=outputs/pools-train data.vocab=outputs/vocab \\
      steps=2000 num_workers=2 name=mnist-a1                  # the mnist preset on 2 CPU workers
  spae train preset=paper data.images.uri=s3://bucket/imagenet data.pools=s3://bucket/pools \\
      data.vocab=s3://bucket/vocab storage=s3://bucket/runs num_workers=8 use_gpu=true batch_size=32
  spae train preset=tiny --print-config                        # every key and its default
  spae train preset=moving-mnist data.images.uri="moving-mnist://train?limit=4096&frames=16" \
      data.pools=outputs/pools-mm data.vocab=outputs/vocab \
      data.eval.uri="moving-mnist://test?limit=256&frames=16" name=mm-a1   # clips: 16 frames of 32x32

Presets (preset=...): tiny (tests), mnist (default: 32x32, 8x8 latent, layers 1,2,4,8,8), paper
(128x128, 16x16 latent, layers 1,2,4,8,16,16); video (model.num_frames > 0: the source must give clips,
the GAN uses Discriminator3D, PSNR/SSIM are over frames): tiny3d (tests), moving-mnist (16 frames of
32x32), kinetics (16 frames of 128x128). The preset fills `model` and `loss`; the config file and
key=value overrides are applied on top. Running again with the same name and storage resumes from
the latest checkpoint and continues the same MLflow run.
"""


def resolve_preset(config_file: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The preset named by ``preset=...`` (overrides win over the config file), as the base layer."""
    name = TrainJobConfig.preset
    if config_file:
        name = read_yaml(config_file).get("preset", name)
    name = parse_overrides([o for o in overrides if o.split("=", 1)[0].strip() == "preset"]).get(
        "preset", name
    )
    if not isinstance(name, str):
        raise ConfigError(f"preset: expected a preset name, got {name!r}")
    try:
        return preset_base(name)
    except ValueError as e:
        raise ConfigError(f"preset: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae train", SUMMARY, EPILOG)
    args = parser.parse_args(argv)
    try:
        base = resolve_preset(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"spae train: config error: {e}\n")
    cfg, _ = parse_job_config(TrainJobConfig, parser, argv, base=base)

    init_ray(cfg.ray)
    result = run_train_job(cfg)
    print(
        f"train: {result.name} finished at step {result.steps} in {result.seconds:.0f}s; "
        f"checkpoint {result.checkpoint}; tokenizer {result.tokenizer}"
    )
    if result.run_id:
        print(f"mlflow run {result.run_id}: tokenizer model runs:/{result.run_id}/tokenizer")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
