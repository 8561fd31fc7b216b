"""FVD: the Frechet distance between Gaussian fits of I3D features of real and generated clips.

Unterthiner et al. (2018): ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` over the 400 logits
of an Inception-I3D trained on Kinetics-400 (Carreira & Zisserman 2017), as the reference code does.

- Network: ``InceptionI3d``, the I3D of the paper in plain PyTorch (``Unit3D`` = Conv3d + BN + ReLU with
  TensorFlow "SAME" padding, inception mixes 3b..5c, max pools with SAME padding, an average pool over
  2 time steps and the whole 7x7 map, a 1x1x1 conv to 400 logits). Parameter names follow the widely
  used PyTorch port, so its Kinetics-400 checkpoint (``rgb_imagenet.pt``) loads as is:
  ``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``, ``Mixed_3b.b0.conv3d.weight``,
  ``Mixed_3b.b1b.bn.weight``, ..., ``logits.conv3d.weight``, ``logits.conv3d.bias``.
- Inputs: clips ``[b, 3, T, H, W]`` in ``[0, 1]``; every frame is resized to 224x224 (bilinear) and
  scaled to ``[-1, 1]`` as the reference FVD does (its TF1 resize samples pixel corners, PyTorch's
  samples pixel centres: values differ slightly from the TensorFlow implementation's).
- Features: the logits averaged over the remaining time steps, ``[b, 400]``.
- Clip length: time is halved three times (``Conv3d_1a``, ``MaxPool3d_4a``, ``MaxPool3d_5a``, each
  rounding up), then the average pool spans 2 steps, so a clip needs ``ceil(T / 8) >= 2``, i.e.
  ``T >= 9`` frames (``I3D_MIN_FRAMES``); the reference runs 16-frame clips.

Weights come only from a local file (``torch.load(weights_only=True)``, or a ``.safetensors`` file);
nothing is downloaded. A missing or unusable file raises ``MissingMetricDependency`` naming
``weights.fvd`` and the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spae.frechet import Moments, frechet_distance
from spae.metric_weights import WEIGHT_FILES, MissingMetricDependency, load_weights
from spae.video import frames_as_images

I3D_SIZE = 224  # frame side the Kinetics I3D was trained on
I3D_CLASSES = 400  # Kinetics-400
I3D_MIN_FRAMES = 9  # ceil(T / 8) >= 2 time steps for the 2-step average pool
BN_EPS = 1e-3  # as the TensorFlow original (the PyTorch port keeps it)

# name -> output channels of the branches (b0, b1a, b1b, b2a, b2b, b3b) of each inception mix
MIXES: tuple[tuple[str, tuple[int, int, int, int, int, int]], ...] = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """TensorFlow "SAME" padding of a ``(t, h, w)`` input as ``F.pad`` takes it (w first; the extra
    pixel of an odd total goes after): output side ``ceil(s / stride)``."""
    pads = []
    for s, k, st in zip(size, kernel, stride, strict=True):
        total = max(k - (st if s % st == 0 else s % st), 0)
        pads.append((total // 2, total - total // 2))
    (t0, t1), (h0, h1), (w0, w1) = pads
    return (w0, w1, h0, h1, t0, t1)


class Unit3D(nn.Module):
    """Conv3d (SAME padding, no bias) + BatchNorm3d + ReLU; the logits unit has a bias and neither."""

    def __init__(
        self, c_in: int, c_out: int, kernel: Sequence[int] = (1, 1, 1), stride: Sequence[int] = (1, 1, 1),
        logits: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.kernel, self.stride, self.is_logits = tuple(kernel), tuple(stride), logits
        self.conv3d = nn.Conv3d(c_in, c_out, self.kernel, self.stride, padding=0, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(c_out, eps=BN_EPS, momentum=0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
        return x if self.is_logits else F.relu(self.bn(x))


class MaxPool3dSamePadding(nn.Module):
    """Max pool with SAME padding (zeros: the inputs are ReLU outputs, so zeros never win over them)."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(
            F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride
        )


class InceptionModule(nn.Module):
    """Four branches concatenated over channels: 1x1x1 | 1x1x1 -> 3x3x3 | 1x1x1 -> 3x3x3 | pool -> 1x1x1."""

    def __init__(self, c_in: int, widths: Sequence[int]):
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(c_in, w0)
        self.b1a, self.b1b = Unit3D(c_in, w1a), Unit3D(w1a, w1b, (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, w2a), Unit3D(w2a, w2b, (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSamePadding((3, 3, 3), (1, 1, 1)), Unit3D(c_in, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x)))
        return torch.cat(branches, dim=1)  # [b, out_channels, t, h, w]


class InceptionI3d(nn.Module):
    """Inception-I3D: ``[b, 3, T, H, W]`` in [-1, 1] -> logits ``[b, classes, t']``, t' = ceil(T/8) - 1."""

    def __init__(self, num_classes: int = I3D_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSamePadding((1, 3, 3), (1, 2, 2))
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)), "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2))}
        self.mixes: list[str] = []  # run order after MaxPool3d_3a, pools included
        c = 192
        for name, widths in MIXES:
            if name in pools:
                pool, k = pools[name]
                setattr(self, pool, MaxPool3dSamePadding(k, (2, 2, 2)))
                self.mixes.append(pool)
            mix = InceptionModule(c, widths)
            setattr(self, name, mix)
            self.mixes.append(name)
            c = mix.out_channels
        self.logits = Unit3D(c, num_classes, logits=True)  # c = 1024

    def forward(self, x: Tensor) -> Tensor:
        for name in (
            "Conv3d_1a_7x7",
            "MaxPool3d_2a_3x3",
            "Conv3d_2b_1x1",
            "Conv3d_2c_3x3",
            "MaxPool3d_3a_3x3",
        ):
            x = getattr(self, name)(x)
        for name in self.mixes:
            x = getattr(self, name)(x)  # [b, 1024, ceil(T/8), ceil(H/32), ceil(W/32)] after Mixed_5c
        x = F.avg_pool3d(x, kernel_size=(2, *x.shape[3:]), stride=1)  # [b, 1024, t', 1, 1]; 2x7x7 at 224 px
        return self.logits(x).flatten(2)  # [b, classes, t']  (dropout: identity at inference)


