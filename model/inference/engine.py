"""Fast batched inference: one image encode, one prefix KV and one RoIAlign per image, one decode.

For every image the engine keeps (:mod:`model.inference.cache`, keyed by model version + image
content hash; the hash of the file for an encoded image, which is then decoded only on a miss)
the fused region pyramid and the KV cache of the shared prompt prefix (BOS + system text + image
tokens).  All questions of a request, over all its images, are decoded together from their
images' prefixes (:mod:`model.inference.decode`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from model.calibration import image_descriptors
from model.focal import focal_crops, small_boxes
from model.inference.cache import ImageState, SizedLRU
from model.inference.decode import (
    STOP_STRING,
    AnswerText,
    DecodeTimes,
    StopString,
    greedy_decode,
    question_batch,
)
from model.inference.image_input import ImageLike, cache_key, pixels
from model.inference.kv_decode import KV, LlamaSteps, make_steps, prefill
from model.inference.question_tree import QuestionNodes, QuestionTree, question_tree
from model.mllm import RegionMLLM

__all__ = ["Answer", "EngineStats", "InferenceEngine", "QUESTION_CACHE_SHARE", "QUESTION_NODES_PER_PREFIX"]

# Question tokens kept per cached image (model.inference.question_tree.QuestionNodes): up to this
# many prefix lengths (a position's keys and values cost the same), and at most this share of the
# engine's image cache - a new-box request adds about 100 positions, a 7B LM's cost 0.5 MB each.
QUESTION_NODES_PER_PREFIX = 2
QUESTION_CACHE_SHARE = 1 / 8


@dataclass
class Answer:
    text: str
    # The calibrated probability that the answer is right when the model has a calibration
    # (model.calibration), else ``raw_score``.
    score: float
    num_tokens: int
    raw_score: float | None = None  # mean probability of the generated tokens (EOS included)

    def __post_init__(self) -> None:
        if self.raw_score is None:
            self.raw_score = self.score


@dataclass
class EngineStats:
    image_cache_hits: int = 0
    image_cache_misses: int = 0
    questions: int = 0
    generated_tokens: int = 0
    times: DecodeTimes = field(default_factory=DecodeTimes)  # question forwards vs decode steps
    extra: dict = field(default_factory=dict)


def _keys_transposed(keys: torch.Tensor) -> torch.Tensor:
    """A copy of prefix keys ``(1, H, P, d)`` stored as ``(1, H, d, P)`` and viewed back: a decode
    step multiplies queries by the keys' transpose, which then is a contiguous matrix."""
    return keys.transpose(-1, -2).contiguous().transpose(-1, -2)


