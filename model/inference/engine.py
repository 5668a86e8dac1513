"""Fast batched inference: one image encode, one prefix KV and one RoIAlign per image, one decode.

For every image the engine keeps (in a bounded LRU keyed by image content hash + model version;
the hash of the file for an encoded image, which is then decoded only on a miss):
the fused region pyramid and the KV cache of the shared prompt prefix (BOS + system text + image
tokens).  All questions of a request, over all its images, are decoded together: each row starts
from its image's prefix KV, its question tokens are right-aligned after a padding gap (masked out,
with positions continuing the prefix), then greedy decoding runs with a KV cache and finished rows
are dropped from the batch, so no compute is spent on padding after EOS.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from model.inference.image_input import ImageLike, cache_key, pixels
from model.inference.kv_decode import make_steps, prefill
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
    """Cached per-image work.  ``region_maps``: the fused pyramid, same-size levels stacked
    (``RegionEncoder.fuse``), ``(1, n * F, s, s)`` per level size; ``prefix_kv``: per LM layer
    ``(keys, values)`` each ``(1, heads, P, head_dim)``."""

    region_maps: list[torch.Tensor]
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


@dataclass
class EngineStats:
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    questions: int = 0
    generated_tokens: int = 0
    extra: dict = field(default_factory=dict)


class InferenceEngine:
    """Thread-safe batched greedy inference over a :class:`RegionMLLM`."""

    def __init__(
        self,
        model: RegionMLLM,
        version: str = "unknown",
        cache_bytes: int = 256 * 2**20,
        max_new_tokens: int = 24,
        max_batch: int = 64,
        lean: bool = True,
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
        self.lean = lean  # lean Llama decode steps where they apply (model.inference.kv_decode)
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        # A stop string that newly appears overlaps the last token's text, and the overlap ends the
        # string: only tokens holding its last character can complete it.
        self._stop_tokens = {i for i, piece in enumerate(pieces) if STOP_STRING[-1] in (piece or "")}

    # ------------------------------------------------------------------ image states
    def _build_states(self, images: Sequence[Image.Image]) -> list[ImageState]:
        m = self.model
        pixels = m.processor.batch(list(images)).to(m.device)
        vision = m.encode_images(pixels)
        maps = m.region_encoder.fuse(m.cast_levels(vision))
        prefix = torch.tensor([m.prompts.prefix_ids] * len(images), device=m.device)
        no_regions = [maps[0].new_zeros(0, m.projector.out_features)] * len(images)
        embeds = m.embed_prompts(prefix, vision, no_regions, list(range(len(images))), [[] for _ in images])
        layers = prefill(m.lm, embeds, lean=self.lean)
        states = []
        for i in range(len(images)):
            kv = [(k[i : i + 1].clone(), v[i : i + 1].clone()) for k, v in layers]
            region_maps = [p[i : i + 1].clone() for p in maps]
            nbytes = sum(t.numel() * t.element_size() for pair in kv for t in pair)
            nbytes += sum(t.numel() * t.element_size() for t in region_maps)
            states.append(ImageState(region_maps, kv, nbytes))
        return states

    def image_states(self, images: Sequence[ImageLike]) -> list[ImageState]:
        """States for ``images``, from the LRU where possible; misses are decoded (an
        :class:`~model.inference.image_input.EncodedImage` only then) and encoded in one batch."""
        keys = [cache_key(im) for im in images]
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
            built = self._build_states([pixels(images[i]) for i in missing])
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
        images: Sequence[ImageLike],
        boxes: Sequence[torch.Tensor],
        queries: Sequence[tuple[int, str]],
    ) -> list[Answer]:
        """Answer ``queries`` = [(image index, question with <regionK>), ...].

        ``images``: decoded, or encoded files (decoded only if the cache lacks them);
        ``boxes[i]``: ``(N_i, 4)`` normalised boxes of image i (``<regionK>`` = row K-1).
        """
        with self._lock:
            states = self.image_states(images)
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
        if len(states) == 1:
            maps = states[0].region_maps
        else:
            maps = [torch.cat(group) for group in zip(*(s.region_maps for s in states))]
        boxes = [b.to(m.device, torch.float32).reshape(-1, 4) for b in boxes]
        rows = [sorted(u) for u in used]
        wanted = [b[r] for b, r in zip(boxes, rows)]
        encoded = m.region_encoder.encode_boxes(maps, wanted).split([len(r) for r in rows])
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
        # (Built as Python lists: one tensor each instead of a few small ops per row.)
        gaps = [q_len - len(q_ids) for q_ids, _ in encoded]
        ids = torch.tensor(
            [[self.pad_id] * g + q_ids for g, (q_ids, _) in zip(gaps, encoded)], dtype=torch.long, device=dev
        )
        pos = torch.tensor(
            [[0] * g + list(range(prefix_len, prefix_len + q_len - g)) for g in gaps],
            dtype=torch.long,
            device=dev,
        )
        mask = torch.tensor(
            [[1] * prefix_len + [0] * g + [1] * (q_len - g) for g in gaps], dtype=torch.long, device=dev
        )
        row_image = [i for i, _ in queries]
        embeds = self._suffix_embeds(ids, feats, row_image, [order for _, order in encoded])
        if len(set(row_image)) == 1:  # one image (the usual request): its prefix, broadcast to every row
            prefix_kv = [
                (k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                for k, v in states[row_image[0]].prefix_kv
            ]
        else:
            prefix_kv = [
                (
                    torch.cat([states[i].prefix_kv[layer][0] for i in row_image]),
                    torch.cat([states[i].prefix_kv[layer][1] for i in row_image]),
                )
                for layer in range(len(states[0].prefix_kv))
            ]
        steps = make_steps(m.lm, prefix_kv, q_len + self.max_new_tokens, lean=self.lean)
        # Rows of equal question length have no gap: no mask to build, in every step (the rows
        # that finish are dropped whole).  Saves the mask construction of each decode step.
        padded = any(gaps)
        logits = steps.forward(embeds, pos, mask if padded else None)
        next_pos = pos[:, -1:] + 1
        tokens: list[list[int]] = [[] for _ in range(rows)]
        probs: list[list[float]] = [[] for _ in range(rows)]
        active = list(range(rows))
        embed = m.lm.get_input_embeddings()
        for step in range(self.max_new_tokens):
            p = torch.softmax(logits.float(), dim=-1)
            chosen, nxt = p.max(dim=-1)
            done = []
            for j, (r, t, c) in enumerate(zip(active, nxt.tolist(), chosen.tolist())):
                probs[r].append(c)
                if t == self.eos_id:
                    done.append(j)
                else:
                    tokens[r].append(t)
                    # The template's turn separator ends an answer too (models that skip EOS);
                    # only tokens that can take part in it are worth a decode.
                    if t in self._stop_tokens and STOP_STRING in m.tokenizer.decode(tokens[r][-STOP_WINDOW:]):
                        done.append(j)
            self.stats.generated_tokens += len(active)
            if step + 1 == self.max_new_tokens or len(done) == len(active):
                break
            if done:
                finished = set(done)
                keep_rows = [j for j in range(len(active)) if j not in finished]
                keep = torch.tensor(keep_rows, device=dev, dtype=torch.long)
                active = [active[j] for j in keep_rows]
                nxt, next_pos = nxt[keep], next_pos[keep]
                if padded:
                    mask = mask[keep]
                steps.keep(keep)
            if padded:
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            logits = steps.forward(embed(nxt[:, None]), next_pos, mask if padded else None)
            next_pos = next_pos + 1
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
