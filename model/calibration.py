"""Answer scores that mean something: calibrated, and low for regions unlike the training data.

A raw answer score is the mean probability of its tokens; a model that reads the wrong thing is
often still sure of its words.  A checkpoint folder may hold ``calibration.safetensors``:

* ``mean`` ``(C, D)`` and ``precision`` ``(D, D)``: statistics of region tokens on the model's
  training distribution, one mean per kind of region (what its caption says; ``C`` = 1: one mean
  for all) and the covariance around them; a region token's Mahalanobis distance from the nearest
  mean is the out-of-distribution signal (a box on a photo, on a background never seen): a token
  between the kinds the model knows is far from each of them though inside their overall spread;
* ``weights`` ``(F,)`` and ``bias`` ``()``: a logistic (Platt) map from an answer's features
  (:func:`answer_features`: its raw score and its regions' distance) to the probability that the
  answer is right, fitted on held-out data.

Without the file the engine returns the raw score, as before.  The fitting data is the caller's
(the toy world's is in ``toyworld/calibrate.py``); this module only fits and applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "CALIBRATION_FILE",
    "FEATURES",
    "ScoreCalibration",
    "answer_features",
    "fit_platt",
    "fit_region_statistics",
]

CALIBRATION_FILE = "calibration.safetensors"
FEATURES = ("logit_score", "log_distance", "log_distance_squared", "logit_score_x_log_distance")
_EPS = 1e-6


def answer_features(score: float, region_distance: float) -> list[float]:
    """An answer's raw score (the mean probability of its tokens) + the largest Mahalanobis
    distance among the regions it is about -> the features :data:`FEATURES` the logistic map
    reads (the products let a far region lower the trust in a sure answer)."""
    p = min(max(score, _EPS), 1.0 - _EPS)
    logit = math.log(p / (1.0 - p))
    far = math.log1p(max(0.0, region_distance))
    return [logit, far, far * far, logit * far]


@dataclass
class ScoreCalibration:
    """Region-token statistics and the logistic map of one model (see the module docstring)."""

    mean: torch.Tensor  # (C, D): one row per kind of region ((D,) read as one kind)
    precision: torch.Tensor  # (D, D)
    weights: torch.Tensor  # (F,)
    bias: torch.Tensor  # ()

    def __post_init__(self) -> None:
        self.mean = self.mean.reshape(-1, self.precision.shape[0])

    def distance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Region tokens ``(N, D)`` -> Mahalanobis distances ``(N,)`` from the nearest of the
        training statistics' means."""
        x = tokens.detach().float().cpu()
        xp, mp = x @ self.precision, self.mean @ self.precision  # (N, D), (C, D)
        # (x - m) P (x - m) expanded, so no (N, C, D) tensor is formed (P is symmetric).
        d2 = (xp * x).sum(1, keepdim=True) - 2 * xp @ self.mean.T + (mp * self.mean).sum(1)  # (N, C)
        return d2.amin(1).clamp_min(0.0).sqrt()

    def score(self, score: float, region_distance: float) -> float:
        """The calibrated probability that an answer of raw ``score`` about regions at most
        ``region_distance`` away from the training statistics is right."""
        f = torch.tensor(answer_features(score, region_distance), dtype=torch.float32)
        return float(torch.sigmoid(f @ self.weights + self.bias))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        tensors = {"mean": self.mean, "precision": self.precision, "weights": self.weights, "bias": self.bias}
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(path),
                  metadata={"features": ",".join(FEATURES)})  # fmt: skip
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ScoreCalibration | None:
        """The folder's calibration, or None when it has none."""
        path = Path(folder) / CALIBRATION_FILE
        if not path.is_file():
            return None
        t = load_file(str(path))
        return cls(t["mean"], t["precision"], t["weights"], t["bias"])


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
    features: torch.Tensor, right: torch.Tensor, l2: float = 1e-3, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression ``features (N, F)`` -> P(right) (``right`` ``(N,)`` bool), with a small
    L2 penalty on the weights -> ``weights (F,)``, ``bias ()``."""
    x, y = features.float(), right.float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()
