"""Semantic scorers: the image and text embedding functions f_I, f_T of section 3.2.

A scorer maps images ``[b, 3, H, W]`` in ``[0, 1]`` and strings to L2-normalised features of one
space ``[*, d]``; the candidate pools (eq. 4-6) are dot products in it. Two implementations:

- ``OpenCLIPScorer``: any open_clip architecture (the paper uses CLIP ViT-L/14), with a pretrained
  tag or a local checkpoint, in fp32/fp16/bf16. ``pretrained=""`` builds random weights (tests and
  speed runs only; its ``identity`` says so).
- ``LabelProbeScorer``: for a labelled dataset when no CLIP weights are at hand. A small CNN
  classifier over the labels plus a real text encoder (the offline MiniLM sentence model). Each
  class gets a feature built from its words with the same template average as the vocabulary
  (eq. 5), ``normalize(sum_w f'_T(w))``; an image's feature is the probability-weighted,
  normalised sum of the class features, so "seven" and "7" score high for images of a seven.
- ``WordProbeScorer``: the label probe for images of several words each (``scenes://``): the same CNN
  with one sigmoid per word (multi-label, trained with binary cross-entropy), and one feature per word
  (eq. 5). ``f_I(I) = normalize(sum_w p(w | I) f'_T(w))``: every word the image shows pulls its feature
  towards the word's, so eq. 4-6 put several of them at the top of its pool.

``renormalize_text``: eq. 5 is a plain mean of unit vectors, so ``|f'_T(k)| <= 1`` and shrinks
when the templates disagree. Eq. 6 rescales per image, not per token, so keeping the norm
(``False``, the paper as written) favours tokens whose prompts agree; CLIP's zero-shot recipe
re-normalises (``True``). We default to the paper. ``tests/test_scorers.py`` prints both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from spae.codebook import minilm_folder
from spae.devices import resolve_device

Precision = Literal["fp32", "fp16", "bf16"]
PROBE_KINDS = ("label_probe", "word_probe")  # scorers trained here, saved as probe.json + probe.safetensors
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# A few prompts for CPU runs; the full 80 (open_clip's OPENAI_IMAGENET_TEMPLATES) are for GPU runs.
SIMPLE_TEMPLATES = ("a photo of a {}.", "{}")


@dataclass(frozen=True)
class ScorerConfig:
    kind: Literal["open_clip", "label_probe", "word_probe"] = "label_probe"
    arch: str = "ViT-L-14"  # open_clip architecture name
    pretrained: str = ""  # open_clip tag or checkpoint path; "" = random weights (tests / speed runs only)
    precision: Precision = "fp32"
    device: str = "auto"  # "auto" -> cuda if available, else cpu (spae.devices)
    probe_path: str = ""  # label / word probe: a folder written by LabelProbeScorer.save
    templates: str = "imagenet80"  # "imagenet80", "simple", or a text file with one "{}" template a line
    renormalize_text: bool = False  # re-normalise eq. 5's template mean (see module docstring)


# ----------------------------------------------------------------------------- interface


class SemanticScorer:
    """Image and text embeddings in one space, L2-normalised, float32 on the scorer's device."""

    dim: int  # d
    image_size: int  # the side images are resized to
    identity: dict  # what produced the features: kind, arch, weights, precision, hashes
    renormalize_text: bool = False
    device: torch.device = torch.device("cpu")

    def embed_images(self, images: Tensor) -> Tensor:  # [b, 3, H, W] in [0, 1] -> [b, d]
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> Tensor:  # m strings -> [m, d]
        raise NotImplementedError

    def embed_tokens(self, tokens: Tensor) -> Tensor:  # [m, context] ids of text_tokenizer -> [m, d]
        """``embed_texts`` of already tokenized texts (scorers whose ``text_tokenizer`` is not None)."""
        raise NotImplementedError(f"{type(self).__name__} has no separate text tokenizer")


def text_tokenizer(cfg: ScorerConfig) -> Callable[[list[str]], Tensor] | None:
    """The scorer's text tokenizer (strings -> ``[m, context]`` int64 ids for ``embed_tokens``), built
    without the model, so prompts can be tokenized on other CPUs; ``None`` when the scorer tokenizes
    inside its own text encoder (the label probe's sentence model)."""
    if cfg.kind != "open_clip":
        return None
    import open_clip

    return open_clip.get_tokenizer(cfg.arch)


