"""The fast encode path: the persistent fused search kernel (through Triton's interpreter), its packed
(distance, row) results, the lean SAQ walk of ``encode`` and ``EncodeOptions`` (bf16, compile)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from spae.codebook import FrozenCodebook
from spae.model import SPAE, preset
from spae.quantize import QuantizerConfig, _decode, plan_units
from spae.tokenizer import EncodeOptions, SPAETokenizer

KERNEL_CHECK = textwrap.dedent(
    """
    import torch
    from spae.quantize import FusedSearchConfig, fused_nearest_codes

    torch.manual_seed(0)
    cases = [(70, 700, 64, (32, 64)), (5, 130, 96, (16, 32)), (40, 520, 64, (16, 64))]
    for kernel, tma in (("persistent", False), ("persistent", True), ("tiled", False)):
        for n, v, c, block in cases:
            # small integers: every dot product and norm is exact in fp16/fp32, so ties are real ties
            x = torch.randint(-3, 4, (n, c)).to(torch.float16)
            e = torch.randint(-3, 4, (v, c)).to(torch.float16)
            e[v - 1] = e[3]  # duplicates in other tiles and other slices: row 3 must win
            e[v // 2] = e[3]
            x[0] = e[3]
            x[1] = 0  # every distance equals ||e||^2: the shortest rows tie across the whole table
            sq = e.float().pow(2).sum(1)
            cfg = FusedSearchConfig(warps=4, stages=2, tma=tma)
            d, ids = fused_nearest_codes(x, e, sq, block=block, kernel=kernel, config=cfg)
            dist = sq[None, :] - 2.0 * x.double() @ e.double().T  # [n, v], exact
            ref_d = dist.min(1).values
            ref_i = torch.where(dist == ref_d[:, None], torch.arange(v), v).min(1).values  # lowest tie
            assert ids.dtype == torch.int64 and d.dtype == torch.float32
            assert torch.equal(ids, ref_i), (kernel, tma, n, ids, ref_i)
            assert torch.equal(d.double(), ref_d), (kernel, tma, n, d, ref_d)
            assert ids[0] == 3
    print("kernels ok")
    """
)


def test_persistent_and_tiled_kernels_match_exact_argmin_in_the_triton_interpreter():
    pytest.importorskip("triton", reason="the fused search kernels are written in Triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kernels ok" in out.stdout


def _pack(d: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The kernel's packing, in torch: float order as signed-int order in the high word, row below."""
    bits = torch.where(d == 0, torch.zeros_like(d), d).view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.long() << 32) | i.long()


def test_packed_results_order_by_distance_then_lowest_row_and_decode_back():
    d = torch.tensor([-3.5, -0.0, 0.0, 1e-30, 2.0, 2.0, float("inf"), -1e30, 7.25, -3.5])
    i = torch.tensor([9, 4, 3, 8, 5, 1, 0, 2, 7, 6])
    packed = _pack(d, i)
    order = sorted(range(len(d)), key=lambda j: (float(d[j]), int(i[j])))  # -0.0 == 0.0: the row decides
    assert torch.argsort(packed).tolist() == order
    dd, ii = _decode(packed)
    assert torch.equal(ii, i) and torch.equal(dd, torch.where(d == 0, 0.0, d))
    best_d, best_i = _decode(packed.view(2, 5).min(0).values)  # how the kernel's slices are combined
    ref = [min(range(j, 10, 5), key=lambda r: (float(d[r]), int(i[r]))) for j in range(5)]
    assert best_i.tolist() == [int(i[r]) for r in ref] and best_d.tolist() == [float(d[r]) for r in ref]


