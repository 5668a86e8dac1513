"""Answer scores that mean something: calibrated, and low for regions unlike the training data.

A raw answer score is the mean probability of its tokens; a model that reads the wrong thing is
often still sure of its words.  A checkpoint folder may hold ``calibration.safetensors``:

* ``mean`` ``(C, D)`` and ``precision`` ``(D, D)``: statistics of region tokens on the model's
  training distribution, one mean per kind of region (what its caption says; ``C`` = 1: one mean
  for all) and the covariance around them; a region token's Mahalanobis distance from the nearest
  mean is the out-of-distribution signal (a box on a photo, on a background never seen): a token
  between the kinds the model knows is far from each of them though inside their overall spread;
* ``image_shift``, ``image_scale``, ``image_weights`` ``(E,)`` and ``image_bias`` ``()``
  (optional): a linear probe on whole-image descriptors (:func:`image_descriptors`: the mean and
  spread of the vision tower's feature maps) telling pictures like the training ones from
  pictures of unknown things (:func:`fit_image_probe`): a region token can look familiar on a
  picture unlike anything the model was trained on (a photo); the image's familiarity says so;
* ``weights`` ``(F,)`` and ``bias`` ``()``: a logistic (Platt) map from an answer's features
  (:func:`answer_features`: its raw score, its regions' distance and, with an image probe,
  its image's familiarity) to the probability that the answer is right, fitted on held-out data.

Without the file the engine returns the raw score, as before.  The fitting data is the caller's
(the toy world's is in ``toyworld/calibrate.py``); this module only fits and applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CALIBRATION_FILE",
    "FEATURES",
    "IMAGE_FEATURES",
    "ImageProbe",
    "REGION_FEATURES",
    "ScoreCalibration",
    "answer_features",
    "fit_image_probe",
    "fit_platt",
    "fit_region_statistics",
    "image_descriptors",
]

CALIBRATION_FILE = "calibration.safetensors"
REGION_FEATURES = ("logit_score", "log_distance", "log_distance_squared", "logit_score_x_log_distance")
IMAGE_FEATURES = ("log_familiarity", "logit_score_x_log_familiarity")
FEATURES = REGION_FEATURES + IMAGE_FEATURES
_EPS = 1e-6
_PROBE_CLAMP = 8.0  # probe logits beyond this say nothing more (and keep the features bounded)


def answer_features(score: float, region_distance: float, familiarity: float | None = None) -> list[float]:
    """An answer's raw score (the mean probability of its tokens) + the largest Mahalanobis
    distance among the regions it is about (+ its image's familiarity, the log-probability the
    image probe gives "like the training pictures", when the calibration has one) -> the features
    :data:`FEATURES` the logistic map reads, the first ``len(REGION_FEATURES)`` without a
    familiarity (the products let a far region or a strange image lower the trust in a sure
    answer)."""
    p = min(max(score, _EPS), 1.0 - _EPS)
    logit = math.log(p / (1.0 - p))
    far = math.log1p(max(0.0, region_distance))
    features = [logit, far, far * far, logit * far]
    if familiarity is not None:
        features += [familiarity, logit * familiarity]
    return features


def image_descriptors(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of B images (e.g. the vision tower's levels, ``(B, C_l, g_l, g_l)`` each) ->
    ``(B, 2 * sum C_l)`` descriptors: each channel's spatial mean and standard deviation (what
    the picture holds overall, and how busy it is)."""
    parts = [torch.cat([m.float().mean((2, 3)), m.float().std((2, 3))], 1) for m in levels]
    return torch.cat(parts, 1).detach().cpu()