def build_scorer(cfg: ScorerConfig) -> SemanticScorer:
    if cfg.kind == "open_clip":
        return OpenCLIPScorer(cfg)
    if cfg.kind == "label_probe":
        if not cfg.probe_path:
            raise ValueError(
                "scorer.probe_path: the label probe needs a saved probe folder (train_label_probe)"
            )
        return LabelProbeScorer.load(cfg.probe_path, device=cfg.device, renormalize_text=cfg.renormalize_text)
    if cfg.kind == "word_probe":
        if not cfg.probe_path:
            raise ValueError(
                "scorer.probe_path: the word probe needs a saved probe folder (train_word_probe)"
            )
        return WordProbeScorer.load(cfg.probe_path, device=cfg.device, renormalize_text=cfg.renormalize_text)
    raise ValueError(f"scorer.kind: {cfg.kind!r} is not one of 'open_clip', 'label_probe', 'word_probe'")


# ----------------------------------------------------------------------------- eq. 5 and eq. 6


def prompt_templates(spec: str) -> list[str]:
    """``"imagenet80"`` | ``"simple"`` | path to a text file -> ``"{}"``-style templates."""
    if spec == "imagenet80":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if spec == "simple":
        return list(SIMPLE_TEMPLATES)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"templates: {spec!r} is not 'imagenet80', 'simple' or an existing text file")
    templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(
            f"templates file {spec}: every non-empty line needs a '{{}}' placeholder; bad: {bad[:3]}"
        )
    return templates


def scorer_templates(cfg: ScorerConfig) -> list[str]:
    """The templates of eq. 5 for this scorer's vocabulary features.

    A label probe's class features were built with its own templates; the vocabulary must use the
    same ones, so a different ``cfg.templates`` is an error rather than a silent mismatch.
    """
    templates = prompt_templates(cfg.templates)
    if cfg.kind in PROBE_KINDS and cfg.probe_path:
        meta_path = Path(cfg.probe_path) / "probe.json"
        if meta_path.is_file():
            probe_templates = json.loads(meta_path.read_text())["templates"]
            if probe_templates != templates:
                more = " ..." if len(probe_templates) > 3 else ""
                raise ValueError(
                    f"scorer.templates={cfg.templates!r} gives {len(templates)} template(s), but the probe "
                    f"at {cfg.probe_path} built its class features with {len(probe_templates)}: "
                    f"{probe_templates[:3]}{more}; set scorer.templates to match (e.g. 'simple' or a file)"
                )
    return templates


def templates_hash(templates: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16]