def _descriptors(states: Sequence[ImageState]) -> torch.Tensor:
    """``(B, E)`` image descriptors of cached states."""
    return torch.cat([s.descriptor for s in states])


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
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        self.stats = EngineStats()
        self._cache: SizedLRU[tuple[str, str], ImageState] = SizedLRU(cache_bytes, lambda s: s.nbytes)
        self._lock = threading.RLock()  # torch modules are not re-entrant across gunicorn threads
        self.lean = lean  # lean Llama decode steps where they apply (model.inference.kv_decode)
        self.stop = StopString(model.tokenizer, model.prompts.stop_text or STOP_STRING)
        self.text = AnswerText(model.tokenizer, model.prompts.stop_text)  # whole characters only
        self.calibration = getattr(model, "score_calibration", None)  # None: scores stay raw

    # ------------------------------------------------------------------ image states
    def _build_states(self, images: Sequence[Image.Image]) -> list[ImageState]:
        m = self.model
        pixels = m.processor.batch(list(images)).to(m.device)
        vision = m.encode_images(pixels)
        descriptors = image_descriptors(vision.levels)  # (B, E)
        maps = m.region_encoder.fuse(m.cast_levels(vision))
        prefix = torch.tensor([m.prompts.prefix_ids] * len(images), device=m.device)
        no_regions = [maps[0].new_zeros(0, m.projector.out_features)] * len(images)
        embeds = m.embed_prompts(prefix, vision, no_regions, list(range(len(images))), [[] for _ in images])
        layers = prefill(m.lm, embeds, lean=self.lean)
        k = layers[0][0]
        node_bytes = 2 * len(layers) * k.shape[1] * k.shape[3] * k.element_size()
        nodes = min(
            int(QUESTION_NODES_PER_PREFIX * embeds.shape[1]),
            int(self.cache_bytes * QUESTION_CACHE_SHARE) // node_bytes,
        )
        return [
            ImageState(
                region_maps=[p[i : i + 1].clone() for p in maps],
                prefix_kv=[(_keys_transposed(k[i : i + 1]), v[i : i + 1].clone()) for k, v in layers],
                descriptor=descriptors[i : i + 1].clone(),
                questions=QuestionNodes(nodes),
            )
            for i in range(len(images))
        ]

    def image_states(self, images: Sequence[ImageLike]) -> list[ImageState]:
        """States for ``images``, from the cache where possible; misses are decoded (an
        :class:`~model.inference.image_input.EncodedImage` only then) and encoded in one batch."""
        return self._image_states([(self.version, cache_key(im)) for im in images], images)

    def _image_states(self, keys: list[tuple[str, str]], images: Sequence[ImageLike]) -> list[ImageState]:
        result: list[ImageState | None] = []
        missing: list[int] = []
        for i, key in enumerate(keys):
            state = self._cache.get(key)
            if state is not None:
                self.stats.image_cache_hits += 1
            else:
                missing.append(i)
                self.stats.image_cache_misses += 1
            result.append(state)
        if missing:
            built = self._build_states([pixels(images[i]) for i in missing])
            for i, state in zip(missing, built):
                result[i] = state
                self._cache.put(keys[i], state)
        return result  # type: ignore[return-value]

    @property
    def cache_bytes(self) -> int:
        """Capacity of the image cache."""
        return self._cache.capacity

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    @property
    def cache_info(self) -> dict:
        return {"entries": len(self._cache), "bytes": self._cache.used, "capacity_bytes": self.cache_bytes}

    # ------------------------------------------------------------------ answering
    @torch.inference_mode()
    def answer(
        self,
        images: Sequence[ImageLike],
        boxes: Sequence[torch.Tensor],
        queries: Sequence[tuple[int, str]],
        masks: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
    ) -> list[Answer]:
        """Answer ``queries`` = [(image index, question with <regionK>), ...].

        ``images``: decoded, or encoded files (decoded only if the cache lacks them);
        ``boxes[i]``: ``(N_i, 4)`` normalised boxes of image i (``<regionK>`` = row K-1);
        ``masks[i]``: ``None`` or per box of image i ``None`` or an ``(H, W)`` mask of the whole
        image (e.g. a brush region): the box's token then pools its box weighted by the mask
        (:meth:`model.region_encoder.RegionEncoder.mask_weights`).
        """
        if masks is not None and len(masks) != len(boxes):
            raise ValueError(f"{len(masks)} mask lists for {len(boxes)} box lists")
        with self._lock:
            keys = [(self.version, cache_key(im)) for im in images]
            states = self._image_states(keys, images)
            m = self.model
            encoded = [m.prompts.question_ids(q, first=True, num_boxes=len(boxes[i])) for i, q in queries]
            used: list[set[int]] = [set() for _ in images]
            for (i, _), (_, order) in zip(queries, encoded):
                used[i].update(order)
            feats = self._region_features(states, boxes, used, masks)
            self._focal_features(images, boxes, used, masks, feats)
            answers: list[Answer] = []
            for start in range(0, len(queries), self.max_batch):
                end = start + self.max_batch
                answers += self._decode(states, feats, list(queries[start:end]), encoded[start:end])
            if self.calibration is not None:
                answers = self._calibrated(answers, feats, queries, encoded, states)
            self.stats.questions += len(queries)
            for key, state in zip(keys, states):  # their stored question tokens grew
                self._cache.put(key, state)
            return answers

    @torch.inference_mode()
    def region_tokens(
        self,
        images: Sequence[ImageLike],
        boxes: Sequence[torch.Tensor],
        masks: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
    ) -> list[torch.Tensor]:
        """The region tokens ``(N_i, D)`` of every box of every image (``boxes[i]``: ``(N_i, 4)``
        normalised; ``masks`` as :meth:`answer`'s), as the questions about them read them."""
        with self._lock:
            states = self.image_states(images)
            used = [set(range(len(b))) for b in boxes]
            feats = self._region_features(states, boxes, used, masks)
            self._focal_features(images, boxes, used, masks, feats)
            return feats

    @torch.inference_mode()
    def image_descriptors(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """``(B, E)`` descriptors of whole images (:func:`model.calibration.image_descriptors` of
        the vision tower's maps, cached with the image), what the calibration's image probe reads."""
        with self._lock:
            return _descriptors(self.image_states(images))

    def _calibrated(
        self,
        answers: list[Answer],
        feats: Sequence[torch.Tensor],
        queries: Sequence[tuple[int, str]],
        encoded: Sequence[tuple[list[int], list[int]]],
        states: Sequence[ImageState],
    ) -> list[Answer]:
        """``answers`` with calibrated scores: each reads its raw score, the largest distance of
        the regions its question is about from the model's training statistics and (with an image
        probe) its image's familiarity."""
        cal = self.calibration
        assert cal is not None
        distances = [cal.distance(f).tolist() for f in feats]
        known = cal.familiarity(_descriptors(states)).tolist() if cal.reads_images else [0.0] * len(states)
        out = []
        for ans, (i, _), (_, order) in zip(answers, queries, encoded):
            far = max((distances[i][k] for k in order), default=0.0)
            out.append(Answer(ans.text, cal.score(ans.score, far, known[i]), ans.num_tokens, ans.score))
        return out

    def _region_features(
        self,
        states: Sequence[ImageState],
        boxes: Sequence[torch.Tensor],
        used: Sequence[set[int]],
        masks: Sequence[Sequence[torch.Tensor | None] | None] | None = None,
    ) -> list[torch.Tensor]:
        """Region tokens ``(N_i, D)`` per image; only the boxes some question refers to (``used``)
        are encoded (an interactive request sends every box of the task but asks about one), the
        other rows stay zero.  Each box's token depends on its own box (and mask) only."""
        m = self.model
        if len(states) == 1:
            maps = states[0].region_maps
        else:
            maps = [torch.cat(group) for group in zip(*(s.region_maps for s in states))]
        boxes = [b.to(m.device, torch.float32).reshape(-1, 4) for b in boxes]
        rows = [sorted(u) for u in used]
        wanted = [b[r] for b, r in zip(boxes, rows)]
        grids = None
        if masks is not None:
            grids = [
                None if ms is None else m.region_encoder.mask_weights(w, [ms[k] for k in r])
                for w, ms, r in zip(wanted, masks, rows)
            ]
        encoded = m.region_encoder.encode_boxes(maps, wanted, grids).split([len(r) for r in rows])
        feats = []
        for b, r, f in zip(boxes, rows, encoded):
            full = f.new_zeros(len(b), f.shape[-1])
            full[r] = f
            feats.append(full)
        return feats

    def _focal_features(
        self,
        images: Sequence[ImageLike],
        boxes: Sequence[torch.Tensor],
        used: Sequence[set[int]],
        masks: Sequence[Sequence[torch.Tensor | None] | None] | None,
        feats: list[torch.Tensor],
    ) -> None:
        """Replace in ``feats`` (per image ``(N_i, D)``) the tokens of the used boxes smaller than
        ``region.focal_below`` of their image by their focal crops' (:mod:`model.focal`; pooled in
        the crop, embedded as the box; merged with the image's token by
        :meth:`model.region_encoder.RegionEncoder.focal_token`).  A box with a mask is pooled in
        its crop with the same RoI-grid weights (the grid's bins are fractions of the box, so the
        weights do not depend on the frame)."""
        m = self.model
        cfg = m.cfg.region
        # image, box, crop pixels, box in the crop, crop in the image
        jobs: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, (b, u) in enumerate(zip(boxes, used)):
            small = small_boxes(b, images[i].size, cfg, u)
            if small:  # decode the image only then
                crops = focal_crops(pixels(images[i]), b.reshape(-1, 4), cfg, m.processor.batch, small)
                if crops is not None:  # never None here: some box is small
                    parts = zip(crops.rows, crops.pixels, crops.boxes, crops.frames)
                    jobs += [(i, k, p, box, f) for k, p, box, f in parts]
        for start in range(0, len(jobs), self.max_batch):
            part = jobs[start : start + self.max_batch]
            batch = torch.stack([p for _, _, p, _, _ in part]).to(m.device)
            frames = torch.stack([f for *_, f in part])
            maps = m.region_encoder.fuse(m.cast_levels(m.encode_images(batch)), frames)
            inside = [box[None].to(m.device) for _, _, _, box, _ in part]
            embed = [boxes[i].reshape(-1, 4)[k : k + 1].float().to(m.device) for i, k, *_ in part]
            grids = None
            if masks is not None:
                grids = [
                    None if masks[i] is None or masks[i][k] is None  # type: ignore[index]
                    else m.region_encoder.mask_weights(box_in_image, [masks[i][k]])  # type: ignore[index]
                    for (i, k, *_), box_in_image in zip(part, embed)
                ]  # fmt: skip
            tokens = m.region_encoder.encode_boxes(maps, inside, grids, embed)
            for (i, k, *_), token in zip(part, tokens):
                feats[i][k] = m.region_encoder.focal_token(feats[i][k][None], token[None])[0]

    def _decode(
        self,
        states: Sequence[ImageState],
        feats: Sequence[torch.Tensor],
        queries: list[tuple[int, str]],
        encoded: list[tuple[list[int], list[int]]],
    ) -> list[Answer]:
        m = self.model
        row_image = [i for i, _ in queries]
        prefix_len = states[0].prefix_kv[0][0].shape[2]
        batch = question_batch([ids for ids, _ in encoded], prefix_len, m.tokenizer.pad_token_id, m.device)
        embeds = m.embed_questions(batch.ids, feats, row_image, [order for _, order in encoded])
        capacity = batch.ids.shape[1] + self.max_new_tokens
        prefix_kv, row_prefix = self._row_prefixes(states, row_image)
        steps = make_steps(m.lm, prefix_kv, capacity, lean=self.lean, row_prefix=row_prefix)
        if isinstance(steps, LlamaSteps):  # shared and already computed question tokens once
            known = [states[i].questions for i in sorted(set(row_image))]  # row_prefix's groups
            tree = question_tree(self._token_keys(encoded, feats, row_image), row_prefix, m.device, known)
            nodes = embeds.flatten(0, 1)[tree.source]
            extra = self.stats.extra
            extra["question_nodes"] = extra.get("question_nodes", 0) + tree.size
            extra["question_nodes_known"] = extra.get("question_nodes_known", 0) + len(tree.context)
            context = self._known_kv(known, tree)
            kv_shape = prefix_kv[0][0].shape[1:2] + prefix_kv[0][0].shape[3:]  # (H_kv, d)
            nodes_kv = nodes.new_empty(len(prefix_kv), 2, tree.size, *kv_shape)

            def question() -> torch.Tensor:
                logits = steps.forward_tree(tree, nodes, context, nodes_kv)
                for g, store in enumerate(known):
                    new = [j for j, (k, group) in enumerate(zip(tree.keys, tree.group)) if group == g and k]
                    ends = {key: logits[r].clone() for r, key in tree.finals if row_prefix[r] == g}
                    store.add([tree.keys[j] for j in new], nodes_kv[:, :, new], ends)
                return logits
        else:

            def question() -> torch.Tensor:
                return steps.forward(embeds, batch.positions, batch.key_mask)

        rows = greedy_decode(
            steps,
            question,
            batch,
            m.lm.get_input_embeddings(),
            m.tokenizer.eos_token_id,
            self.stop,
            self.max_new_tokens,
            self.stats.times,
        )
        self.stats.generated_tokens += sum(len(g.probs) for g in rows)
        return [Answer(self.text(g.tokens), sum(g.probs) / max(1, len(g.probs)), len(g.tokens)) for g in rows]

    def _token_keys(
        self,
        encoded: list[tuple[list[int], list[int]]],
        feats: Sequence[torch.Tensor],
        row_image: list[int],
    ) -> list[list[tuple]]:
        """Identity of each question position: the token, and for a ``<bbox>`` a digest of the
        region token put there (its box's, pooled with its mask if any)."""
        bbox = self.model.bbox_id
        digests: dict[tuple[int, int], bytes] = {}

        def region(image: int, box: int) -> bytes:
            key = (image, box)
            if key not in digests:
                data = feats[image][box].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                digests[key] = hashlib.blake2b(data, digest_size=16).digest()
            return digests[key]

        keys = []
        for (ids, order), image in zip(encoded, row_image):
            refs = iter(order)
            keys.append([(t, region(image, next(refs))) if t == bbox else (t,) for t in ids])
        return keys

    @staticmethod
    def _known_kv(known: Sequence[QuestionNodes], tree: QuestionTree) -> torch.Tensor | None:
        """Stored keys and values ``(layers, 2, C, H_kv, d)`` of the tree's known nodes."""
        if not tree.context:
            return None
        groups = {g for g, _ in tree.context}
        if len(groups) == 1:
            store = known[tree.context[0][0]]
            slots = torch.tensor([s for _, s in tree.context], device=store.kv.device)  # type: ignore[union-attr]
            return store.kv.index_select(2, slots)  # type: ignore[union-attr]
        return torch.cat([known[g].kv[:, :, s : s + 1] for g, s in tree.context], dim=2)  # type: ignore[index]

    @staticmethod
    def _row_prefixes(states: Sequence[ImageState], row_image: list[int]) -> tuple[KV, list[int]]:
        """The distinct image prefixes the rows read, per LM layer ``(keys, values)`` each
        ``(G, H, P, d)`` (one image: its cached tensors themselves, no copy), and each row's one."""
        images = sorted(set(row_image))
        if len(images) == 1:  # one image (the usual request): every row reads its cached prefix
            return states[images[0]].prefix_kv, [0] * len(row_image)
        group = {image: g for g, image in enumerate(images)}
        prefix = [
            (
                torch.cat([states[i].prefix_kv[layer][0] for i in images]),
                torch.cat([states[i].prefix_kv[layer][1] for i in images]),
            )
            for layer in range(len(states[0].prefix_kv))
        ]
        return prefix, [group[i] for i in row_image]