@dataclass
class ImageProbe:
    """A linear probe on standardised image descriptors ``(B, E)``: "like the training pictures"
    (high) against "pictures of unknown things" (low)."""

    shift: torch.Tensor  # (E,)
    scale: torch.Tensor  # (E,)
    weights: torch.Tensor  # (E,)
    bias: torch.Tensor  # ()

    KEYS: ClassVar[tuple[str, ...]] = ("shift", "scale", "weights", "bias")

    def __call__(self, descriptors: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` -> ``(B,)`` log-probability of "like the training pictures" (its logit
        clamped to +-``_PROBE_CLAMP``)."""
        z = ((descriptors.float().cpu() - self.shift) / self.scale) @ self.weights + self.bias
        return torch.nn.functional.logsigmoid(z.clamp(-_PROBE_CLAMP, _PROBE_CLAMP))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The probe as ``calibration.safetensors`` stores it (keys ``image_<field>``)."""
        return {f"image_{k}": getattr(self, k) for k in self.KEYS}


def fit_image_probe(familiar: torch.Tensor, unfamiliar: torch.Tensor, l2: float = 1e-2) -> ImageProbe:
    """Descriptors ``(N, E)`` of pictures like the training ones and ``(M, E)`` of pictures of
    unknown things -> the :class:`ImageProbe` telling them apart (standardised features, L2
    ``l2``; both kinds weigh the same whatever their counts)."""
    if not len(familiar) or not len(unfamiliar):
        raise ValueError(f"a probe needs both kinds of pictures, got {len(familiar)} and {len(unfamiliar)}")
    x = torch.cat([familiar, unfamiliar]).float()
    shift, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    y = torch.cat([torch.ones(len(familiar)), torch.zeros(len(unfamiliar))]).bool()
    balance = torch.cat([torch.full((len(familiar),), len(x) / (2 * len(familiar))),
                         torch.full((len(unfamiliar),), len(x) / (2 * len(unfamiliar)))])  # fmt: skip
    weights, bias = fit_platt((x - shift) / scale, y, l2, sample_weights=balance)
    return ImageProbe(shift, scale, weights, bias)


@dataclass
class ScoreCalibration:
    """Region-token statistics and the logistic map of one model (see the module docstring)."""

    mean: torch.Tensor  # (C, D): one row per kind of region ((D,) read as one kind)
    precision: torch.Tensor  # (D, D)
    weights: torch.Tensor  # (F,)
    bias: torch.Tensor  # ()
    image_probe: ImageProbe | None = None  # None: the image's familiarity is not read

    def __post_init__(self) -> None:
        self.mean = self.mean.reshape(-1, self.precision.shape[0])
        wanted = len(FEATURES) if self.image_probe is not None else len(REGION_FEATURES)
        if len(self.weights) not in (0, wanted):  # 0: statistics only, not fitted yet
            raise ValueError(f"{len(self.weights)} weights, the features are {wanted}")

    @property
    def reads_images(self) -> bool:
        """Whether the score also reads the image's familiarity (the calibration has an image probe)."""
        return self.image_probe is not None

    def distance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Region tokens ``(N, D)`` -> Mahalanobis distances ``(N,)`` from the nearest of the
        training statistics' means."""
        x = tokens.detach().float().cpu()
        xp, mp = x @ self.precision, self.mean @ self.precision  # (N, D), (C, D)
        # (x - m) P (x - m) expanded, so no (N, C, D) tensor is formed (P is symmetric).
        d2 = (xp * x).sum(1, keepdim=True) - 2 * xp @ self.mean.T + (mp * self.mean).sum(1)  # (N, C)
        return d2.amin(1).clamp_min(0.0).sqrt()

    def familiarity(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Image descriptors ``(B, E)`` (:func:`image_descriptors`) -> ``(B,)`` log-probability
        that each picture is like the training ones (zeros without an image probe)."""
        if self.image_probe is None:
            return torch.zeros(len(descriptors))
        return self.image_probe(descriptors)

    def score(self, score: float, region_distance: float, familiarity: float | None = None) -> float:
        """The calibrated probability that an answer of raw ``score`` about regions at most
        ``region_distance`` away from the training statistics, on an image of ``familiarity``
        (required with an image probe, ignored without), is right."""
        if self.reads_images and familiarity is None:
            raise ValueError("this calibration reads the image's familiarity: pass it")
        features = answer_features(score, region_distance, familiarity if self.reads_images else None)
        f = torch.tensor(features, dtype=torch.float32)
        return float(torch.sigmoid(f @ self.weights + self.bias))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        tensors = {"mean": self.mean, "precision": self.precision, "weights": self.weights, "bias": self.bias}
        if self.image_probe is not None:
            tensors |= self.image_probe.tensors()
        features = FEATURES if self.reads_images else REGION_FEATURES
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(path),
                  metadata={"features": ",".join(features)})  # fmt: skip
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ScoreCalibration | None:
        """The folder's calibration, or None when it has none."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        t = load_file(str(path))
        probe = ImageProbe(**{k: t[f"image_{k}"] for k in ImageProbe.KEYS}) if "image_weights" in t else None
        return cls(t["mean"], t["precision"], t["weights"], t["bias"], probe)


def fit_region_statistics(
    tokens: torch.Tensor,
    shrinkage: float = 0.1,
    labels: Sequence[str] | None = None,
    min_count: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region tokens ``(N, D)`` of the training distribution -> means ``(C, D)`` and the precision
    ``(D, D)`` of their covariance shrunk towards its mean variance (``shrinkage`` in [0, 1]: a few
    thousand tokens do not pin down a full D x D covariance).

    ``labels``: per token its kind (e.g. its caption): one mean per kind with at least
    ``min_count`` tokens and the pooled covariance around them (class-conditional Mahalanobis);
    tokens of rarer kinds are left out.  None: one mean (``C`` = 1)."""
    x = tokens.detach().double()
    if labels is None:
        groups = [x]
    else:
        if len(labels) != len(x):
            raise ValueError(f"{len(labels)} labels for {len(x)} tokens")
        kinds: dict[str, list[int]] = {}
        for k, label in enumerate(labels):
            kinds.setdefault(label, []).append(k)
        groups = [x[rows] for rows in kinds.values() if len(rows) >= min_count]
        if not groups:
            raise ValueError(f"no kind of region has {min_count} tokens")
    means = torch.stack([g.mean(0) for g in groups])
    centred = torch.cat([g - m for g, m in zip(groups, means)])
    cov = centred.T @ centred / max(1, len(centred) - len(groups))
    target = torch.eye(x.shape[1], dtype=x.dtype) * cov.diagonal().mean()
    shrunk = (1.0 - shrinkage) * cov + shrinkage * target
    return means.float(), torch.linalg.inv(shrunk).float()


def fit_platt(
    features: torch.Tensor,
    right: torch.Tensor,
    l2: float = 1e-3,
    steps: int = 200,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression ``features (N, F)`` -> P(right) (``right`` ``(N,)`` bool), with a small
    L2 penalty on the weights (and optional per-sample weights ``(N,)``) -> ``weights (F,)``,
    ``bias ()``."""
    x, y = features.float(), right.float()
    per_sample = None if sample_weights is None else sample_weights.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        fit = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, weight=per_sample)
        loss = fit + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()