@torch.no_grad()
def token_text_features(
    scorer: SemanticScorer,
    words: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 1024,
    renormalize: bool | None = None,
    prompt_tokens: Tensor | None = None,
) -> Tensor:
    """Eq. 5: ``f'_T(k) = 1/|p| sum_i f_T(p_i(k))`` for every word -> ``[v, d]`` float32.

    ``batch_size`` counts prompts per text-encoder call. ``renormalize`` defaults to the scorer's.
    ``prompt_tokens`` ``[v, t, context]``: the prompts already tokenized by ``prompt_token_ids`` (e.g. on
    other CPUs); the features are the same, computed in the same groups.
    """
    if not templates:
        raise ValueError("templates: need at least one prompt template")
    if prompt_tokens is not None and tuple(prompt_tokens.shape[:2]) != (len(words), len(templates)):
        raise ValueError(
            f"prompt_tokens: shape {tuple(prompt_tokens.shape)} is not [{len(words)} words, "
            f"{len(templates)} templates, context]"
        )
    renormalize = scorer.renormalize_text if renormalize is None else renormalize
    t = len(templates)
    per_call = max(1, batch_size // t)  # words per call
    out = []
    for start in range(0, len(words), per_call):
        chunk = words[start : start + per_call]
        if prompt_tokens is None:
            prompts = [tpl.replace("{}", w) for w in chunk for tpl in templates]
            feats = scorer.embed_texts(prompts).float()  # [w * t, d]
        else:
            ids = prompt_tokens[start : start + per_call]  # [w, t, context]
            feats = scorer.embed_tokens(ids.reshape(-1, ids.shape[-1])).float()  # [w * t, d]
        feats = feats.view(len(chunk), t, -1).mean(dim=1)  # [w, d]  eq. 5
        out.append(F.normalize(feats, dim=-1) if renormalize else feats)
    if not out:
        return torch.zeros(0, scorer.dim)
    return torch.cat(out)  # [v, d]


def prompt_token_ids(
    tokenizer: Callable[[list[str]], Tensor], words: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """Every word in every template, tokenized: ``[v, t, context]`` int64 (``text_tokenizer``'s ids), the
    prompts of ``token_text_features`` in its order."""
    prompts = [tpl.replace("{}", w) for w in words for tpl in templates]
    ids = tokenizer(prompts)  # [v * t, context]
    return ids.view(len(words), len(templates), -1)


def normalized_scores(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Eq. 6 over the whole vocabulary: ``[b, d] x [v, d] -> [b, v]`` in ``[0, 1]`` (small inputs only)."""
    s = image_features.float() @ text_features.float().T  # [b, v]  s'(I, k)
    lo = s.min(dim=1, keepdim=True).values
    hi = s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo).clamp_min(1e-12)  # eq. 6


# ----------------------------------------------------------------------------- image preprocessing


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """``[b, 3, H, W]`` -> ``[b, 3, size, size]``: shorter side to ``size`` (bicubic), centre crop."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected [b, 3, H, W] (or [b, 1, H, W]), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(
            images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )
        top, left = (nh - size) // 2, (nw - size) // 2
        images = images[..., top : top + size, left : left + size]
    return images.clamp(0, 1)


# ----------------------------------------------------------------------------- open_clip


class OpenCLIPScorer(SemanticScorer):
    def __init__(self, cfg: ScorerConfig):
        import open_clip

        self.cfg = cfg
        self.device = resolve_device(cfg.device, "scorer.device")
        self.renormalize_text = cfg.renormalize_text
        pretrained = (cfg.pretrained or None) if not cfg.arch.startswith("local-dir:") else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # random weights are the same in every process and actor
            self.model = open_clip.create_model(
                cfg.arch, pretrained=pretrained, precision=cfg.precision, device=self.device
            ).eval()
        self.tokenizer = text_tokenizer(cfg)
        self.dtype = _DTYPES[cfg.precision]
        pp = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        size = pp.get("size", getattr(self.model.visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        mean = pp.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = pp.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            self.dim = int(self.embed_texts(["a"]).shape[-1])
        self.identity = {**describe_scorer(cfg), "dim": self.dim, "image_size": self.image_size}
        if self.identity["random_weights"]:
            warnings.warn(f"open_clip scorer {cfg.arch}: {self.identity['weights']}", stacklevel=2)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:  # [b, 3, H, W] in [0, 1] -> [b, d]
        x = resize_center_crop(images.to(self.device), self.image_size)
        x = ((x - self.mean) / self.std).to(self.dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:  # m -> [m, d]
        return self.embed_tokens(self.tokenizer(list(texts)))  # [m, context] ids

    @torch.no_grad()
    def embed_tokens(self, tokens: Tensor) -> Tensor:  # [m, context] -> [m, d]
        tokens = tokens.to(self.device, torch.long)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RANDOM_INIT_SEED = 0
RANDOM_WEIGHTS = f"RANDOM WEIGHTS (seed {RANDOM_INIT_SEED}, no checkpoint; features carry no semantics)"


def describe_scorer(cfg: ScorerConfig) -> dict:
    """What determines a scorer's features, without building it (for job digests and vocab cards)."""
    if cfg.kind in PROBE_KINDS:
        path = Path(cfg.probe_path)
        if not (path / "probe.json").is_file():
            raise FileNotFoundError(f"scorer.probe_path: {path} has no probe.json (LabelProbeScorer.save)")
        meta = json.loads((path / "probe.json").read_text())
        held_out = {"map": meta.get("map")} if cfg.kind == "word_probe" else {}
        return {
            "kind": cfg.kind,
            **held_out,
            "probe_sha256": meta.get("sha256", ""),
            "class_words": meta["class_words"],
            "text_encoder": meta["text_encoder"],
            "accuracy": meta.get("accuracy"),
            "renormalize_text": cfg.renormalize_text,
        }
    import open_clip

    if cfg.arch.startswith("local-dir:"):  # open_clip_config.json (+ weights) in a folder; pretrained ignored
        from open_clip.factory import _find_checkpoint_in_dir

        folder = Path(cfg.arch[len("local-dir:") :])
        ckpt = _find_checkpoint_in_dir(folder) if folder.is_dir() else None
        model_cfg = json.loads((folder / "open_clip_config.json").read_text()) if folder.is_dir() else {}
        arch = {
            "local_dir_config_sha256": hashlib.sha256(
                json.dumps(model_cfg, sort_keys=True).encode()
            ).hexdigest()[:16]
        }
        weights = f"file:{Path(ckpt).name}:sha256={_file_sha256(ckpt)[:16]}" if ckpt else RANDOM_WEIGHTS
    else:
        arch = {}
        if not cfg.pretrained:
            weights = RANDOM_WEIGHTS
        elif os.path.isfile(cfg.pretrained):
            weights = f"file:{Path(cfg.pretrained).name}:sha256={_file_sha256(cfg.pretrained)[:16]}"
        else:
            weights = f"tag:{cfg.pretrained}"
    return {
        "kind": "open_clip",
        "arch": cfg.arch,
        **arch,
        "pretrained": cfg.pretrained,
        "weights": weights,
        "random_weights": weights == RANDOM_WEIGHTS,
        "precision": cfg.precision,
        "renormalize_text": cfg.renormalize_text,
        "open_clip_version": open_clip.__version__,
    }


# ----------------------------------------------------------------------------- label probe


class SentenceEncoder:
    """A sentence-transformers text encoder loaded from a local folder (no hub access)."""

    def __init__(self, name: str = "minilm", device: torch.device | str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.path = str(minilm_folder()) if name == "minilm" else name
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"text_encoder: {name!r} is neither 'minilm' nor a local model folder")
        self.model = SentenceTransformer(self.path, device=str(device))
        weights = Path(self.path) / "model.safetensors"
        self.identity = {
            "name": name if name == "minilm" else Path(self.path).name,
            "dim": int(self.model.get_embedding_dimension()),
            "weights_sha256": _file_sha256(weights)[:16] if weights.is_file() else "",
        }

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:  # [m, d]
        emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True)
        return F.normalize(emb.float(), dim=-1)


class ProbeNet(nn.Module):
    """A small CNN: ``[b, 3, s, s]`` in ``[0, 1]`` -> ``[b, classes]`` logits (``s`` divisible by 8)."""

    def __init__(self, num_classes: int, width: int = 16, image_size: int = 32):
        super().__init__()
        w, s = width, image_size // 8
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, stride=2, padding=1), nn.ReLU(),  # [b, w, s*4, s*4]
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # [b, 2w, s*2, s*2]
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # [b, 4w, s, s]
        )  # fmt: skip
        self.head = nn.Linear(4 * w * s * s, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x * 2 - 1).flatten(1))


class LabelProbeScorer(SemanticScorer):
    """Classifier probabilities over class features in a sentence encoder's space.

    ``f_I(I) = normalize(sum_c p(c | I) * g_c)`` with ``g_c = normalize(sum_{w in words_c} f'_T(w))``.
    """

    kind = "label_probe"
    unit_features = True  # class features are unit rows (the word probe's are not: see WordProbeScorer)

    def __init__(
        self,
        net: ProbeNet,
        class_features: Tensor,  # [classes, d]; rows are L2-normalised here
        meta: dict,
        device: str | torch.device = "cpu",
        encoder: SentenceEncoder | None = None,
        renormalize_text: bool | None = None,
    ):
        self.device = resolve_device(device, "scorer.device")
        self.net = net.to(self.device).eval()
        feats = class_features.float()
        if self.unit_features and not torch.allclose(
            feats.norm(dim=-1), torch.ones(feats.shape[0]), atol=1e-6
        ):
            feats = F.normalize(feats, dim=-1)  # unit rows (already-unit rows stay bit-identical)
        self.class_features = feats.to(self.device)  # [classes, d]
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.dim = int(self.class_features.shape[1])
        self.renormalize_text = meta["renormalize_text"] if renormalize_text is None else renormalize_text
        self._encoder = encoder
        self._hash = _tensor_hash(self.state_dict())
        self.identity = {
            "kind": self.kind,
            "probe_sha256": self._hash,
            "class_words": meta["class_words"],
            "text_encoder": meta["text_encoder"],
            "templates_sha256": templates_hash(meta["templates"]),
            "accuracy": meta.get("accuracy"),
            "dim": self.dim,
            "image_size": self.image_size,
            "renormalize_text": self.renormalize_text,
        }

    @property
    def encoder(self) -> SentenceEncoder:
        if self._encoder is None:  # loaded on first use: image-only work never pays for it
            self._encoder = SentenceEncoder(self.meta["text_encoder"]["name"], device=self.device)
        return self._encoder

    def state_dict(self) -> dict[str, Tensor]:
        sd = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        sd["class_features"] = self.class_features.detach().cpu().contiguous()
        return sd

    @torch.no_grad()
    def class_probs(self, images: Tensor) -> Tensor:  # [b, 3, H, W] -> [b, classes]
        x = resize_center_crop(images.to(self.device), self.image_size)
        return self.net(x).softmax(dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:  # [b, 3, H, W] in [0, 1] -> [b, d]
        return F.normalize(self.class_probs(images) @ self.class_features, dim=-1)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:  # [b, 3, H, W] in [0, 1] -> [b, classes]
        return self.net(resize_center_crop(images.to(self.device), self.image_size))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:  # m -> [m, d]
        return self.encoder(texts).to(self.device)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(path / "probe.safetensors"))
        (path / "probe.json").write_text(json.dumps({**self.meta, "sha256": self._hash}, indent=2))
        return path

    @classmethod
    def load(
        cls, path: str | Path, device: str = "auto", renormalize_text: bool | None = None
    ) -> LabelProbeScorer:
        """Weights-only: tensors from safetensors, everything else from JSON."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "probe.safetensors").is_file() or not (path / "probe.json").is_file():
            raise FileNotFoundError(
                f"probe_path: {path} has no probe.safetensors + probe.json (LabelProbeScorer.save)"
            )
        meta = json.loads((path / "probe.json").read_text())
        meta.pop("sha256", None)
        sd = load_file(str(path / "probe.safetensors"))
        net = ProbeNet(len(meta["class_words"]), width=int(meta["width"]), image_size=int(meta["image_size"]))
        net.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("net.")})
        return cls(net, sd["class_features"], meta, device=device, renormalize_text=renormalize_text)


def _tensor_hash(sd: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(sd):
        h.update(key.encode())
        h.update(sd[key].float().numpy().tobytes())
    return h.hexdigest()[:16]


def _fit_probe_net(
    x: Tensor,  # [n, 3, s, s]
    y: Tensor,  # [n] class ids or [n, outputs] targets, as ``loss`` takes them
    loss: Callable[[Tensor, Tensor], Tensor],
    outputs: int,
    max_shift: int,  # pixels of the random translation augmentation, each way
    dev: torch.device,
    steps: int,
    seed: int,
    width: int,
    batch_size: int,
    lr: float,
    holdout: float,
) -> tuple[ProbeNet, Tensor, Tensor]:
    """A ``ProbeNet`` trained on all but a seeded ``holdout`` fraction of the rows (AdamW, one-cycle LR);
    returns it in eval mode with the held-out and training row indices. The caller's RNG is untouched."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    n_hold = int(math.floor(holdout * x.shape[0]))
    hold, train = perm[:n_hold], perm[n_hold:]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        net = ProbeNet(outputs, width=width, image_size=x.shape[-1]).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(steps):
        idx = train[torch.randint(len(train), (batch_size,), generator=gen)]
        shift = torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
        xb = torch.roll(x[idx], shifts=shift, dims=(2, 3)).to(dev)
        step_loss = loss(net(xb), y[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        opt.step()
        sched.step()
    return net.eval(), hold, train


def train_label_probe(
    images: Tensor,  # [n, 3, H, W] in [0, 1]
    labels: Tensor,  # [n] int
    class_words: Sequence[Sequence[str]],
    text_encoder: str = "minilm",
    steps: int = 300,
    seed: int = 0,
    templates: str | Sequence[str] = "simple",
    image_size: int = 32,
    width: int = 16,
    batch_size: int = 64,
    lr: float = 3e-3,
    holdout: float = 0.2,
    renormalize_text: bool = False,
    device: str = "auto",
) -> LabelProbeScorer:
    """Train the probe's classifier on ``(images, labels)`` and build its class features.

    A ``holdout`` fraction (seeded) is kept out of training; its accuracy is stored in the probe.
    """
    num_classes = len(class_words)
    if num_classes < 2 or any(not ws for ws in class_words):
        raise ValueError("class_words: need >= 2 classes, each with at least one word")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels: values must lie in [0, {num_classes}) for {num_classes} class_words entries"
        )
    if image_size % 8:
        raise ValueError(f"image_size: {image_size} must be divisible by 8")
    dev = resolve_device(device)
    x = resize_center_crop(images.float(), image_size)  # [n, 3, s, s]
    y = labels.long()
    net, hold, train = _fit_probe_net(
        x, y, F.cross_entropy, num_classes, 2, dev, steps, seed, width, batch_size, lr, holdout
    )
    n_hold = len(hold)
    accuracy = None
    if n_hold:
        with torch.no_grad():
            pred = torch.cat(
                [net(x[hold[i : i + 512]].to(dev)).argmax(-1).cpu() for i in range(0, n_hold, 512)]
            )
        accuracy = float((pred == y[hold]).float().mean())

    encoder = SentenceEncoder(text_encoder, device=dev)
    tpl = prompt_templates(templates) if isinstance(templates, str) else list(templates)
    meta = {
        "class_words": [list(ws) for ws in class_words],
        "text_encoder": encoder.identity,
        "templates": tpl,
        "accuracy": accuracy,
        "holdout": n_hold,
        "train_images": len(train),
        "steps": steps,
        "seed": seed,
        "image_size": image_size,
        "width": width,
        "renormalize_text": renormalize_text,
    }
    probe = LabelProbeScorer(net, torch.zeros(num_classes, encoder.identity["dim"]), meta, dev, encoder)
    words = [w for ws in class_words for w in ws]
    feats = token_text_features(probe, words, tpl, renormalize=renormalize_text)  # [sum |words_c|, d] eq. 5
    sums, i = [], 0
    for ws in class_words:
        sums.append(feats[i : i + len(ws)].sum(dim=0))
        i += len(ws)
    class_features = F.normalize(torch.stack(sums), dim=-1)  # [classes, d]
    return LabelProbeScorer(net, class_features, meta, dev, encoder)


# ----------------------------------------------------------------------------- word probe (multi-label)


class WordProbeScorer(LabelProbeScorer):
    """The label probe with several words per image: ``p(w | I) = sigmoid(logit_w)`` for every word,
    independently, and ``f_I(I) = normalize(sum_w p(w | I) g_w)`` (``class_features``: one row ``g_w``
    per word, not unit). Saved and loaded as the label probe (``meta["words"]``, the held-out mean average
    precision ``meta["map"]``).

    ``g_w``: the word's direction in the text space (``word_directions``). The plain choice
    ``g_w = f'_T(w)`` makes the mean of a scene's ~10 word features, which is closest to generic words
    ("image", "color", "picture": each word's prompt shares them); so ``g_w`` is instead the least-energy
    direction over a contrast vocabulary that scores the probe's words exactly: ``g_w . f'_T(w') = [w = w']``
    for the probe's words, ``sum_k (g_w . f'_T(k))^2`` smallest over the contrast words. Then
    ``s'(I, w) = p(w | I)`` for the probe's words (eq. 4), the other words score low, and eq. 6 puts
    every word the image shows near 1.
    """

    kind = "word_probe"
    unit_features = False

    @property
    def words(self) -> list[str]:
        return list(self.meta["words"])

    @torch.no_grad()
    def class_probs(self, images: Tensor) -> Tensor:  # [b, 3, H, W] -> [b, words], each in [0, 1]
        return self.logits(images).sigmoid()


def word_directions(word_features: Tensor, contrast_features: Tensor, ridge: float = 0.1) -> Tensor:
    """``g_w`` of ``WordProbeScorer``: ``[w, d]`` word features A (eq. 5), ``[v, d]`` contrast features C ->
    ``[w, d]`` rows ``g`` with ``A g^T = I`` and the least ``|C g^T|^2 + ridge |g|^2``:
    ``G^T = S^-1 A^T (A S^-1 A^T)^-1``, ``S = C^T C + ridge I`` (float64)."""
    a, c = word_features.double(), contrast_features.double()
    s = c.T @ c + ridge * torch.eye(c.shape[1], dtype=torch.float64)  # [d, d]
    s_inv_a = torch.linalg.solve(s, a.T)  # [d, w]
    return torch.linalg.solve(a @ s_inv_a, s_inv_a.T).float()  # [w, d]  ((A S^-1 A^T)^-1 symmetric)


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """``[n, w]`` scores and 0/1 targets -> the mean over words (those with a positive) of the average
    precision of ranking the ``n`` images by the word's score (ties broken by row order)."""
    aps = []
    for j in range(scores.shape[1]):
        t = targets[:, j].float()
        if t.sum() == 0:
            continue
        order = torch.sort(scores[:, j].float(), descending=True, stable=True).indices
        hits = t[order]  # [n]
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)  # precision at each rank
        aps.append(float((precision * hits).sum() / hits.sum()))
    return sum(aps) / len(aps) if aps else float("nan")


def train_word_probe(
    images: Tensor,  # [n, 3, H, W] in [0, 1]
    targets: Tensor,  # [n, words] in [0, 1]: the words each image shows (0/1, or soft: their salience)
    words: Sequence[str],
    text_encoder: str = "minilm",
    steps: int = 600,
    seed: int = 0,
    templates: str | Sequence[str] = "simple",
    image_size: int = 64,
    width: int = 32,
    batch_size: int = 64,
    lr: float = 3e-3,
    holdout: float = 0.2,
    renormalize_text: bool = False,
    device: str = "auto",
    contrast_words: Sequence[str] = (),
    ridge: float = 0.1,
) -> WordProbeScorer:
    """Train the word probe's classifier (one binary cross-entropy per word, soft targets allowed) on
    ``(images, targets)`` and build its word features (eq. 5). A ``holdout`` fraction (seeded) is kept
    out of training; its mean average precision (``mean_average_precision``) is stored in the probe as
    ``meta["map"]``.
    ``contrast_words``: the vocabulary the word directions keep low (``word_directions``, with ``ridge``);
    none: ``g_w = f'_T(w)``, unit rows, as the label probe."""
    if len(words) < 2 or len(set(words)) != len(words):
        raise ValueError("words: need >= 2 distinct words")
    if targets.shape != (images.shape[0], len(words)):
        raise ValueError(
            f"targets: shape {tuple(targets.shape)} is not [{images.shape[0]} images, {len(words)} words]"
        )
    if image_size % 8:
        raise ValueError(f"image_size: {image_size} must be divisible by 8")
    dev = resolve_device(device)
    x = resize_center_crop(images.float(), image_size)  # [n, 3, s, s]
    y = targets.float()  # [n, w]
    net, hold, train = _fit_probe_net(  # max shift 1: regions are words
        x,
        y,
        F.binary_cross_entropy_with_logits,
        len(words),
        1,
        dev,
        steps,
        seed,
        width,
        batch_size,
        lr,
        holdout,
    )
    n_hold = len(hold)
    held_map = None
    if n_hold:
        with torch.no_grad():
            scores = torch.cat([net(x[hold[i : i + 512]].to(dev)).cpu() for i in range(0, n_hold, 512)])
        held_map = mean_average_precision(scores, y[hold] > 0)  # shown or not (targets may be soft)
    encoder = SentenceEncoder(text_encoder, device=dev)
    tpl = prompt_templates(templates) if isinstance(templates, str) else list(templates)
    meta = {
        "class_words": [[w] for w in words],
        "words": list(words),
        "text_encoder": encoder.identity,
        "templates": tpl,
        "accuracy": None,
        "map": held_map,
        "contrast_words": len(contrast_words),
        "ridge": ridge,
        "holdout": n_hold,
        "train_images": len(train),
        "steps": steps,
        "seed": seed,
        "image_size": image_size,
        "width": width,
        "renormalize_text": renormalize_text,
    }
    probe = WordProbeScorer(net, torch.zeros(len(words), encoder.identity["dim"]), meta, dev, encoder)
    feats = token_text_features(probe, list(words), tpl, renormalize=renormalize_text)  # [w, d] eq. 5
    if not contrast_words:
        return WordProbeScorer(net, F.normalize(feats, dim=-1), meta, dev, encoder)
    others = [w for w in dict.fromkeys(contrast_words) if w not in set(words)]
    contrast = token_text_features(probe, others, tpl, renormalize=renormalize_text)  # [v, d] eq. 5
    directions = word_directions(feats.cpu(), torch.cat([feats.cpu(), contrast.cpu()]), ridge)  # [w, d]
    return WordProbeScorer(net, directions, meta, dev, encoder)
