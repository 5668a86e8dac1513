"""GPT4RoI's multi-level region encoder: one LM-width token per box.

Pipeline (sizes from :class:`model.config.RegionEncoderConfig`):

1. ViT block outputs ``(B, C, g, g)`` (one per level) are resized to a pyramid ``level_sizes``.
2. :class:`MultiLevelFuse`: CoordConv (x, y channels) + per-level 1x1 conv to ``F`` channels, then
   ``num_fuse`` "scale shuffle" rounds.  Each round rebuilds a level from its own first half of
   channels, the upper (coarser) level's last quarter and the lower (finer) level's third quarter,
   and runs one 3x3 conv + GroupNorm + ReLU shared across levels.
3. :class:`RegionFeatureExtractor`: ``torchvision.ops.roi_align`` (float32, ``aligned=True``) per
   level, a 3x3 conv per level, sum over levels, ReLU, flatten, linear, an optional norm
   (``feature_norm``; "batch" keeps what differs between boxes, see the config), plus an MLP
   embedding of the normalised box.  An optional per-box mask (:func:`mask_roi_weights`, e.g. a
   brush region) weights the pooled RoI grid, so the token describes the painted part of its box;
   boxes without a mask are pooled exactly as before.
4. ``updims`` linear to the LM width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from model.config import RegionEncoderConfig
from model.derived_weights import derived
from model.geometry import input_to_feature_scale, normalized_to_input, normalized_to_pixels

__all__ = [
    "BoxBatchNorm",
    "MultiLevelFuse",
    "RegionEncoder",
    "RegionFeatureExtractor",
    "freeze_norm_statistics",
    "mask_roi_weights",
    "masks_roi_weights",
]


def mask_roi_weights(
    mask: torch.Tensor, box: tuple[float, float, float, float], output_size: int, sampling_ratio: int
) -> torch.Tensor:
    """A pixel mask ``(H, W)`` of the image (bool or [0, 1]) and its region's pixel ``xyxy`` box
    -> ``(1, output_size, output_size)`` weights: the mask's mean over each RoI bin, sampled at the
    very points :func:`torchvision.ops.roi_align` samples the features at (``aligned=True``)."""
    roi = torch.tensor([[0.0, *box]], dtype=torch.float32)
    grid = roi_align(
        mask.float()[None, None], roi, output_size=output_size, spatial_scale=1.0,
        sampling_ratio=sampling_ratio, aligned=True,
    )  # fmt: skip
    return grid[0]


def masks_roi_weights(
    boxes: torch.Tensor, masks: list[torch.Tensor | None], output_size: int, sampling_ratio: int
) -> torch.Tensor | None:
    """Normalised boxes ``(N, 4)`` of one image and per box ``None`` or a mask ``(H, W)`` of the
    whole image (any resolution: its size is its frame) -> ``(N, 1, o, o)`` RoI-grid weights
    (ones for a box without mask), or None when no box has a mask."""
    if len(masks) != len(boxes):
        raise ValueError(f"{len(masks)} masks for {len(boxes)} boxes")
    if all(m is None for m in masks):
        return None
    grids = []
    for box, mask in zip(boxes.tolist(), masks):
        if mask is None:
            grids.append(torch.ones(1, output_size, output_size))
            continue
        h, w = mask.shape[-2:]
        grids.append(mask_roi_weights(mask, normalized_to_pixels(box, w, h), output_size, sampling_ratio))
    return torch.stack(grids)


def _coord_channels(x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C + 2, H, W)`` with x, y in [-1, 1] of the image appended (CoordConv).

    ``frames``: ``(B, 4)`` normalised ``xyxy`` of the part of its image each map shows (a focal
    crop's extent), so a crop's coordinates are those of the same pixels in the whole image; None:
    every map shows its whole image."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    if frames is None:
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([xx, yy]).expand(b, 2, h, w)
    else:
        # In float32, then cast: a whole-image frame gives the None path's values in bf16 too.
        f = frames.to(x.device, torch.float32)
        xs, ys = xs.float(), ys.float()
        # [-1, 1] across the map -> [x0, x1] (and [y0, y1]) of the image, in [-1, 1] again.
        xs = (f[:, 0:1] + (f[:, 2:3] - f[:, 0:1]) * (xs + 1) / 2) * 2 - 1  # (B, W)
        ys = (f[:, 1:2] + (f[:, 3:4] - f[:, 1:2]) * (ys + 1) / 2) * 2 - 1  # (B, H)
        coords = torch.stack([xs[:, None, :].expand(b, h, w), ys[:, :, None].expand(b, h, w)], dim=1)
    return torch.cat([x, coords.to(x.dtype)], dim=1)


class MultiLevelFuse(nn.Module):
    """CoordConv + 1x1 conv per level, then scale-shuffle fusion rounds (GPT4RoI ``MLVLFuseModule``)."""

    def __init__(self, in_channels: int, cfg: RegionEncoderConfig) -> None:
        super().__init__()
        f = cfg.fuse_channels
        if f % 4:
            raise ValueError(f"fuse_channels must be divisible by 4, got {f}")
        self.num_levels = len(cfg.level_sizes)
        self.level_sizes = list(cfg.level_sizes)
        self.remain = f // 2
        self.shuffle = f // 4
        self.input_conv = nn.ModuleList(nn.Conv2d(in_channels + 2, f, 1) for _ in range(self.num_levels))
        self.fuse_convs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(f, f, 3, padding=1, bias=False), nn.GroupNorm(cfg.gn_groups, f), nn.ReLU()
            )
            for _ in range(cfg.num_fuse)
        )

    def _shuffle(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for lvl, target in enumerate(levels):
            top = levels[min(lvl + 1, self.num_levels - 1)]
            down = levels[max(lvl - 1, 0)]
            size = target.shape[-2:]
            from_top = F.interpolate(
                top[:, self.remain + self.shuffle :], size, mode="bilinear", align_corners=True
            )
            from_down = F.interpolate(
                down[:, self.remain : self.remain + self.shuffle], size, mode="bilinear", align_corners=True
            )
            out.append(torch.cat([target[:, : self.remain], from_top, from_down], dim=1))
        return out

    def forward(self, levels: list[torch.Tensor], frames: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``levels``: list of ``(B, C, g, g)`` -> list of ``(B, F, s_l, s_l)``, ``s_l = level_sizes[l]``;
        ``frames``: see :func:`_coord_channels`."""
        if len(levels) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(levels)}")
        feats = []
        for lvl, x in enumerate(levels):
            size = self.level_sizes[lvl]
            if x.shape[-1] != size:
                x = F.interpolate(x, (size, size), mode="bilinear", align_corners=True)
            feats.append(self.input_conv[lvl](_coord_channels(x, frames)))
        for conv in self.fuse_convs:
            feats = [conv(x) for x in self._shuffle(feats)]
        return feats


class BoxBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the boxes of a batch that uses its running statistics when a training
    batch holds a single box (a one-box correction must not crash a fine-tuning job) or when
    ``frozen_stats`` is set (fine-tuning: a few skewed correction batches must not move the
    statistics every other box is normalised with; the affine part still trains)."""

    frozen_stats: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and (x.shape[0] < 2 or self.frozen_stats):
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def freeze_norm_statistics(module: nn.Module, frozen: bool) -> None:
    """Set :attr:`BoxBatchNorm.frozen_stats` on every box norm inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, BoxBatchNorm):
            sub.frozen_stats = frozen


def _feature_norm(kind: str, dim: int) -> nn.Module:
    """The pooled-feature normalisation named in :attr:`RegionEncoderConfig.feature_norm`."""
    if kind == "batch":
        return BoxBatchNorm(dim)
    if kind == "layer":
        return nn.LayerNorm(dim)
    return nn.Identity()


class RegionFeatureExtractor(nn.Module):
    """RoIAlign per level + per-level conv, summed, flattened, plus a box-position MLP."""

    def __init__(self, cfg: RegionEncoderConfig, input_size: int) -> None:
        super().__init__()
        f, o = cfg.fuse_channels, cfg.roi_output_size
        self.cfg = cfg
        self.input_size = input_size
        self.pconvs = nn.ModuleList(nn.Conv2d(f, f, 3, padding=1) for _ in cfg.level_sizes)
        sizes: dict[int, list[int]] = {}
        for lvl, side in enumerate(cfg.level_sizes):
            sizes.setdefault(side, []).append(lvl)
        self.level_groups = list(sizes.values())  # level indices sharing one side, first-seen order
        self.flatten_linear = nn.Linear(f * o * o, cfg.hidden_dim)
        # The flattened RoI features are far larger than the box embedding (which ends in a
        # LayerNorm); without a norm the box position is a rounding error in the sum.
        self.feature_norm = _feature_norm(cfg.feature_norm, cfg.hidden_dim)
        bands = cfg.pos_fourier_bands
        self.register_buffer(
            "pos_freqs", torch.arange(1, bands + 1, dtype=torch.float32) * math.pi, persistent=False
        )
        self.pos_embedd = nn.Sequential(
            nn.Linear(4 * (1 + 2 * bands), cfg.pos_hidden_dim),
            nn.ReLU(),
            nn.LayerNorm(cfg.pos_hidden_dim),
            nn.Linear(cfg.pos_hidden_dim, cfg.hidden_dim),
            nn.ReLU(),
            nn.LayerNorm(cfg.hidden_dim),
        )

    def box_features(self, boxes: torch.Tensor) -> torch.Tensor:
        """``(N, 4)`` normalised boxes -> ``(N, 4 * (1 + 2 * bands))``: the box, then sin and cos of
        every coordinate at every frequency."""
        if not len(self.pos_freqs):
            return boxes
        angles = (boxes[:, :, None] * self.pos_freqs).flatten(1)
        return torch.cat([boxes, angles.sin(), angles.cos()], dim=1)

    def group_levels(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Pyramid ``(B, F, s_l, s_l)`` per level -> one map per distinct level size, its levels'
        channels stacked ``(B, n * F, s, s)`` (in :attr:`level_groups` order).  Box-independent:
        the inference engine keeps the result per image."""
        if [f.shape[-1] for f in feats] != list(self.cfg.level_sizes):
            raise ValueError(
                f"pyramid sides {[f.shape[-1] for f in feats]} differ from level_sizes {self.cfg.level_sizes}"
            )
        return [
            feats[g[0]] if len(g) == 1 else torch.cat([feats[lvl] for lvl in g], dim=1)
            for g in self.level_groups
        ]

    def _stacked_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-level 3x3 convs as one conv over the grouped channels: weights stacked on the
        input axis (channels-last, the layout oneDNN's direct convolution takes), biases summed.
        Outside autograd the stacked copy is kept until a conv parameter changes."""

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            order = [lvl for g in self.level_groups for lvl in g]
            weight = torch.cat([self.pconvs[lvl].weight for lvl in order], dim=1)
            bias = torch.stack([conv.bias for conv in self.pconvs]).sum(0)
            return weight.contiguous(memory_format=torch.channels_last), bias

        return build() if torch.is_grad_enabled() else derived(self.pconvs, "stacked_conv", build)

    def pool(
        self,
        maps: list[torch.Tensor],
        boxes: list[torch.Tensor],
        masks: list[torch.Tensor | None] | None = None,
        embed_boxes: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``maps``: :meth:`group_levels` of the pyramid; ``boxes``: per image ``(N_i, 4)``
        normalised xyxy -> ``(sum N_i, hidden_dim)`` in image-major, box order.

        ``embed_boxes``: the boxes the box embedding reads when the maps are not of the boxes' own
        image (a focal crop: pooled in the crop's frame, embedded as the box on its image).

        ``masks``: per image ``None`` or ``(N_i, 1, o, o)`` weights of its boxes' RoI grids
        (:func:`mask_roi_weights`; ones for a box without mask) that multiply the pooled features
        before the convolution.  Without any mask the computation is the unmasked one, unchanged.
        All boxes of all images go through one ``roi_align`` call per level size.
        """
        rois = torch.cat([normalized_to_input(b.float(), self.input_size) for b in boxes])
        batch_index = torch.cat(
            [torch.full((len(b), 1), i, dtype=rois.dtype, device=rois.device) for i, b in enumerate(boxes)]
        )
        rois = torch.cat([batch_index, rois], dim=1)  # (K, 5): torchvision's roi format
        # RoIAlign pools every channel on its own, so levels of one size go through one call with
        # their channels stacked; the per-level 3x3 convs, summed, are one conv over all levels'
        # channels.
        pooled = [
            roi_align(
                fmap.float(),
                rois,
                output_size=self.cfg.roi_output_size,
                spatial_scale=input_to_feature_scale(fmap.shape[-1], self.input_size),
                sampling_ratio=self.cfg.sampling_ratio,
                aligned=True,
            )
            for fmap in maps
        ]
        if masks is not None and any(m is not None for m in masks):
            o = self.cfg.roi_output_size
            grid = torch.cat(
                [
                    torch.ones(len(b), 1, o, o, device=rois.device)
                    if m is None
                    else m.float().to(rois.device)
                    for b, m in zip(boxes, masks)
                ]
            )
            pooled = [p * grid for p in pooled]
        weight, bias = self._stacked_conv()
        # Channels-last: for one box (an interactive request) oneDNN's conv in that layout takes
        # about half the time of the default path; for many boxes the two are about even.
        stacked = torch.cat(pooled, dim=1).to(weight.dtype).contiguous(memory_format=torch.channels_last)
        summed = F.conv2d(stacked, weight, bias, padding=1)
        flat = F.relu(summed).flatten(1)
        where = torch.cat(boxes if embed_boxes is None else embed_boxes).float().to(rois.device)
        pos = self.pos_embedd(self.box_features(where).to(flat.dtype))
        return self.feature_norm(self.flatten_linear(flat)) + pos

    def forward(
        self,
        feats: list[torch.Tensor],
        boxes: list[torch.Tensor],
        masks: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """``feats``: pyramid ``(B, F, s, s)`` per level; ``boxes``: per image ``(N_i, 4)`` normalised
        xyxy; ``masks``: see :meth:`pool` -> ``(sum N_i, hidden_dim)``."""
        return self.pool(self.group_levels(feats), boxes, masks)


class RegionEncoder(nn.Module):
    """Multi-level RoI module: vision levels + boxes -> one ``out_dim`` token per box."""

    def __init__(self, in_channels: int, out_dim: int, input_size: int, cfg: RegionEncoderConfig) -> None:
        super().__init__()
        self.mlvl_fuse = MultiLevelFuse(in_channels, cfg)
        self.roi_align = RegionFeatureExtractor(cfg, input_size)
        self.updims = nn.Linear(cfg.hidden_dim, out_dim)
        # GPT4RoI has no output norm; a small LM trained from scratch reads tokens of a fixed scale
        # far more easily (without it the region tokens drift to norms far above the image tokens').
        self.out_norm = nn.LayerNorm(out_dim) if cfg.out_norm else nn.Identity()
        if cfg.out_norm:
            # A constant part in every region token (the norm's bias, started away from zero): the LM's
            # attention can find "the region token" by content from the first step instead of having
            # to discover a direction shared by tokens whose content is all about their box.
            nn.init.normal_(self.out_norm.bias, std=1.0)

    def fuse(self, levels: list[torch.Tensor], frames: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Box-independent part, cacheable per image: ``(B, C, g, g)`` levels -> region maps, the
        fused pyramid with same-size levels stacked (:meth:`RegionFeatureExtractor.group_levels`).
        ``frames``: ``(B, 4)`` the normalised part of its image each map shows (focal crops;
        None: whole images)."""
        return self.roi_align.group_levels(self.mlvl_fuse(levels, frames))

    def mask_weights(self, boxes: torch.Tensor, masks: list[torch.Tensor | None]) -> torch.Tensor | None:
        """Normalised boxes ``(N, 4)`` of one image + per box ``None`` or an ``(H, W)`` mask of the
        image -> the ``(N, 1, o, o)`` RoI-grid weights :meth:`encode_boxes` takes (the mask's
        coverage of each bin, lifted to at least ``mask_floor``; ones for a box without mask), or
        None when no box has a mask (:func:`masks_roi_weights`)."""
        cfg = self.roi_align.cfg
        grid = masks_roi_weights(boxes, masks, cfg.roi_output_size, cfg.sampling_ratio)
        return None if grid is None else cfg.mask_floor + (1.0 - cfg.mask_floor) * grid

    def encode_boxes(
        self,
        maps: list[torch.Tensor],
        boxes: list[torch.Tensor],
        masks: list[torch.Tensor | None] | None = None,
        embed_boxes: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Region maps (:meth:`fuse`) + B tensors ``(N_i, 4)`` of normalised boxes (+ optional
        per-image ``(N_i, 1, o, o)`` RoI-grid masks and the boxes to embed when they differ,
        :meth:`RegionFeatureExtractor.pool`) -> ``(sum N_i, out_dim)``."""
        if len(boxes) != maps[0].shape[0]:
            raise ValueError(f"{len(boxes)} box lists for a batch of {maps[0].shape[0]} images")
        if masks is not None and len(masks) != len(boxes):
            raise ValueError(f"{len(masks)} mask lists for {len(boxes)} box lists")
        if sum(len(b) for b in boxes) == 0:
            return maps[0].new_zeros(0, self.updims.out_features)
        return self.out_norm(self.updims(self.roi_align.pool(maps, boxes, masks, embed_boxes)))

    def forward(
        self,
        levels: list[torch.Tensor],
        boxes: list[torch.Tensor],
        focal: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``levels``: list of ``(B, C, g, g)``; ``boxes``: B x ``(N_i, 4)`` -> ``(sum N_i, out_dim)``.

        ``focal``: ``(crop levels (M, C, g, g) per level, crop-frame boxes (M, 4), rows (M,), crop
        extents (M, 4) in their images' normalised frames)``: the tokens of boxes ``rows``
        (image-major) are pooled from their crops and embedded as the boxes themselves
        (:mod:`model.focal`).  Crops and images are pooled in one call, so a batch norm sees all of
        them."""
        if focal is None:
            return self.encode_boxes(self.fuse(levels), boxes)
        crop_levels, crop_boxes, rows, crop_frames = focal
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(boxes), 4)
        frames = torch.cat([whole.to(crop_frames), crop_frames])
        maps = self.fuse([torch.cat([a, b.to(a.dtype)]) for a, b in zip(levels, crop_levels)], frames)
        flat = torch.cat(boxes)
        embed = list(boxes) + list(flat[rows.to(flat.device)].split(1))
        tokens = self.encode_boxes(maps, list(boxes) + list(crop_boxes.to(flat).split(1)), None, embed)
        rows = rows.to(tokens.device)
        image = tokens[: len(flat)]
        return image.index_copy(0, rows, self.focal_token(image[rows], tokens[len(flat) :]))

    def focal_token(self, image: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
        """Tokens ``(M, D)`` of focal boxes from their image's and their crop's ``(M, D)`` tokens:
        the crop's, or with ``region.focal_keep_image`` the mean of both (training and the engine
        both merge here)."""
        return (
            (image + crop.to(image.dtype)) / 2
            if self.roi_align.cfg.focal_keep_image
            else crop.to(image.dtype)
        )
