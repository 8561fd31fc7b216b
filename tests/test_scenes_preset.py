"""The ``scenes`` preset (model + loss) and ``spae demo dataset=scenes``'s plan."""

from __future__ import annotations

import torch

from jobs.demo import DemoConfig, scene_model, stages, validate
from pipeline.steps.train import TrainJobConfig, preset_base
from spae.codebook import load_codebook
from spae.config import from_dict, merge
from spae.losses import loss_preset
from spae.model import SPAE, preset
from spae.pyramid import PyramidSpec
from spae.scenes import WORDS


def test_the_scenes_preset_is_the_papers_shape_at_64_px_with_every_scene_word_kept():
    cfg = preset("scenes")
    assert cfg.image_size == 64 and cfg.network.downsample_factor == 8  # the paper's 128 -> 16
    spec = PyramidSpec(cfg.pyramid)
    assert [n for n in spec.token_counts] == [1, 4, 16, 64, 64]  # 2^k x 2^k, the last layer repeated
    codebook = load_codebook(cfg.codebook)
    assert len(codebook) == 4096 and set(WORDS) <= set(codebook.words)
    loss = loss_preset("scenes")
    assert loss.semantic_layers == 3 and loss.thresholds == (0.98, 0.95, 0.8) and loss.dynamic_weight
    assert loss.semantic_targets == "ranked"


def test_the_demo_trains_the_preset_at_32_px_on_the_same_latent():
    model = from_dict(TrainJobConfig, merge(preset_base("scenes"), {"model": scene_model(32)})).model
    assert model.image_size == 32 and model.latent_size == preset("scenes").latent_size == (8, 8)
    codebook = load_codebook(model.codebook)
    torch.manual_seed(0)
    out = SPAE(model, codebook)(torch.rand(2, 3, 32, 32))
    assert [tuple(i.shape) for i in out.quant.ids] == [(2, 1, 1), (2, 2, 2), (2, 4, 4), (2, 8, 8), (2, 8, 8)]


def _by_name(cfg: DemoConfig) -> dict[str, dict]:
    return {stage.name: stage.config for stage in stages(cfg)}


def test_the_scenes_plan_scores_with_the_word_probe_on_scenes(tmp_path):
    cfg = DemoConfig(output=str(tmp_path), dataset="scenes", track=False, probe_steps=1000)
    validate(stages(cfg))
    c = _by_name(cfg)
    assert c["train"]["preset"] == "scenes" and c["train"]["model"] == scene_model(32)
    assert c["train"]["data"]["images"]["uri"] == "scenes://train?limit=20000&size=32"
    assert c["evaluate"]["source"]["uri"] == "scenes://test?limit=1000&size=32"
    for name in ("probe", "vocab", "pools (train)", "pools (test)"):
        assert c[name]["scorer"]["kind"] == "word_probe"
    assert c["probe"]["probe_train_uri"] == "scenes://train?limit=5000&size=32"
    assert c["probe"]["image_size"] == 32 and c["probe"]["probe_steps"] == 1000
    big = _by_name(DemoConfig(output=str(tmp_path), dataset="scenes", scene_size=64, use_gpu=True))
    assert "model" not in big["train"] and big["train"]["data"]["images"]["uri"].endswith("&size=64")
    assert "colour scene" in big["report"]["title"]


def test_ranked_targets_give_position_j_the_candidate_of_rank_j_mod_the_pool():
    from spae.losses import LossConfig, sample_semantic_targets

    ids = torch.tensor([[5, 6, 7, 8, -1], [1, 2, 3, 4, 9], [1, 2, 3, 4, 5]])
    nan = float("nan")
    scores = torch.tensor(
        [[1.0, 0.99, 0.9, 0.5, nan], [0.96, 1.0, 0.96, 0.91, 0.2], [0.5, 0.4, 0.3, 0.2, 0.1]]
    )
    l1, l2, l3 = sample_semantic_targets(ids, scores, (0.98, 0.95, 0.9), (1, 4, 16), mode="ranked")
    assert l1.tolist() == [[5], [2], [-1]]  # the top word; none passes 0.98 in the third image
    assert l2.tolist() == [[5, 6, 5, 6], [2, 1, 3, 2], [-1] * 4]  # ties keep pool order
    assert l3[0].tolist() == [5, 6, 7] * 5 + [5] and l3[1].tolist() == [2, 1, 3, 4] * 4
    uniform = sample_semantic_targets(ids, scores, (0.98, 0.95), (1, 4), torch.Generator().manual_seed(0))
    assert set(uniform[1][0].tolist()) <= {5, 6}  # drawn from C_2, positions independent
    try:
        LossConfig(semantic_targets="sorted")
    except ValueError as e:
        assert "semantic_targets='sorted'" in str(e)
    else:
        raise AssertionError("an unknown semantic_targets was accepted")
