"""Model and training configuration: JSON files loaded into dataclasses.

Like open_clip's ``model_configs/``, every architecture size lives in a JSON file
(``model/model_configs/*.json``); code never hard-codes a width.  A checkpoint folder
carries its own ``config.json`` so that any version can be rebuilt from that folder alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "CONFIG_DIR",
    "FEATURE_NORMS",
    "LMConfig",
    "ModelConfig",
    "OPEN_CLIP_CONFIG_DIR",
    "PromptConfig",
    "RegionEncoderConfig",
    "TRAINABLE_MODULES",
    "TrainConfig",
    "VisionConfig",
    "check_freeze",
    "dataclass_from_dict",
    "load_model_config",
    "save_json",
]

CONFIG_DIR = Path(__file__).parent / "model_configs"
OPEN_CLIP_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"

T = TypeVar("T")

PREPROCESS_MODES = ("squash", "gpt4roi")
PROMPT_TEMPLATES = ("roi_v0", "gpt4roi_v0", "chat_template")


@dataclass
class VisionConfig:
    """Frozen open_clip vision tower.

    ``open_clip_model`` names an open_clip architecture (built-in such as ``ViT-L-14`` or one of
    ``model/open_clip_configs``).  ``checkpoint`` is a local open_clip checkpoint file
    (.safetensors preferred; a path relative to the checkpoint folder is resolved there).
    Layer indices follow the Hugging Face ``hidden_states`` convention: 0 is the embedding output,
    ``-2`` the penultimate block.
    """

    open_clip_model: str = "roi-vit-tiny"
    checkpoint: str | None = None
    # None: the tower's own (open_clip ``preprocess_cfg``); a value the tower was not built for is
    # refused when the model is built (the positional embedding fixes the input side).
    image_size: int | None = None
    width: int = 128
    image_token_layer: int = -2
    region_layers: list[int] = field(default_factory=lambda: [-5, -4, -3, -2])
    mean: list[float] | None = None  # None: the tower's preprocess_cfg
    std: list[float] | None = None
    interpolation: str | None = None  # "bicubic" | "bilinear"; None: the tower's preprocess_cfg
    # "squash": resize to image_size x image_size (no crop, boxes stay inside); "gpt4roi": the
    # official demo's resize (short side to image_size, no crop, then bilinear to the square).
    preprocess: str = "squash"

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(f"vision.preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}")


FEATURE_NORMS = ("none", "batch", "layer")


@dataclass
class RegionEncoderConfig:
    """GPT4RoI's multi-level RoI module (``MLVLROIQueryModule``) with every size configurable.

    ``level_sizes`` are the feature-map sides of the pyramid, one per entry of
    ``VisionConfig.region_layers`` (GPT4RoI: 128, 64, 32, 16 for a 16x16 ViT grid).
    """

    fuse_channels: int = 64
    level_sizes: list[int] = field(default_factory=lambda: [32, 16, 8, 8])
    num_fuse: int = 3
    gn_groups: int = 8
    roi_output_size: int = 7
    sampling_ratio: int = 2
    hidden_dim: int = 128
    pos_hidden_dim: int = 64
    # Sin/cos features of the box at frequencies pi*1..pi*N before the box MLP (0: raw coordinates,
    # as GPT4RoI).  A ReLU MLP on 4 raw numbers learns sharp position boundaries slowly (spectral
    # bias); Fourier features make "which third / left of" readable from the first step.
    pos_fourier_bands: int = 0
    out_norm: bool = False  # LayerNorm on the region token (GPT4RoI: none); keeps it at the LM's scale
    # Normalisation of the pooled visual part before the box embedding is added: "none" (GPT4RoI),
    # "batch" (per-feature statistics over boxes) or "layer" (per box; older configs' ``true``).
    # "layer" is scale-invariant per box, and most of what varies between boxes is the overall scale
    # of the pooled features, so it leaves a near-constant vector and the region token carries only
    # the box position (figure: docs/design-notes.md).
    feature_norm: str = "none"
    # Weight of the box's pooled bins outside a region's mask (a brush region): 0 pools the painted
    # pixels only, which a model never trained with masks reads as a token far from its training
    # data; a floor keeps the box's context and still favours the painted part (docs/label-studio.md).
    mask_floor: float = 0.6
    # Focal encode: a box whose larger side is below ``focal_below`` of its image's larger side (in
    # pixels, model.focal.small_boxes) is a few model-input pixels wide; its visual part
    # is pooled instead from a square crop around it, re-encoded, in which the box fills
    # ``focal_fill`` of the side; its box embedding stays the original box's.  0: off (GPT4RoI).
    focal_below: float = 0.0
    focal_fill: float = 0.12
    # True: a focal box's token is the mean of its crop's token and its image's (the image keeps
    # the object's scale, which size words and "larger than" need); False: the crop's alone.
    focal_keep_image: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_floor <= 1.0:
            raise ValueError(f"region.mask_floor must be in [0, 1], got {self.mask_floor}")
        if not 0.0 <= self.focal_below < 1.0 or not 0.0 < self.focal_fill <= 1.0:
            raise ValueError(
                f"region.focal_below must be in [0, 1) and focal_fill in (0, 1], got "
                f"{self.focal_below} and {self.focal_fill}"
            )
        if isinstance(self.feature_norm, bool):  # configs written before the choice existed
            self.feature_norm = "layer" if self.feature_norm else "none"
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"region.feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")


@dataclass
class LMConfig:
    """Causal language model: pretrained weights (a local Hugging Face folder, relative to the
    checkpoint folder, or a Hub repo id) or an architecture built from ``hf_config``."""

    pretrained_path: str | None = None
    hf_config: dict[str, Any] | None = None
    tokenizer_path: str | None = None
    lora: dict[str, Any] | None = None
    max_length: int = 512
    # LoRA versions: SHA-256 over the base LM's weight files (model.lm.base_fingerprint); a
    # different base under the same path or repo id is refused at load.
    base_sha256: str | None = None


@dataclass
class PromptConfig:
    """Conversation template by name (see ``model.prompt``): ``roi_v0`` (this project's: LLaVA-v0
    turns, answers end with EOS), ``gpt4roi_v0`` (as the official GPT4RoI checkpoints were trained:
    answers end with "\\n###") or ``chat_template`` (the tokenizer's own chat template)."""

    system: str = "A chat between a curious human and an artificial intelligence assistant."
    image_intro: str = "The <image> provides an overview of the picture."
    template: str = "roi_v0"

    def __post_init__(self) -> None:
        if self.template not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt.template must be one of {PROMPT_TEMPLATES}, got {self.template!r}")


@dataclass
class ModelConfig:
    """Everything needed to build a :class:`model.mllm.RegionMLLM`."""

    name: str = "roi-tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    region: RegionEncoderConfig = field(default_factory=RegionEncoderConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_dict(cls, data)


TRAINABLE_MODULES = ("region_encoder", "projector", "lm")
"""The modules stage 2 trains; ``TrainConfig.freeze`` may hold some of them."""


def check_freeze(freeze: Sequence[str], stage: int = 2) -> frozenset[str]:
    """``freeze`` as a set after checking it: names of :data:`TRAINABLE_MODULES`, stage 2 only, not
    all of them (ValueError naming the problem)."""
    frozen = frozenset(freeze)
    unknown = sorted(frozen - set(TRAINABLE_MODULES))
    if unknown:
        raise ValueError(f"cannot freeze {unknown}: the trainable modules are {list(TRAINABLE_MODULES)}")
    if stage == 1 and frozen:
        raise ValueError("stage 1 trains the region encoder alone: nothing can be frozen in it")
    if frozen == set(TRAINABLE_MODULES):
        raise ValueError("every trainable module is frozen: nothing would be trained")
    return frozen


@dataclass
class TrainConfig:
    """One training run (stage 1, stage 2 or a fine-tuning job)."""

    stage: int = 2
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    lm_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 25
    num_workers: int = 0
    replay_fraction: float = 0.5
    image_token_dropout: float = 0.0  # share of prompts whose image tokens are hidden (see model.train)
    # Weight of the per-box attribute loss on the region tokens (model.training.aux_heads; records with
    # ``box_labels`` only, i.e. the synthetic set).  0: the LM loss alone, as GPT4RoI.
    region_aux_weight: float = 0.0
    # The same loss also asks each labelled box's column and row (thirds of the image): position
    # put into the token as plainly as content (docs/default-model.md: an axis the LM never read).
    region_aux_position: bool = False
    # Update the running statistics of the region encoder's batch norm (False: keep the parent's,
    # as fine-tuning on a few corrections should).
    update_norm_stats: bool = True
    # Read small boxes from focal crops in training too (model.focal; needs ``region.focal_below``).
    # False: every box is pooled from its image in training; crops are used at inference only.
    focal_crops: bool = True
    # Stage 2 only: modules kept frozen besides the vision tower (any of ``TRAINABLE_MODULES``); a
    # fine-tuning job can hold the region encoder so the box geometry a build taught stays put.
    freeze: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        frozen = check_freeze(self.freeze, self.stage)  # a bad recipe fails when loaded, not mid-build
        if "region_encoder" in frozen and self.region_aux_weight > 0:
            raise ValueError("region_aux_weight trains the region encoder, which freeze holds: use one")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, data)


def dataclass_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (nested) dataclass from a dict, rejecting unknown keys with a clear message."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = (
            known[name].default_factory if known[name].default_factory is not dataclasses.MISSING else None
        )
        sub = default() if default is not None else None
        if dataclasses.is_dataclass(sub) and not isinstance(value, type(sub)):
            kwargs[name] = dataclass_from_dict(type(sub), value)  # a null section fails here, not later
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """Load a model config by file path, checkpoint folder, or bundled name (``roi-tiny``)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"model config {name_or_path!r} not found; bundled configs: {available}")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically enough for config files (write then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
