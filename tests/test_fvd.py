"""FVD: the Inception-I3D network (port checkpoint layout), its loading errors and the Frechet distance."""

import pytest
import torch
from metric_helpers import numpy_frechet, streamed_distance

from spae.fvd import FVD, I3D_CLASSES, I3D_MIN_FRAMES, I3D_SIZE, I3DFeatures, InceptionI3d, same_padding
from spae.metrics import (
    OPTIONAL_METRICS,
    WEIGHT_FILES,
    InceptionOutput,
    MissingMetricDependency,
    OptionalMetrics,
    check_optional_metrics,
)
from spae.video import frames_as_images

N = 6  # clips per set
SIZE = 32  # frame side fed to I3D in these tests (224 in use: ~10 s per clip on this CPU)
T = 16  # frames, as the reference FVD


def random_i3d(seed: int = 0) -> InceptionI3d:
    torch.manual_seed(seed)
    net = InceptionI3d()
    for m in net.modules():  # unit-scale activations through the depth
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "rgb_imagenet.pt"
    torch.save(random_i3d().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def sets(i3d_file):
    """Clean, lightly and strongly noised clips and their I3D features from ONE batched pass."""
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(N, 3, T, 16, 16, generator=g)
    noise = torch.randn(clean.shape, generator=g)
    light, strong = (clean + 0.1 * noise).clamp(0, 1), (clean + 0.5 * noise).clamp(0, 1)
    feats = I3DFeatures.from_file(i3d_file, size=SIZE)(torch.cat([clean, light, strong]))
    assert feats.shape == (3 * N, I3D_CLASSES) and torch.isfinite(feats).all()
    f = feats.split(N)
    # each distance once: scipy's sqrtm of a 400x400 product takes seconds on a loaded CPU
    dist = {"self": fvd_of(f[0], f[0]), "light": fvd_of(f[0], f[1]), "strong": fvd_of(f[0], f[2])}
    return {"clips": (clean, light, strong), "feats": f, "fvd": dist}


def fvd_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    return streamed_distance(FVD(), real, fake)


def test_state_dict_keys_follow_the_pytorch_port_checkpoint():
    keys = set(InceptionI3d().state_dict())
    for key in (
        "Conv3d_1a_7x7.conv3d.weight", "Conv3d_1a_7x7.bn.running_mean", "Conv3d_2b_1x1.bn.running_var",
        "Conv3d_2c_3x3.conv3d.weight", "Mixed_3b.b0.conv3d.weight", "Mixed_3b.b1a.bn.bias",
        "Mixed_4f.b2b.conv3d.weight", "Mixed_5c.b3b.bn.weight", "logits.conv3d.weight", "logits.conv3d.bias",
    ):  # fmt: skip
        assert key in keys, key
    net = InceptionI3d()
    assert tuple(net.Conv3d_1a_7x7.conv3d.weight.shape) == (64, 3, 7, 7, 7)
    assert tuple(net.Mixed_5c.b1b.conv3d.weight.shape) == (384, 192, 3, 3, 3)
    assert tuple(net.logits.conv3d.weight.shape) == (400, 1024, 1, 1, 1)
    assert net.Conv3d_1a_7x7.bn.eps == 1e-3
    # every unit has a conv; only the logits unit has a bias
    biases = [k for k in keys if k.endswith("conv3d.bias")]
    assert biases == ["logits.conv3d.bias"]
    assert sum(k.endswith("conv3d.weight") for k in keys) == 3 + 9 * 6 + 1  # stem, 6 units per mix, logits


def test_same_padding_is_tensorflow_same():
    # 224 px, kernel 7, stride 2: out 112, total pad max(7 - 2, 0) = 5 -> 2 before, 3 after
    assert same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == (2, 3, 2, 3, 2, 3)
    # 9 frames, kernel 3, stride 2: 9 % 2 = 1 -> pad 3 - 1 = 2 -> (1, 1); 1x1x1 kernels never pad
    assert same_padding((9, 8, 8), (3, 1, 1), (2, 1, 1)) == (0, 0, 0, 0, 1, 1)


def test_network_geometry_time_steps_and_minimum_frames(i3d_file):
    net = I3DFeatures.from_file(i3d_file, size=SIZE).net
    for frames, steps in ((I3D_MIN_FRAMES, 1), (16, 1), (17, 2)):  # t' = ceil(T / 8) - 1
        out = net(torch.rand(1, 3, frames, SIZE, SIZE) * 2 - 1)
        assert tuple(out.shape) == (1, I3D_CLASSES, steps)
    assert I3DFeatures(InceptionI3d()).size == I3D_SIZE == 224
    feats = I3DFeatures.from_file(i3d_file, size=SIZE)
    with pytest.raises(ValueError, match=r"at least 9 frames.*got clips of 8 frames"):
        feats(torch.rand(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match=r"clips \[b, 3, T, H, W\].*\(2, 3, 16, 16\)"):
        feats(torch.rand(2, 3, 16, 16))


def test_features_are_the_time_averaged_logits_of_resized_frames_in_minus_one_one(i3d_file, sets):
    clean = sets["clips"][0][:2]
    feats = I3DFeatures.from_file(i3d_file, size=SIZE)
    frames = torch.nn.functional.interpolate(frames_as_images(clean), size=(SIZE, SIZE), mode="bilinear")
    x = frames.reshape(2, T, 3, SIZE, SIZE).transpose(1, 2) * 2 - 1  # [2, 3, T, 32, 32] in [-1, 1]
    with torch.no_grad():
        want = feats.net(x).mean(2)
    torch.testing.assert_close(feats(clean), want)
    torch.testing.assert_close(sets["feats"][0][:2], want, rtol=1e-4, atol=1e-4)


def test_fvd_zero_on_itself_matches_numpy_and_grows_with_noise(sets):
    clean, light, strong = sets["feats"]
    d = sets["fvd"]
    scale = float(clean.double().pow(2).sum(1).mean())
    assert abs(d["self"]) < 1e-6 * scale
    assert 1e-6 * scale < d["light"] < d["strong"]
    for name, fake in (("light", light), ("strong", strong)):
        assert d[name] == pytest.approx(numpy_frechet(clean, fake), rel=1e-3, abs=1e-6 * scale)


def test_fvd_update_on_clips_streams_batches(i3d_file, sets):
    clean, light, _ = sets["clips"]
    fvd = FVD(I3DFeatures.from_file(i3d_file, size=SIZE))
    fvd.update(clean[:4], light[:4])
    fvd.update(clean[4:], light[4:])
    assert fvd.compute() == pytest.approx(sets["fvd"]["light"], rel=1e-3)
    with pytest.raises(ValueError, match="at least 2 clips per set"):
        FVD().compute()


def test_missing_or_bad_weights_name_key_and_path(tmp_path, i3d_file):
    assert "fvd" in OPTIONAL_METRICS and WEIGHT_FILES["fvd"].startswith("an Inception-I3D (Kinetics-400)")
    with pytest.raises(MissingMetricDependency, match=r"weights\.fvd=PATH.*unset"):
        check_optional_metrics(["fvd"], {})
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(MissingMetricDependency, match=r"weights\.fvd=PATH.*nope\.pt"):
        OptionalMetrics(["fvd"], {"fvd": missing})
    with pytest.raises(MissingMetricDependency, match=r"weights\.fvd=.*nope\.pt.*not a file"):
        I3DFeatures.from_file(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a state dict")
    with pytest.raises(MissingMetricDependency, match=r"weights\.fvd=.*garbage\.pt.*could not be read"):
        I3DFeatures.from_file(garbage)
    (tmp_path / "garbage.safetensors").write_text("nope")
    with pytest.raises(MissingMetricDependency, match=r"weights\.fvd=.*garbage\.safetensors.*could not be"):
        I3DFeatures.from_file(tmp_path / "garbage.safetensors")
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "wrong.pt")  # e.g. an image network's file
    with pytest.raises(MissingMetricDependency, match=r"weights\.fvd=.*wrong\.pt.*does not fit.*I3D"):
        I3DFeatures.from_file(tmp_path / "wrong.pt")
    state = torch.load(i3d_file, weights_only=True)
    state["logits.conv3d.weight"] = torch.zeros(600, 1024, 1, 1, 1)  # a Kinetics-600 head
    torch.save(state, tmp_path / "k600.pt")
    with pytest.raises(MissingMetricDependency, match=r"(?s)k600\.pt.*does not fit.*size mismatch"):
        I3DFeatures.from_file(tmp_path / "k600.pt")


def test_port_checkpoint_without_batch_counters_and_safetensors_load(tmp_path, i3d_file, sets):
    from safetensors.torch import save_file

    state = torch.load(i3d_file, weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # an older torch's save
    torch.save(old, tmp_path / "old.pt")
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "i3d.safetensors")
    clip = sets["clips"][0][:2]
    for path in (tmp_path / "old.pt", tmp_path / "i3d.safetensors"):
        torch.testing.assert_close(
            I3DFeatures.from_file(path, size=SIZE)(clip), sets["feats"][0][:2], rtol=1e-4, atol=1e-4
        )


class FrameRecorder(torch.nn.Module):
    """Stands in for Inception-v3 (minutes on this CPU): records its inputs, pools = channel means."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        self.seen.append(tuple(images.shape))
        pool = images.mean((2, 3))  # [n, 3]
        return InceptionOutput(pool, torch.cat([pool, -pool], 1))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "vgg16.pth"
    torch.save(make_layers(cfgs["D"]).state_dict(), path)
    return str(path)


def test_optional_metrics_on_clips_run_image_metrics_per_frame_and_fvd_on_clips(
    tmp_path, i3d_file, vgg_file, sets
):
    from torchvision.models import inception_v3

    from spae.metrics import FID, LPIPS

    torch.save(
        inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "inc.pth"
    )
    weights = {"fid": str(tmp_path / "inc.pth"), "lpips": vgg_file, "fvd": i3d_file}
    opt = OptionalMetrics(["fid", "lpips", "fvd"], weights, fvd_size=SIZE)
    opt.fid.inception = FrameRecorder()
    clean, light = (c[:3] for c in sets["clips"][:2])  # 3 clips of 16 frames
    opt.update(clean, light)
    assert opt.fid.inception.seen == [(2 * 3 * T, 3, 16, 16)]  # real + fake frames, one pass
    out = opt.compute()
    assert set(out) == {"fid", "lpips_uncalibrated", "fvd"}
    fid = FID()
    fid.update_features(frames_as_images(clean).mean((2, 3)), frames_as_images(light).mean((2, 3)))
    assert out["fid"] == pytest.approx(fid.compute(), rel=1e-6)
    lpips = LPIPS.from_files(vgg_file)(frames_as_images(clean), frames_as_images(light))
    assert opt.lpips_n == 3 * T and out["lpips_uncalibrated"] == pytest.approx(float(lpips.mean()), rel=1e-5)
    # FVD's Gaussians are those of the I3D features of the clips
    for moments, feats in ((opt.fvd.real, sets["feats"][0][:3]), (opt.fvd.fake, sets["feats"][1][:3])):
        mu, sigma = moments.compute()
        torch.testing.assert_close(mu, feats.double().mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sigma, feats.double().T.cov(), rtol=1e-3, atol=1e-3)
    assert out["fvd"] > 0
    # FVD with images names the metric and the shape; the image path without FVD is unchanged
    with pytest.raises(ValueError, match=r"'fvd' needs clips.*\(3, 3, 16, 16\)"):
        opt.update(clean[:, :, 0], light[:, :, 0])
    with pytest.raises(ValueError, match=r"at least 9 frames.*8 frames"):
        opt.update(clean[:, :, :8], light[:, :, :8])
