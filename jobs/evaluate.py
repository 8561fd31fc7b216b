"""``spae evaluate``: PSNR/SSIM per prefix, usage and semantic relevance per layer (images or clips)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from jobs.common import job_parser, parse_job_config, run_main
from pipeline.runtime.storage import resolve
from pipeline.runtime.tracking import log_params_flat, start_run
from pipeline.steps.evaluate import METRICS_JSON, PICTURE, EvaluateJobConfig, format_metrics, run_evaluate

SUMMARY = "evaluate a tokenizer: PSNR/SSIM per prefix, utilization/perplexity/relevance per layer -> MLflow"
CONFIG_CLASS = EvaluateJobConfig

EPILOG = """\
examples:
  spae evaluate tokenizer=outputs/runs/mnist-a1/tokenizer source.uri=mnist://test limit=1000
  spae evaluate tokenizer=runs:/<run id>/tokenizer source.uri=mnist://test \\
      pools=outputs/pools-test vocab=outputs/vocab       # + semantic relevance of every layer
  spae evaluate tokenizer=models:/spae-mnist/1 output=s3://bucket/eval/mnist
  spae evaluate tokenizer=outputs/runs/mm-a1/tokenizer \
      source.uri="moving-mnist://test?limit=256&frames=16"   # a video tokenizer: metrics over frames
  spae evaluate tokenizer=outputs/runs/mnist-a1/tokenizer source.uri=digits/ \
      source.label_words=mnist     # folders 0..9 (or zero..nine): the top word is right as "seven" or "7"

Runs on this machine with plain torch (no Ray): meant for held-out sets of up to some thousands
of images. Writes <output>/metrics.json and <output>/reconstructions.png and logs both to MLflow.
FID / IS / LPIPS (optional_metrics=[fid,is,lpips]) need local weight files, never downloaded:
weights.fid / weights.is = a torchvision inception_v3 state dict, weights.lpips = a vgg16 state dict
(+ weights.lpips_linear for calibrated LPIPS); asking without them says which key is missing.

A video tokenizer (num_frames > 0) is evaluated on clips of its num_frames frames: PSNR, SSIM, FID,
IS and LPIPS per frame, averaged over all frames (metrics.json: clips, frames_per_clip); FVD
(optional_metrics=[fvd], weights.fvd = a local I3D state dict) over clips; label-word accuracy of
layer 1 on Moving MNIST uses each clip's first digit.
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae evaluate", SUMMARY, EPILOG)
    cfg, _ = parse_job_config(EvaluateJobConfig, parser, argv)

    out = resolve(cfg.output)
    default_dir = out.path if not out.is_s3 else "outputs"
    with start_run(cfg.mlflow, cfg.run_name or f"evaluate:{cfg.tokenizer}", default_dir) as run:
        if run is not None:
            log_params_flat(cfg)
        result = run_evaluate(cfg)
        if run is not None:
            import mlflow

            mlflow.log_metrics(result.metrics)
            if "clips" in result.metrics:
                mlflow.set_tag("spae.eval.unit", "frames: psnr/ssim/fid/is/lpips per frame, fvd per clip")
            mlflow.log_text(out.join(METRICS_JSON).read_text(), METRICS_JSON)
            if cfg.picture_images:
                with tempfile.TemporaryDirectory() as tmp:
                    png = Path(tmp) / PICTURE
                    png.write_bytes(out.join(PICTURE).read_bytes())
                    mlflow.log_artifact(str(png))
    print(format_metrics(result.metrics))
    m = result.metrics
    count = f"{int(m['clips'])} clips" if "clips" in m else f"{int(m['images'])} images"
    print(f"evaluate: {count} in {result.seconds:.1f}s -> {result.output}")
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
