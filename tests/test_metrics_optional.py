import math

import pytest
import torch
from metric_helpers import numpy_frechet as numpy_fid
from metric_helpers import streamed_distance
from torchvision.models import inception_v3
from torchvision.models.vgg import cfgs, make_layers

from spae.metrics import (
    FID,
    LPIPS,
    VGG16_CHANNELS,
    InceptionFeatures,
    InceptionScore,
    MissingMetricDependency,
    OptionalMetrics,
    check_optional_metrics,
    inception_score_from_probs,
)

N = 3  # images per set: Inception-v3 at 299 px is heavy on the CPU
D = 64  # FID numerics on the first D pool dims: scipy's sqrtm of a 2048x2048 matrix takes minutes here


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    for m in net.modules():  # unit-scale activations (the default init makes the pool features ~1e-8)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("w") / "inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def sets(inception_file):
    """Clean, lightly and strongly noised images and their Inception outputs from ONE batched pass."""
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(N, 3, 32, 32, generator=g)
    light = (clean + 0.05 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    strong = (clean + 0.4 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    out = InceptionFeatures.from_file(inception_file)(torch.cat([clean, light, strong]))
    assert out.pool.shape == (3 * N, 2048) and out.logits.shape == (3 * N, 1000)
    pools, logits = out.pool.split(N), out.logits.split(N)
    return {"images": (clean, light, strong), "pool": pools, "logits": logits}


def fid_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    return streamed_distance(FID(), real, fake)


def test_fid_zero_on_itself_grows_with_noise_and_matches_numpy(sets):
    clean, light, strong = (p[:, :D] for p in sets["pool"])
    scale = float(clean.pow(2).sum(1).mean())
    assert abs(fid_of(clean, clean)) < 1e-6 * scale
    d_light, d_strong = fid_of(clean, light), fid_of(clean, strong)
    assert 1e-6 * scale < d_light < d_strong
    for fake in (light, strong):
        assert fid_of(clean, fake) == pytest.approx(numpy_fid(clean, fake), rel=1e-4, abs=1e-6 * scale)


def test_fid_formula_on_small_features_by_hand():
    # 1-d features: real {0, 2} (mu 1, var 2), fake {1, 5} (mu 3, var 8) -> 4 + 2 + 8 - 2*4 = 6
    fid = FID()
    fid.update_features(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [5.0]]))
    assert fid.compute() == pytest.approx(6.0)


def test_inception_score_formula_by_hand():
    # p1 = [.5, .5], p2 = [1, 0]: p(y) = [.75, .25]
    kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl2 = math.log(1 / 0.75)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    assert inception_score_from_probs(probs) == pytest.approx(math.exp((kl1 + kl2) / 2))
    assert inception_score_from_probs(torch.eye(4)) == pytest.approx(4.0)  # confident and diverse
    assert inception_score_from_probs(torch.eye(4)[[2, 2, 2]]) == pytest.approx(1.0)  # all the same
    # the streamed score over batches equals the one-shot formula
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    score = InceptionScore()
    score.update_logits(logits[:3])
    score.update_logits(logits[3:])
    assert score.compute() == pytest.approx(inception_score_from_probs(logits.softmax(-1)))


def test_inception_score_of_identical_confident_predictions_is_one():
    score = InceptionScore()
    score.update_logits(torch.tensor([[20.0, 0.0, 0.0]]).repeat(6, 1))
    assert score.compute() == pytest.approx(1.0, abs=1e-6)


def test_optional_metrics_share_one_inception_pass(inception_file, sets):
    clean, light, _ = sets["images"]
    opt = OptionalMetrics(["fid", "is"], {"fid": inception_file, "is": inception_file})
    assert opt.fid.inception is opt.inception_score.inception
    opt.update(clean, light)
    # the 2048-d moments FID is computed from are those of the real / reconstructed features
    for moments, feats in ((opt.fid.real, sets["pool"][0]), (opt.fid.fake, sets["pool"][1])):
        mu, sigma = moments.compute()
        torch.testing.assert_close(mu, feats.double().mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sigma, feats.double().T.cov(), rtol=1e-3, atol=1e-5)
    got = opt.inception_score.compute()
    assert got == pytest.approx(inception_score_from_probs(sets["logits"][1].softmax(-1)), rel=1e-4)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])
    for m in features.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("w") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)  # vgg16 key names
    return str(path)


def test_lpips_zero_symmetric_and_grows_with_noise(vgg_file):
    lpips = LPIPS.from_files(vgg_file)
    assert lpips.name == "lpips_uncalibrated"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    noise = torch.randn(x.shape, generator=g)
    light, strong = (x + 0.05 * noise).clamp(0, 1), (x + 0.3 * noise).clamp(0, 1)
    assert torch.equal(lpips(x, x), torch.zeros(4))
    torch.testing.assert_close(lpips(x, strong), lpips(strong, x))
    d_light, d_strong = lpips(x, light), lpips(x, strong)
    assert (d_light > 0).all() and (d_strong > d_light).all()


def test_lpips_linear_weights_weigh_channels(vgg_file, tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    uniform = LPIPS.from_files(vgg_file)(x, y)
    # linear weights 1/C everywhere (published key layout) reproduce the uniform channel mean
    lin = {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 1.0 / c) for i, c in enumerate(VGG16_CHANNELS)}
    torch.save(lin, tmp_path / "lin.pth")
    calibrated = LPIPS.from_files(vgg_file, tmp_path / "lin.pth")
    assert calibrated.name == "lpips"
    torch.testing.assert_close(calibrated(x, y), uniform)
    # doubling every weight doubles the distance
    torch.save({f"lin{i}": 2 * w for i, w in enumerate(lin.values())}, tmp_path / "lin2.pth")
    torch.testing.assert_close(LPIPS.from_files(vgg_file, tmp_path / "lin2.pth")(x, y), 2 * uniform)


def test_missing_or_bad_weights_name_key_and_path(tmp_path):
    with pytest.raises(MissingMetricDependency, match=r"weights\.fid=PATH.*unset"):
        check_optional_metrics(["fid"], {})
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(MissingMetricDependency, match=r"weights\.is=PATH.*nope\.pth"):
        check_optional_metrics(["is"], {"is": missing})
    with pytest.raises(MissingMetricDependency, match=r"weights\.lpips_linear=PATH.*nope\.pth"):
        check_optional_metrics(["lpips"], {"lpips": __file__, "lpips_linear": missing})
    with pytest.raises(ValueError, match="unknown weights key"):
        check_optional_metrics(["fid"], {"fidd": missing})
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a state dict")
    with pytest.raises(MissingMetricDependency, match=r"weights\.lpips=.*garbage\.pth.*could not be read"):
        LPIPS.from_files(garbage)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(MissingMetricDependency, match=r"weights\.lpips=.*wrong\.pth.*does not fit"):
        LPIPS.from_files(tmp_path / "wrong.pth")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "wrong_inc.pth")
    with pytest.raises(MissingMetricDependency, match=r"weights\.fid=.*wrong_inc\.pth.*does not fit"):
        InceptionFeatures.from_file(tmp_path / "wrong_inc.pth")
