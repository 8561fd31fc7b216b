"""The MNIST recipe, measured: semantic accuracy of layer 1 against reconstruction, with and without eq. 7.

Trains the ``mnist`` preset with the library's own trainer (``spae.training``, no Ray) on the vocab
and pools tables a demo run wrote (``spae demo output=DIR``), then evaluates held-out digits:
PSNR per covering prefix and the share of digits whose layer-1 word is the digit's word or numeral.
Each variant is a ``key=value`` list of SPAEConfig overrides (``loss.*``: LossConfig overrides,
``augment.*``: the training batch's shifts, ``spae.augment``, on the ``mnist`` preset's); the first is
the baseline and every other one is reported against it (PSNR difference in dB). ``--shifted N`` also
evaluates the first N digits of ``mnist-shifted://test`` (the same images: ``spae.shifts``, seed 0, each
shift in turn), overall and per shift.

    python bench/mnist_recipe.py --data spae-output --steps 1200 --variant loss.alpha=0 --variant ""
    python bench/mnist_recipe.py --data spae-output --shifted 1800 --variant augment.p=0 --variant ""
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spae.augment import AugmentConfig, augment, augment_preset, step_generator
from spae.codebook import FrozenCodebook
from spae.config import load_config, to_dict
from spae.data import MNIST_CLASS_WORDS, load_mnist, mnist_images
from spae.losses import LossConfig, loss_preset
from spae.metrics import label_word_accuracy, psnr
from spae.model import SPAE, SPAEConfig, preset
from spae.networks import Discriminator
from spae.shifts import SHIFTS, shift_digit
from spae.tokenizer import SPAETokenizer
from spae.training import OptimConfig, SPAETrainer


def read_pools(folder: str, k: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """image index in the MNIST split [n], topk ids [n, k], topk scores [n, k] from a pools table."""
    import glob

    tables = [
        pq.read_table(p, columns=["image_id", "topk_ids", "topk_scores"])
        for p in sorted(glob.glob(f"{folder}/part-*.parquet"))
    ]
    index = np.array([int(i.rsplit("-", 1)[1]) for t in tables for i in t["image_id"].to_pylist()])
    ids = torch.tensor([r[:k] for t in tables for r in t["topk_ids"].to_pylist()])
    scores = torch.tensor([r[:k] for t in tables for r in t["topk_scores"].to_pylist()])
    return index, ids, scores


def read_codebook(folder: str) -> FrozenCodebook:
    """The codebook rows of a vocab table (plain pyarrow, so this runs where Ray is not installed)."""
    import glob

    t = pa.concat_tables(
        [
            pq.read_table(p, columns=["token_id", "token", "word", "llm_id", "embedding"])
            for p in sorted(glob.glob(f"{folder}/part-*.parquet"))
        ]
    ).sort_by("token_id")
    emb = torch.tensor(np.stack(t["embedding"].to_numpy(zero_copy_only=False)), dtype=torch.float32)
    return FrozenCodebook.from_tensor(
        emb, t["token"].to_pylist(), t["word"].to_pylist(), t["llm_id"].to_pylist()
    )


def run_variant(args: argparse.Namespace, overrides: list[str], codebook, data, test, shifted=None) -> dict:
    model_over = [o for o in overrides if not o.startswith(("loss.", "augment."))]
    loss_over = [o.removeprefix("loss.") for o in overrides if o.startswith("loss.")]
    aug_over = [o.removeprefix("augment.") for o in overrides if o.startswith("augment.")]
    cfg = load_config(SPAEConfig, overrides=model_over, base=to_dict(preset("mnist")))
    lcfg = load_config(LossConfig, overrides=loss_over, base=to_dict(loss_preset("mnist")))
    acfg = load_config(AugmentConfig, overrides=aug_over, base=to_dict(augment_preset("mnist")))
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = SPAE(cfg, codebook).to(device)
    disc = Discriminator(cfg.network, cfg.image_channels, cfg.image_size).to(device)
    optim = OptimConfig(lr=args.lr, warmup_steps=100, cooldown_steps=args.steps // 6, total_steps=args.steps)
    trainer = SPAETrainer(model, disc, lcfg, optim, device, seed=args.seed)
    images, ids, scores = data[:3]
    labels = data[3] if len(data) > 3 else None  # [n], for augment's typeset family
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = torch.randint(0, len(images), (args.batch_size,), generator=g)
        x = images[batch]
        if acfg.enabled:  # as the train job: drawn from (seed, rank 0, step)
            x = augment(
                x, acfg, step_generator(args.seed, 0, step), None if labels is None else labels[batch]
            )
        metrics = trainer.step(x, ids[batch], scores[batch])
    seconds = time.perf_counter() - start
    model.eval()
    if getattr(args, "save", ""):  # the tokenizer, for spae evaluate / report
        SPAETokenizer(model).save_pretrained(
            f"{args.save}/{len(os.listdir(args.save)) if os.path.isdir(args.save) else 0}"
        )
    words = [w.lower() for w in codebook.words]
    class_rows = [
        {r for r, w in enumerate(words) if w in (name, str(i))} for i, name in enumerate(MNIST_CLASS_WORDS)
    ]
    result = {"overrides": overrides, **measure(model, device, test, class_rows)}
    result["z_norm"] = metrics["z_norm"]
    result["seconds"], result["s_per_step"] = seconds, seconds / args.steps
    if shifted is not None:
        x, labels, names = shifted
        result["shifted"] = measure(model, device, (x, labels), class_rows)
        for name in SHIFTS:
            sel = torch.tensor([n == name for n in names])
            if sel.any():
                result["shifted"][name] = measure(model, device, (x[sel], labels[sel]), class_rows)
    return result


def measure(model, device, test, class_rows) -> dict:
    """PSNR per covering prefix, layer-1 word accuracy and distinct layer-1 words on ``test``."""
    x, labels = test
    rows: dict[int, list] = {}
    top = []
    with torch.no_grad():
        for chunk in torch.split(torch.arange(len(x)), 250):
            out = model(x[chunk].to(device))
            top.append(out.quant.ids[0].flatten(1)[:, 0].cpu())
            for l, rec in out.reconstructions.items():
                rows.setdefault(l, []).append(psnr(((rec.float() + 1) / 2).clamp(0, 1).cpu(), x[chunk]))
    return {
        "psnr": {l: float(torch.cat(v).mean()) for l, v in rows.items()},
        "layer1_accuracy": label_word_accuracy(torch.cat(top), labels, class_rows),
        "distinct_layer1": int(torch.cat(top).unique().numel()),
    }


def shifted_test(n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``n`` digits of ``mnist-shifted://test`` (seed 0, shift ``i mod 9`` for digit i):
    images [n, 3, 32, 32], labels [n], shift names."""
    test_x, test_y = load_mnist("test")
    names = [tuple(SHIFTS)[i % len(SHIFTS)] for i in range(n)]
    digits = np.stack([shift_digit(test_x[i], int(test_y[i]), names[i], 0, i) for i in range(n)])
    return mnist_images(digits), torch.from_numpy(test_y[:n].copy()), names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a demo output folder (vocab/, pools-train/)")
    p.add_argument("--variant", action="append", default=[], help="SPAEConfig / loss.* overrides")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--shifted", type=int, default=0, help="also evaluate this many mnist-shifted://test digits"
    )
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument(
        "--save", default="", help="save each variant's tokenizer under SAVE/<i> (save_pretrained)"
    )
    args = p.parse_args()

    codebook = read_codebook(f"{args.data}/vocab")
    index, ids, scores = read_pools(f"{args.data}/pools-train", 64)
    train_x, train_y = load_mnist("train")
    images = mnist_images(train_x[index])  # [n, 3, 32, 32]
    labels = torch.from_numpy(train_y[index])
    test_x, test_y = load_mnist("test")
    test = (mnist_images(test_x[: args.eval_images]), torch.from_numpy(test_y[: args.eval_images]))
    shifted = shifted_test(args.shifted) if args.shifted else None
    results = []
    for variant in args.variant or ["loss.alpha=0", ""]:
        res = run_variant(args, variant.split(), codebook, (images, ids, scores, labels), test, shifted)
        base = results[0]["psnr"] if results else res["psnr"]
        res["psnr_vs_first"] = {l: res["psnr"][l] - base[l] for l in res["psnr"]}
        results.append(res)
        print(json.dumps(res), flush=True)
    print(
        "\n| variant | PSNR by prefix (dB) | vs first | layer-1 word right | s/step |\n|---|---|---|---|---|"
    )
    for r in results:
        ps = " / ".join(f"{v:.2f}" for v in r["psnr"].values())
        dv = " / ".join(f"{v:+.2f}" for v in r["psnr_vs_first"].values())
        name = " ".join(r["overrides"]) or "(preset)"
        print(f"| {name} | {ps} | {dv} | {r['layer1_accuracy']:.1%} | {r['s_per_step']:.3f} |")
    if shifted is not None:
        print("\n| variant | shifted: word right / PSNR last prefix | " + " | ".join(SHIFTS) + " |")
        print("|---|---|" + "---|" * len(SHIFTS))
        for r in results:
            s, last = r["shifted"], max(r["shifted"]["psnr"])
            cells = [f"{s[n]['layer1_accuracy']:.0%} / {s[n]['psnr'][last]:.1f}" for n in SHIFTS if n in s]
            name = " ".join(r["overrides"]) or "(preset)"
            print(
                f"| {name} | {s['layer1_accuracy']:.1%} / {s['psnr'][last]:.2f} dB | "
                + " | ".join(cells)
                + " |"
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
