"""Fast batched inference: one image encode, one prefix KV and one RoIAlign per image, one decode.

For every image the engine keeps (in a bounded LRU keyed by image content hash + model version):
the fused region pyramid and the KV cache of the shared prompt prefix (BOS + system text + image
tokens).  All questions of a request, over all its images, are decoded together: each row starts
from its image's prefix KV, its question tokens are right-aligned after a padding gap (masked out,
with positions continuing the prefix), then greedy decoding runs with a KV cache and finished rows
are dropped from the batch, so no compute is spent on padding after EOS.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import DynamicCache

from model.mllm import RegionMLLM

STOP_STRING = "###"
STOP_WINDOW = 4  # tokens decoded to look for the stop string


@dataclass
class Answer:
    text: str
    score: float  # mean probability of the generated tokens (EOS included)
    num_tokens: int


@dataclass
class ImageState:
    """Cached per-image work.  ``pyramid``: fused region maps ``(1, F, s, s)`` per level;
    ``prefix_kv``: per LM layer ``(keys, values)`` each ``(1, heads, P, head_dim)``."""

    pyramid: list[torch.Tensor]
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


@dataclass
class EngineStats:
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    questions: int = 0
    generated_tokens: int = 0
    extra: dict = field(default_factory=dict)


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image (size + mode + pixels)."""
    h = hashlib.sha256(f"{image.size}{image.mode}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class InferenceEngine:
    """Thread-safe batched greedy inference over a :class:`RegionMLLM`."""

    def __init__(
        self,
        model: RegionMLLM,
        version: str = "unknown",
        cache_bytes: int = 256 * 2**20,
        max_new_tokens: int = 24,
        max_batch: int = 64,
    ) -> None:
        self.model = model.eval()
        self.version = version
        self.cache_bytes = cache_bytes
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.stats = EngineStats()
        self._cache: OrderedDict[tuple[str, str], ImageState] = OrderedDict()
        self._cache_used = 0
        self._lock = threading.RLock()  # torch modules are not re-entrant across gunicorn threads
        tok = model.tokenizer
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id

    # ------------------------------------------------------------------ image states
    def _build_states(self, images: Sequence[Image.Image]) -> list[ImageState]:
        m = self.model
        pixels = m.processor.batch(list(images)).to(m.device)
        vision = m.encode_images(pixels)
        pyramid = m.region_encoder.fuse(m.cast_levels(vision))
        prefix = torch.tensor([m.prompts.prefix_ids] * len(images), device=m.device)
        no_regions = [pyramid[0].new_zeros(0, m.projector.out_features)] * len(images)
        embeds = m.embed_prompts(prefix, vision, no_regions, list(range(len(images))), [[] for _ in images])
        out = m.lm(inputs_embeds=embeds, use_cache=True)
        cache = out.cache
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        states = []
        for i in range(len(images)):
            kv = [(k[i : i + 1].clone(), v[i : i + 1].clone()) for k, v in layers]
            pyr = [p[i : i + 1].clone() for p in pyramid]
            nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
            nbytes += sum(t.numel() * t.element_size() for t in pyr)
            states.append(ImageState(pyr, kv, nbytes))
        return states

    def image_states(
        self, images: Sequence[Image.Image], keys: Sequence[str] | None = None
    ) -> list[ImageState]:
        """States for ``images``, from the LRU where possible; misses are encoded in one batch."""
        keys = list(keys) if keys is not None else [image_key(im) for im in images]
        result: list[ImageState | None] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            state = self._cache.get((self.version, key))
            if state is not None:
                self._cache.move_to_end((self.version, key))
                self.stats.image_cache_hits += 1
            else:
                missing.append(i)
                self.stats.image_cache_misses += 1
            result.append(state)
        if missing:
            built = self._build_states([images[i] for i in missing])
            for i, state in zip(missing, built):
                result[i] = state
                self._remember((self.version, keys[i]), state)
        return result  # type: ignore[return-value]

    def _remember(self, key: tuple[str, str], state: ImageState) -> None:
        if state.nbytes > self.cache_bytes:
            return
        if key in self._cache:
            self._cache_used -= self._cache.pop(key).nbytes
        self._cache[key] = state
        self._cache_used += state.nbytes
        while self._cache_used > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= old.nbytes

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_used = 0

    @property
    def cache_info(self) -> dict:
        return {"entries": len(self._cache), "bytes": self._cache_used, "capacity_bytes": self.cache_bytes}

    # ------------------------------------------------------------------ answering
    @torch.inference_mode()
    def answer(
        self,
        images: Sequence[Image.Image],
        boxes: Sequence[torch.Tensor],
        queries: Sequence[tuple[int, str]],
        keys: Sequence[str] | None = None,
    ) -> list[Answer]:
        """Answer ``queries`` = [(image index, question with <regionK>), ...].

        ``boxes[i]``: ``(N_i, 4)`` normalised boxes of image i (``<regionK>`` = row K-1).
        """
        with self._lock:
            states = self.image_states(images, keys)
            m = self.model
            encoded = [m.prompts.question_ids(q, first=True, num_boxes=len(boxes[i])) for i, q in queries]
            used: list[set[int]] = [set() for _ in images]
            for (i, _), (_, order) in zip(queries, encoded):
                used[i].update(order)
            feats = self._region_features(states, boxes, used)
            answers: list[Answer] = []
            for start in range(0, len(queries), self.max_batch):
                end = start + self.max_batch
                answers += self._decode(states, feats, list(queries[start:end]), encoded[start:end])
            self.stats.questions += len(queries)
            return answers

    def _region_features(
        self, states: Sequence[ImageState], boxes: Sequence[torch.Tensor], used: Sequence[set[int]]
    ) -> list[torch.Tensor]:
        """Region tokens ``(N_i, D)`` per image; only the boxes some question refers to (``used``)
        are encoded (an interactive request sends every box of the task but asks about one), the
        other rows stay zero.  Each box's token depends on its own box only."""
        m = self.model
        levels = len(states[0].pyramid)
        pyramid = [torch.cat([s.pyramid[lvl] for s in states]) for lvl in range(levels)]
        boxes = [b.to(m.device, torch.float32).reshape(-1, 4) for b in boxes]
        rows = [sorted(u) for u in used]
        wanted = [b[r] for b, r in zip(boxes, rows)]
        encoded = m.region_encoder.encode_boxes(pyramid, wanted).split([len(r) for r in rows])
        feats = []
        for b, r, f in zip(boxes, rows, encoded):
            full = f.new_zeros(len(b), f.shape[-1])
            full[r] = f
            feats.append(full)
        return feats

    def _decode(
        self,
        states: Sequence[ImageState],
        feats: Sequence[torch.Tensor],
        queries: list[tuple[int, str]],
        encoded: list[tuple[list[int], list[int]]],
    ) -> list[Answer]:
        m = self.model
        dev = m.device
        rows = len(queries)
        prefix_len = states[0].prefix_kv[0][0].shape[2]
        q_len = max(len(ids) for ids, _ in encoded)
        # Suffix right-aligned: [prefix | pad gap | question]; the gap is masked and skipped in positions.
        ids = torch.full((rows, q_len), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((rows, prefix_len + q_len), dtype=torch.long, device=dev)
        mask[:, :prefix_len] = 1
        pos = torch.zeros((rows, q_len), dtype=torch.long, device=dev)
        for r, (q_ids, _) in enumerate(encoded):
            n = len(q_ids)
            ids[r, q_len - n :] = torch.tensor(q_ids, device=dev)
            mask[r, prefix_len + q_len - n :] = 1
            pos[r, q_len - n :] = torch.arange(prefix_len, prefix_len + n, device=dev)
        row_image = [i for i, _ in queries]
        embeds = self._suffix_embeds(ids, feats, row_image, [order for _, order in encoded])
        cache = DynamicCache()
        for layer, _ in enumerate(states[0].prefix_kv):
            k = torch.cat([states[i].prefix_kv[layer][0] for i in row_image])
            v = torch.cat([states[i].prefix_kv[layer][1] for i in row_image])
            cache.update(k, v, layer)
        # Rows of equal question length have no gap: no mask to build, in every step (the rows
        # that finish are dropped whole).  Saves the mask construction of each decode step.
        padded = any(len(q_ids) < q_len for q_ids, _ in encoded)
        out = m.lm(
            inputs_embeds=embeds,
            attention_mask=mask if padded else None,
            position_ids=pos,
            cache=cache,
            use_cache=True,
        )
        next_pos = pos[:, -1:] + 1
        tokens: list[list[int]] = [[] for _ in range(rows)]
        probs: list[list[float]] = [[] for _ in range(rows)]
        active = torch.arange(rows, device=dev)
        logits = out.logits[:, -1]
        for step in range(self.max_new_tokens):
            p = torch.softmax(logits.float(), dim=-1)
            nxt = p.argmax(dim=-1)
            chosen = p.gather(1, nxt[:, None])[:, 0]
            done = []
            for j, r in enumerate(active.tolist()):
                t = int(nxt[j])
                probs[r].append(float(chosen[j]))
                if t == self.eos_id:
                    done.append(j)
                else:
                    tokens[r].append(t)
                    # The template's turn separator ends an answer too (models that skip EOS).
                    if STOP_STRING in m.tokenizer.decode(tokens[r][-STOP_WINDOW:]):
                        done.append(j)
            self.stats.generated_tokens += len(active)
            if step + 1 == self.max_new_tokens:
                break
            if done:
                keep = torch.tensor(
                    [j for j in range(len(active)) if j not in set(done)], device=dev, dtype=torch.long
                )
                if len(keep) == 0:
                    break
                active, nxt, mask, next_pos = active[keep], nxt[keep], mask[keep], next_pos[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            out = m.lm(
                inputs_embeds=m.lm.get_input_embeddings()(nxt[:, None]),
                attention_mask=mask if padded else None,
                position_ids=next_pos,
                cache=cache,
                use_cache=True,
            )
            next_pos = next_pos + 1
            logits = out.logits[:, -1]
        return [
            Answer(m.prompts.decode(tokens[r]), sum(probs[r]) / max(1, len(probs[r])), len(tokens[r]))
            for r in range(rows)
        ]

    def _suffix_embeds(
        self, ids: torch.Tensor, feats: Sequence[torch.Tensor], row_image: list[int], orders: list[list[int]]
    ) -> torch.Tensor:
        """Question-token embeddings with ``<bbox>`` replaced by region features ``(R, Lq, D)``."""
        from model.mllm import merge_placeholders

        m = self.model
        embeds = m.lm.get_input_embeddings()(ids)
        for r, order in enumerate(orders):
            n = len(feats[row_image[r]])
            if any(i >= n for i in order):
                raise ValueError(f"question {r} refers to a region its image does not have ({n} boxes)")
        dim = embeds.shape[-1]
        ordered = [feats[row_image[r]][order] for r, order in enumerate(orders)]
        flat = torch.cat(ordered) if ordered else embeds.new_zeros(0, dim)
        return merge_placeholders(embeds, ids == m.bbox_id, flat, [len(o) for o in orders], "region")