@pytest.mark.parametrize(("n", "v", "programs"), [(38208, 65536, 132), (256, 65536, 132), (70, 700, 4)])
def test_plan_units_covers_the_codebook_with_the_shortest_critical_path(n, v, programs):
    bm, bn = (128, 256) if programs == 132 else (32, 64)
    slices, per = plan_units(n, v, bm, bn, programs)
    num_m, tiles = -(-n // bm), -(-v // bn)
    assert slices * per >= tiles and (slices - 1) * per < tiles  # every tile in exactly one slice
    cost = -(-num_m * slices // programs) * per
    brute = min(-(-num_m * s // programs) * -(-tiles // s) for s in range(1, tiles + 1))
    assert cost == brute
    if (n, v) == (38208, 65536):  # the paper shape: within 1% of a perfect spread (vs 3 waves for 2.26)
        assert cost <= 1.01 * num_m * tiles / programs


# ----------------------------------------------------------------------------- the encode path


def _tokenizer(name: str = "tiny", kind: str = "saq", seed: int = 0) -> SPAETokenizer:
    torch.manual_seed(seed)
    cfg = preset(name)
    cfg = replace(cfg, quantizer=QuantizerConfig(kind=kind, vq_codebook_size=64))
    v, c = 200, cfg.network.latent_dim
    emb = torch.nn.functional.normalize(torch.randn(v, c), dim=1)
    words = [f"w{i}" for i in range(v)]
    model = SPAE(cfg, FrozenCodebook(emb, words, words, list(range(v)), {"source": "random"}))
    images = torch.rand(4, *cfg.input_shape, generator=torch.Generator().manual_seed(1))
    model.match_latent_to_codebook(images)
    return SPAETokenizer(model)


@pytest.mark.parametrize(
    ("name", "kind"), [("tiny", "saq"), ("tiny", "rq"), ("tiny", "vq"), ("tiny3d", "saq")]
)
def test_lean_walk_ids_equal_the_training_walk(name, kind):
    tok = _tokenizer(name, kind)
    images = torch.rand(6, *tok.config.input_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = tok.model.encode_latent(images)
        ref = tok.model.quantizer(z).ids
        ids = tok.model.quantizer.encode_ids(z)
    assert len(ids) == len(ref)
    for a, b in zip(ids, ref, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
    assert len(torch.cat([r.flatten() for r in ref]).unique()) > 3  # not a collapsed walk
    pyr = tok.encode(images)  # the default encode takes the lean walk: same ids
    assert all(torch.equal(a, b) for a, b in zip(pyr.ids, ref, strict=True))


def test_bf16_option_runs_the_encoder_under_autocast():
    tok = _tokenizer()
    images = torch.rand(3, *tok.config.input_shape, generator=torch.Generator().manual_seed(3))
    seen = []
    hook = tok.model.encoder.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref = tok.encode(images)
    tok.encode_options = EncodeOptions(dtype="bfloat16")
    fast = tok.encode(images)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert fast.layers == ref.layers
    assert all(a.shape == b.shape for a, b in zip(fast.ids, ref.ids, strict=True))
    assert (fast.ids[0] == ref.ids[0]).float().mean() >= 0.5  # the coarsest layer: mostly the same words


def test_compiled_encode_pads_to_the_compiled_batch_and_keeps_the_ids():
    tok = _tokenizer()
    tok.encode_options = EncodeOptions(compile=True, compile_backend="aot_eager")
    g = torch.Generator().manual_seed(4)
    eager = SPAETokenizer(tok.model)  # the same model, default options (CPU: no compile)
    for b, size in ((5, 8), (3, 8), (9, 16)):  # 3 images are padded to the 8 compiled; 9 compiles 16
        images = torch.rand(b, *tok.config.input_shape, generator=g)
        fast, ref = tok.encode(images), eager.encode(images)
        assert fast.batch_size == b
        assert all(torch.equal(a, r) for a, r in zip(fast.ids, ref.ids, strict=True))
        assert tok._compiled["float32/aot_eager/None"][1] == size
    assert not eager._compiled
    assert not any(k.startswith("_compiled") for k in tok.state_dict())  # no extra weights to save


def test_encode_options_reject_an_unknown_dtype():
    with pytest.raises(ValueError, match="float16"):
        EncodeOptions(dtype="float16")


def test_encode_speed_bench_smoke(tmp_path, capsys):
    import importlib
    import json
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:  # bench/ is a folder of scripts beside the package, as in test_bench_smoke
        sys.path.insert(0, root)
    encode_speed = importlib.import_module("bench.encode_speed")

    out = tmp_path / "enc.json"
    assert encode_speed.main(["--smoke", "--no-parts", "--json", str(out)]) == 0
    assert "RESULT encode_speed" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert results["fp32 eager"]["same_tokens_per_layer"] == [1.0] * 4  # the reference against itself
    assert results["before"]["same_tokens_per_layer"] == [1.0] * 4  # the training walk: the same ids
    assert all(r["images_per_s"] > 0 for k, r in results.items() if "images_per_s" in r)