def _read_state(path: str | Path) -> dict[str, Tensor]:
    """The state dict in ``path``: a ``.safetensors`` file or ``torch.load(weights_only=True)``."""
    if str(path).endswith(".safetensors") and Path(path).is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # header / format errors: not a safetensors file we can read
            raise MissingMetricDependency(
                f"weights.fvd={str(path)!r} could not be read as a safetensors file ({err}); "
                f"it must hold {WEIGHT_FILES['fvd']}"
            ) from err
    return load_weights("fvd", path)


class I3DFeatures(nn.Module):
    """I3D with local weights: clips ``[b, 3, T, H, W]`` in [0, 1] -> time-averaged logits ``[b, 400]``.

    ``size``: frame side fed to the network (224, the reference; smaller only for quick tests).
    """

    def __init__(self, net: InceptionI3d, size: int = I3D_SIZE):
        super().__init__()
        if size < 1:
            raise ValueError(f"I3D frame size must be positive, got {size}")
        self.net, self.size = net.eval(), size

    @classmethod
    def from_file(cls, path: str | Path, size: int = I3D_SIZE) -> I3DFeatures:
        net = InceptionI3d()
        try:
            net.load_state_dict(_read_state(path), strict=True)
        except RuntimeError as err:  # missing / unexpected keys, shape mismatches
            raise MissingMetricDependency(
                f"weights.fvd={str(path)!r} does not fit the Inception-I3D network: {err}; "
                f"it must hold {WEIGHT_FILES['fvd']}"
            ) from err
        return cls(net, size)

    @torch.no_grad()
    def forward(self, clips: Tensor) -> Tensor:
        check_clip(clips)
        b, c, t, h, w = clips.shape
        frames = frames_as_images(clips.float())  # [b*T, 3, H, W]
        frames = F.interpolate(frames, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = frames.reshape(b, t, c, self.size, self.size).transpose(1, 2)  # [b, 3, T, S, S]
        return self.net(2.0 * x - 1.0).mean(2)  # [b, 400]  logits averaged over time


def check_clip(clips: Tensor) -> None:
    """A clear ``ValueError`` unless ``clips`` is ``[b, 3, T, H, W]`` with ``T >= I3D_MIN_FRAMES``."""
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"FVD needs clips [b, 3, T, H, W] in [0, 1], got shape {tuple(clips.shape)}")
    t = clips.shape[2]
    if t < I3D_MIN_FRAMES:
        raise ValueError(
            f"FVD needs clips of at least {I3D_MIN_FRAMES} frames (I3D halves time 3 times, then pools "
            f"2 steps: ceil(T / 8) >= 2); got clips of {t} frames"
        )


class FVD:
    """FVD over a whole evaluation set: ``update(real, fake)`` per batch, then ``compute()``.

    ``i3d`` maps clips [b, 3, T, H, W] in [0, 1] to [b, 400]; ``update_features`` takes features computed
    elsewhere.
    """

    def __init__(self, i3d: I3DFeatures | None = None):
        self.i3d = i3d
        self.real, self.fake = Moments(), Moments()

    def update(self, real: Tensor, fake: Tensor) -> None:
        if real.shape != fake.shape:
            raise ValueError(
                f"FVD: real and fake clips differ in shape: {tuple(real.shape)} vs {tuple(fake.shape)}"
            )
        check_clip(real)
        assert self.i3d is not None, "FVD.update needs an I3D network; use update_features"
        feats = self.i3d(torch.cat([real, fake]))  # one batched pass: [2b, 400]
        self.update_features(feats[: real.shape[0]], feats[real.shape[0] :])

    def update_features(self, real: Tensor, fake: Tensor) -> None:
        self.real.update(real)
        self.fake.update(fake)

    def compute(self) -> float:
        if min(self.real.n, self.fake.n) < 2:
            raise ValueError(
                f"FVD needs at least 2 clips per set for a covariance, "
                f"got {self.real.n} real / {self.fake.n} fake"
            )
        return frechet_distance(*self.real.compute(), *self.fake.compute())
