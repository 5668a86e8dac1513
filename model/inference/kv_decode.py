"""Decode steps over shared prefix KV caches: the Hugging Face forward, or a lean Llama forward.

The engine's greedy loop runs one LM forward per generated token.  On a small LM most of a
Hugging Face forward is Python and dispatch around the maths (output capturing, mask building,
cache objects, kwargs plumbing; step times in docs/design-notes.md); on a mid-sized one, at a
batched step, it is the weights' matmuls and attention over every row's copy of the image prefix
(profiles in docs/benchmarks.md).  :class:`LlamaSteps` runs the same Llama maths - the model's own
weights, the same operations - with every row of an image attending to that image's one cached
prefix (never copied per row) and its own positions in one preallocated buffer, the rotary tables
computed once, q/k/v and gate/up as one matmul each on re-laid-out weight copies where they fit
(:data:`COPY_LIMIT_BYTES`), and the last layer of a multi-token forward computed past its keys and
values for the last token only (nothing else reads the rest).
It applies to plain Llama-architecture models (the GPT4RoI LMs: LLaMA / Vicuna, and the embedded
default); anything else (LoRA-wrapped, other architectures, other rotary scalings) goes through
:class:`HFSteps`, the library's own forward, on a copy of each row's prefix.

Both take the same calls, so the engine's loop does not know which one it drives:

* ``steps = make_steps(lm, prefix_kv, capacity, row_prefix=...)`` - ``prefix_kv``: per layer
  ``(keys, values)`` each ``(G, H_kv, P, d)``, G prompt prefixes; ``row_prefix[r]``: row r's
  prefix; ``capacity``: positions a row must hold beyond ``P``;
* ``steps.forward(embeds, positions, key_mask)`` - ``embeds`` ``(B, L, D)`` for the next ``L``
  positions, ``positions`` ``(B, L)`` rotary positions, ``key_mask`` ``(B, P + seen + L)`` long
  (1 = attend) or None when no row has masked keys -> logits ``(B, V)`` of each row's last token;
* ``steps.keep(rows)`` - drop every other row (finished sequences leave the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from model.derived_weights import derived
from model.inference.question_tree import QuestionTree

__all__ = [
    "COPY_LIMIT_BYTES",
    "DecodeSteps",
    "HFSteps",
    "KV",
    "LeanLlamaWeights",
    "LAYOUT",
    "LlamaSteps",
    "MM_COPY_BYTES",
    "MM_LIMIT_BYTES",
    "lean_llama_supported",
    "lean_weights",
    "make_steps",
    "prefill",
]

KV = list[tuple[torch.Tensor, torch.Tensor]]
_Groups = tuple[int, "torch.Tensor | None"]  # rows a group, row -> place (None: in order)


class DecodeSteps(Protocol):
    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor: ...

    def keep(self, rows: torch.Tensor) -> None: ...


class HFSteps:
    """Every step through ``lm(...)`` with a :class:`transformers.DynamicCache` (any causal LM)."""

    def __init__(self, lm: PreTrainedModel, prefix_kv: KV) -> None:
        self.lm = lm
        self.cache = DynamicCache()
        for layer, (k, v) in enumerate(prefix_kv):
            self.cache.update(k, v, layer)

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        out = self.lm(
            inputs_embeds=embeds,
            attention_mask=key_mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


def lean_llama_supported(lm: PreTrainedModel) -> bool:
    """True when ``lm`` is a plain ``LlamaForCausalLM`` whose forward :class:`LlamaSteps` reproduces."""
    cfg = getattr(lm, "config", None)
    if type(lm).__name__ != "LlamaForCausalLM" or cfg is None:
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    return (
        cfg.model_type == "llama"
        and rope.get("rope_type", "default") == "default"
        and cfg.hidden_act == "silu"
        and getattr(cfg, "pretraining_tp", 1) == 1
        and cfg._attn_implementation in ("sdpa", "eager")
    )


# Re-laid-out weight copies save per-call work, which is what a small LM's step costs, and at a
# mid-sized LM's batched decode step a packed layout is faster per byte (docs/benchmarks.md); on a
# large LM the copies would cost gigabytes.  No copy at all above COPY_LIMIT_BYTES.
COPY_LIMIT_BYTES = 1024 * 2**20
# Up to MM_COPY_BYTES of weights, transposed copies for ``torch.mm``; above, oneDNN-packed copies
# where oneDNN runs (CPU float32, or bfloat16 on CPUs with bf16 instructions: the cases measured),
# else transposed copies up to MM_LIMIT_BYTES.
MM_COPY_BYTES = 64 * 2**20
MM_LIMIT_BYTES = 256 * 2**20
# None: the layout the sizes above pick; "mm", "packed" or "linear" forces one (benchmarks, tests).
LAYOUT: str | None = None


def _pick_layout(copy_bytes: int, packable: bool) -> str:
    if copy_bytes > COPY_LIMIT_BYTES:
        return "linear"
    if copy_bytes <= MM_COPY_BYTES:
        return "mm"
    if packable:
        return "packed"
    return "mm" if copy_bytes <= MM_LIMIT_BYTES else "linear"


def _packable(weight: torch.Tensor) -> bool:
    """oneDNN packs CPU float32 weights, and bfloat16 ones where the CPU has bf16 instructions
    (AVX-512 BF16, AMX); there its packed bf16 step beats MKL's (docs/benchmarks.md)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    # not torch.ops.mkldnn._is_mkldnn_bf16_supported(): it is also true of plain AVX-512 (emulated bf16)
    return weight.dtype == torch.bfloat16 and _cpu_has_bf16_instructions()


def _cpu_has_bf16_instructions() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class _Matmul:
    """Linear layers applied to one ``(N, in)`` input, outputs concatenated on the last axis.

    ``layout``: ``"mm"``: one ``torch.mm`` / ``addmm`` on a transposed ``(in, sum of outs)`` copy
    of the stacked weights - one call instead of one per layer, and a row-major right operand,
    which at a small LM's decode sizes takes MKL's fast path (``F.linear`` multiplies by the
    transposed view, slower per call; docs/design-notes.md).  ``"packed"``: one oneDNN linear on
    the stacked weights reordered once into oneDNN's blocked layout (faster than MKL's sgemm at a
    batched decode step's few rows).  ``"linear"``: ``F.linear`` on each original weight, no copy.
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], layout: str) -> None:
        self.sizes = [lin.out_features for lin in linears]
        has_bias = linears[0].bias is not None
        self.layout = layout
        self.weight_t: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.weights = [lin.weight for lin in linears]
        self.biases = [lin.bias for lin in linears]
        # The layers' own weights (no copy): for one row, where MKL's matrix-vector product reads
        # them faster than oneDNN's blocked kernel reads the packed copy (docs/benchmarks.md).
        self.originals = list(zip(self.weights, self.biases))
        if layout == "linear":
            return
        stacked = torch.cat(self.weights) if len(self.weights) > 1 else self.weights[0]
        self.bias = torch.cat(self.biases) if has_bias else None  # type: ignore[arg-type]
        if layout == "mm":
            self.weight_t = stacked.t().contiguous()
        elif layout == "packed":
            self.packed = torch.ops.mkldnn._reorder_linear_weight(stacked.detach(), None)
        else:
            raise ValueError(f"unknown weight layout {layout!r}")
        self.weights, self.biases = [], []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if x.shape[0] == 1:
                if len(self.originals) == 1:
                    return F.linear(x, *self.originals[0])
                return torch.cat([F.linear(x, w, b) for w, b in self.originals], dim=-1)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if self.weight_t is not None:
            if self.bias is None:
                return torch.mm(x, self.weight_t)
            return torch.addmm(self.bias, x, self.weight_t)
        if len(self.weights) == 1:
            return F.linear(x, self.weights[0], self.biases[0])
        return torch.cat([F.linear(x, w, b) for w, b in zip(self.weights, self.biases)], dim=-1)


@dataclass
class _LayerWeights:
    in_norm: torch.Tensor
    qkv: _Matmul  # q, k, v
    o: _Matmul
    post_norm: torch.Tensor
    gate_up: _Matmul  # gate, up
    down: _Matmul


class LeanLlamaWeights:
    """The tensors of a ``LlamaForCausalLM`` arranged for :class:`LlamaSteps`: every projection as
    a :class:`_Matmul` (q/k/v and gate/up stacked, transposed copies up to
    :data:`COPY_LIMIT_BYTES`).  Get it through
    :func:`lean_weights`: built once per model, rebuilt when a parameter changed."""

    def __init__(self, lm: PreTrainedModel) -> None:
        cfg = lm.config
        self.eps = cfg.rms_norm_eps
        attn = lm.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.gqa = attn.num_key_value_groups > 1
        rotary = lm.model.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.rope_scale = rotary.attention_scaling
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.layers = []
        layers = lm.model.layers
        linears = [lin for layer in layers for lin in self._linears(layer)] + [lm.lm_head]
        copy_bytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
        self.layout = LAYOUT or _pick_layout(copy_bytes, _packable(lm.lm_head.weight))
        self.copied = self.layout != "linear"
        with torch.no_grad():
            for layer in layers:
                q, k, v, o, gate, up, down = self._linears(layer)
                self.layers.append(
                    _LayerWeights(
                        in_norm=layer.input_layernorm.weight,
                        qkv=_Matmul([q, k, v], self.layout),
                        o=_Matmul([o], self.layout),
                        post_norm=layer.post_attention_layernorm.weight,
                        gate_up=_Matmul([gate, up], self.layout),
                        down=_Matmul([down], self.layout),
                    )
                )
            self.head = _Matmul([lm.lm_head], self.layout)
        self.norm = lm.model.norm.weight

    def rotary_tables(
        self, length: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``(n >= length, d)`` for positions ``0..n-1``, computed as
        ``LlamaRotaryEmbedding`` does (same float32 products, so the same values) and kept, grown
        by doubling.  The sign of ``rotate_half`` is folded into sin: ``cat(-x2, x1) * sin`` ==
        ``cat(x2, x1) * cat(-sin1, sin2)`` exactly, as negation is exact."""
        tables = self._rotary
        if (
            tables is None
            or tables[0].shape[0] < length
            or tables[0].dtype != dtype
            or tables[0].device != device
        ):
            n = max(64, 1 << (length - 1).bit_length())
            freqs = torch.arange(n, device=device)[:, None].float() * self.inv_freq.to(device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = (emb.cos() * self.rope_scale).to(dtype)
            sin = (emb.sin() * self.rope_scale).to(dtype)
            half = sin.shape[-1] // 2
            tables = self._rotary = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
        return tables

    @staticmethod
    def _linears(layer: torch.nn.Module) -> list[torch.nn.Linear]:
        """q, k, v, o, gate, up, down projections of a decoder layer."""
        a, mlp = layer.self_attn, layer.mlp
        return [a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def lean_weights(lm: PreTrainedModel) -> LeanLlamaWeights:
    """The :class:`LeanLlamaWeights` of ``lm``, cached until one of its parameters changes."""
    return derived(lm, "lean_llama", lambda: LeanLlamaWeights(lm))


class LlamaSteps:
    """Llama forward over shared prefix caches and per-row suffix key/value buffers.

    ``prefix_kv``: per layer ``(keys, values)`` each ``(G, H_kv, P, d)`` - one prompt prefix per
    group (an image's), read in place and never copied per row; ``row_prefix[r]``: row r's group
    (default: row r has prefix r).  Each row's own positions (its question, then its answer) go to
    one preallocated buffer ``(layers, 2, B, H_kv, capacity, d)``; finished rows leave it by an
    in-place compaction of the filled slots.

    Attention is computed in two parts over one softmax: the scores of every row of a group
    against its prefix come from one matmul per group and head (the prefix keys read once, not
    once per row), those against the row's own slots from a batched matmul; values likewise.
    The rest is ``transformers``' ``LlamaDecoderLayer`` arithmetic (RMSNorm in float32, rotary
    ``x * cos + rotate_half(x) * sin``, SiLU-gated MLP, softmax in float32); the q/k/v and gate/up
    matmuls run stacked, and a multi-token forward's last layer runs past its keys and values for
    the last token only.  Without a prefix (a prompt's prefill) attention is SDPA, causal.
    tests/test_kv_decode.py compares the logits with the library forward; tests/test_engine.py
    checks that greedy answers equal ``generate``'s.
    """

    def __init__(
        self, lm: PreTrainedModel, prefix_kv: KV, capacity: int, row_prefix: Sequence[int] | None = None
    ) -> None:
        self.w = lean_weights(lm)
        self.prefix = prefix_kv
        groups, kv_heads, self.prefix_len, d = prefix_kv[0][0].shape
        rows = list(range(groups)) if row_prefix is None else list(row_prefix)
        if rows and (min(rows) < 0 or max(rows) >= groups):
            raise ValueError(f"row_prefix {rows} refers to a prefix beyond the {groups} given")
        self.groups = groups
        self.seen = 0  # suffix slots filled
        self.buffer = prefix_kv[0][0].new_empty(len(prefix_kv), 2, len(rows), kv_heads, capacity, d)
        self._layout(rows)

    @property
    def length(self) -> int:
        """Positions each row's cache holds (prefix + own slots)."""
        return self.prefix_len + self.seen

    def _layout(self, rows: list[int]) -> None:
        """Rows' places in the per-group layout the prefix matmuls use (:meth:`_group_layout`)."""
        self.rows = rows
        self.per_group, self.index = self._group_layout(rows)

    def _group_layout(self, rows: Sequence[int]) -> _Groups:
        """Places of rows of prefix groups ``rows`` in the layout ``(G, n, ...)``: ``n`` rows a
        group; ``index`` (row -> ``g * n + slot``) None when rows already lie in that order."""
        counts = [0] * self.groups
        slots = []
        for g in rows:
            slots.append(counts[g])
            counts[g] += 1
        n = max(counts) if rows else 0
        index = [g * n + s for g, s in zip(rows, slots)]
        if index == list(range(self.groups * n)):
            return n, None
        return n, torch.tensor(index, dtype=torch.long, device=self.buffer.device)

    def _to_groups(self, x: torch.Tensor, layout: _Groups | None = None) -> torch.Tensor:
        """``(B, H, M, X)`` per row -> ``(G, H, n * M, X)`` per prefix group (zero rows pad);
        ``layout``: the rows' (:meth:`_group_layout`), default the decoded rows'."""
        _, heads, m, last = x.shape
        n, index = layout or (self.per_group, self.index)
        if index is not None:
            pad = x.new_zeros(self.groups * n, heads, m, last)
            x = pad.index_copy_(0, index, x)
        return x.view(self.groups, n, heads, m, last).transpose(1, 2).reshape(self.groups, heads, n * m, last)

    def _from_groups(self, y: torch.Tensor, layout: _Groups | None = None) -> torch.Tensor:
        """Inverse of :meth:`_to_groups`: ``(G, H, n * M, X)`` -> ``(B, H, M, X)``."""
        groups, heads, nm, last = y.shape
        n, index = layout or (self.per_group, self.index)
        y = y.view(groups, heads, n, nm // n, last).transpose(1, 2).reshape(groups * n, heads, nm // n, last)
        return y if index is None else y.index_select(0, index)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``LlamaRMSNorm``: normalised in float32, scaled in the model dtype (one fused op when
        that dtype is float32; the results are bit-identical)."""
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), weight, self.w.eps)
        return weight * torch.rms_norm(x.to(torch.float32), (x.shape[-1],), None, self.w.eps).to(x.dtype)

    def _rotary(
        self, positions: torch.Tensor, slots: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L)`` positions -> cos and signed sin ``(B, L, 1, d)`` rows of the weights' tables.
        A position never exceeds its cache slot (masked slots are skipped, not counted), so
        tables of ``slots`` rows suffice without reading the positions back from the tensor."""
        cos, sin = self.w.rotary_tables(slots, dtype, positions.device)
        return cos[positions][:, :, None], sin[positions][:, :, None]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """``(B, L, H, d)`` -> rotary-embedded, as ``apply_rotary_pos_emb``."""
        half = x.shape[-1] // 2
        return (x * cos) + (torch.cat((x.narrow(-1, half, half), x.narrow(-1, 0, half)), dim=-1) * signed_sin)

    def _attend(self, layer: int, q: torch.Tensor, end: int, hide: torch.Tensor | None) -> torch.Tensor:
        """``q`` ``(B, H_q, L, d)`` against the row's prefix and its slots ``< end``; ``hide``
        ``(B, 1, L, P + end)`` bool (True = masked out) or None -> ``(B, H_q, L, d)``."""
        batch, q_heads, steps, d = q.shape
        ks = self.buffer[layer, 0, : len(self.rows), :, :end]
        vs = self.buffer[layer, 1, : len(self.rows), :, :end]
        if self.prefix_len == 0:  # a prompt's own prefill
            mask = None if hide is None else ~hide
            return F.scaled_dot_product_attention(
                q,
                ks,
                vs,
                attn_mask=mask,
                is_causal=mask is None and steps > 1,
                scale=self.w.scaling,
                enable_gqa=self.w.gqa,
            )
        kv_heads = ks.shape[1]
        # (B, H_kv, g * L, d): the query heads sharing a key/value head side by side (repeat_kv's order).
        qg = (q * self.w.scaling).reshape(batch, kv_heads, -1, d)
        kp, vp = self.prefix[layer]
        if self.groups == 1 and qg.shape[2] == 1:
            return self._attend_one(qg, ks, vs, kp[0], vp[0], hide).view(batch, q_heads, steps, d)
        scores = torch.cat(
            (self._from_groups(self._to_groups(qg) @ kp.transpose(-1, -2)), qg @ ks.transpose(-1, -2)), dim=-1
        )
        if hide is not None:
            group = q_heads // kv_heads
            scores = (
                scores.view(batch, kv_heads, group, steps, -1)
                .masked_fill(hide[:, :, None], float("-inf"))
                .view(batch, kv_heads, group * steps, -1)
            )
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pp, ps = probs.split((self.prefix_len, end), dim=-1)
        out = self._from_groups(self._to_groups(pp) @ vp) + ps @ vs
        return out.view(batch, q_heads, steps, d)

    def _attend_one(
        self,
        qg: torch.Tensor,
        ks: torch.Tensor,
        vs: torch.Tensor,
        kp: torch.Tensor,
        vp: torch.Tensor,
        hide: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`_attend` of a decode step without grouped queries, every row on one prefix:
        ``qg`` ``(B, H, 1, d)`` (scaled), ``kp``, ``vp`` ``(H, P, d)`` -> ``(B, H, d)``.  The
        prefix matmuls take the rows as ``(H, B, d)`` views, so no per-group copies are made."""
        scores = torch.cat(
            (
                (qg[:, :, 0].transpose(0, 1) @ kp.transpose(-1, -2)).transpose(0, 1),
                (qg @ ks.transpose(-1, -2))[:, :, 0],
            ),
            dim=-1,
        )  # (B, H, P + end)
        if hide is not None:
            scores = scores.masked_fill(hide[:, :, 0], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(qg.dtype)
        pp, ps = probs.split((self.prefix_len, ks.shape[2]), dim=-1)
        return ((pp.transpose(0, 1) @ vp).transpose(0, 1) + (ps[:, :, None] @ vs)[:, :, 0]).contiguous()

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, steps, _ = embeds.shape
        start, end = self.seen, self.seen + steps
        capacity = self.buffer.shape[4]
        if end > capacity:
            raise RuntimeError(
                f"KV buffer holds {self.prefix_len + capacity} positions, step needs {self.prefix_len + end}"
            )
        mask = None  # (B, 1, L, P + end) bool, True = masked out; built once for every layer
        if steps == 1 and key_mask is not None:  # one token sees every slot key_mask keeps
            mask = (key_mask[:, : self.prefix_len + end] == 0)[:, None, None]
        elif key_mask is not None or (steps > 1 and self.prefix_len):
            # Query i (own slot start + i) sees the prefix and its own slots <= start + i that
            # key_mask keeps.  Without a prefix and a key_mask: SDPA's causal path.
            keys = torch.arange(self.prefix_len + end, device=embeds.device)
            queries = self.prefix_len + start + torch.arange(steps, device=embeds.device)
            mask = (keys[None, :] > queries[:, None])[None, None]
            if key_mask is not None:
                mask = mask | (key_mask[:, None, None, : self.prefix_len + end] == 0)
        cos, sin = self._rotary(positions, self.prefix_len + end, embeds.dtype)
        w, d = self.w, self.w.head_dim
        hidden = embeds.reshape(batch * steps, -1)  # (B * L, D): the projections are plain matmuls
        last = len(w.layers) - 1
        for i, lw in enumerate(w.layers):
            x = self._rms(hidden, lw.in_norm)
            qkv = lw.qkv(x).view(batch, steps, -1, d)
            # q and k heads are adjacent in the projection: one rotation for both.
            n_q, n_k = lw.qkv.sizes[0] // d, lw.qkv.sizes[1] // d
            qk = self._rotate(qkv.narrow(2, 0, n_q + n_k), cos, sin).transpose(1, 2)
            self.buffer[i, 0, :batch, :, start:end].copy_(qk.narrow(1, n_q, n_k))
            self.buffer[i, 1, :batch, :, start:end].copy_(qkv.narrow(2, n_q + n_k, n_k).transpose(1, 2))
            q = qk.narrow(1, 0, n_q)
            if i == last and steps > 1:
                # Past the last layer's keys and values only the last token's hidden state is
                # read (for its logits): its attention, output projection and MLP run on one row.
                q, hidden = q[:, :, -1:], hidden.view(batch, steps, -1)[:, -1]
                if mask is not None:
                    mask = mask[:, :, -1:]
                    if key_mask is None:
                        mask = None  # the last token sees every slot
                steps = 1
            out = self._attend(i, q, end, mask)
            hidden = hidden + lw.o(out.transpose(1, 2).reshape(batch * steps, -1))
            gate, up = lw.gate_up(self._rms(hidden, lw.post_norm)).chunk(2, dim=-1)
            hidden = hidden + lw.down(F.silu(gate) * up)
        self.seen = end
        return w.head(self._rms(hidden, w.norm))  # one row per sequence: (B, V)

    def forward_tree(
        self,
        tree: QuestionTree,
        embeds: torch.Tensor,
        context: torch.Tensor | None = None,
        nodes_kv: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every row's question at once, each node of their tree (:mod:`model.inference.question_tree`)
        computed once: ``embeds`` ``(N, D)`` of the nodes to compute -> logits ``(R, V)`` of each
        row's last question token (``tree.stored``'s rows: the stored ones).  ``context``: keys and
        values ``(layers, 2, C, H_kv, d)`` of the tree's known nodes; ``nodes_kv``, if given,
        ``(layers, 2, N, H_kv, d)``, receives those of the computed nodes.  Each row's first
        ``Lq`` slots get its path's keys and values laid out as
        :func:`model.inference.decode.question_batch` lays the row out, so decode steps continue
        with that batch's key mask and positions as after :meth:`forward` on it."""
        rows = len(self.rows)
        width = tree.slots.numel() // rows
        if self.seen or width > self.buffer.shape[4]:
            raise RuntimeError(f"a question tree of {width} slots needs {width} empty slots")
        w, d, n = self.w, self.w.head_dim, tree.size
        cos, sin = self._rotary((self.prefix_len + tree.depth)[None], self.prefix_len + width, embeds.dtype)
        layout = self._group_layout(tree.group)
        ancestors = tree.ancestors
        hidden = embeds
        last = len(w.layers) - 1
        for i, lw in enumerate(w.layers):
            if n:
                qkv = lw.qkv(self._rms(hidden, lw.in_norm)).view(1, n, -1, d)
                n_q, n_k = lw.qkv.sizes[0] // d, lw.qkv.sizes[1] // d
                qk = self._rotate(qkv.narrow(2, 0, n_q + n_k), cos, sin)[0]
                k, v = qk.narrow(1, n_q, n_k), qkv[0].narrow(1, n_q + n_k, n_k)  # (N, H_kv, d)
                if nodes_kv is not None:
                    nodes_kv[i, 0].copy_(k)
                    nodes_kv[i, 1].copy_(v)
                if context is not None and context.shape[2]:  # known nodes first, as tree.slots counts
                    k, v = torch.cat((context[i, 0], k)), torch.cat((context[i, 1], v))
            else:  # every node known
                k, v = context[i, 0], context[i, 1]  # type: ignore[index]
            # Each row's slots: its path's nodes (a gap slot: any finite node, masked).
            kv_heads = k.shape[1]
            self.buffer[i, 0, :rows, :, :width].copy_(
                k[tree.slots].view(rows, width, kv_heads, d).transpose(1, 2)
            )
            self.buffer[i, 1, :rows, :, :width].copy_(
                v[tree.slots].view(rows, width, kv_heads, d).transpose(1, 2)
            )
            if not n:
                continue
            q = qk.narrow(1, 0, n_q)
            if i == last:  # past the last keys and values only the rows' last nodes are read
                q, hidden, ancestors = q[tree.leaves], hidden[tree.leaves], ancestors[tree.leaves]
                layout = self._group_layout([tree.group[j] for j in tree.leaves.tolist()])
            out = self._attend_tree(i, q, k, v, ancestors, layout)
            hidden = hidden + lw.o(out.reshape(len(q), -1))
            gate, up = lw.gate_up(self._rms(hidden, lw.post_norm)).chunk(2, dim=-1)
            hidden = hidden + lw.down(F.silu(gate) * up)
        self.seen = width
        if not tree.stored:
            return w.head(self._rms(hidden, w.norm))[tree.leaf]
        logits = embeds.new_empty(rows, sum(w.head.sizes))
        for r, stored in tree.stored:
            logits[r] = stored
        if n:
            computed = (tree.leaf >= 0).nonzero()[:, 0]
            logits[computed] = w.head(self._rms(hidden, w.norm))[tree.leaf[computed]]
        return logits

    def _attend_tree(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ancestors: torch.Tensor,
        layout: _Groups,
    ) -> torch.Tensor:
        """Queries ``q`` ``(M, H_q, d)`` of tree nodes against their prefixes and the tree's nodes
        ``k``, ``v`` ``(C + N, H_kv, d)`` where ``ancestors`` ``(M, C + N)`` is True -> ``(M, H_q, d)``;
        the same two-part softmax as :meth:`_attend`."""
        m, q_heads, d = q.shape
        kv_heads = k.shape[1]
        qg = (q * self.w.scaling).view(m, kv_heads, -1, d)  # (M, H_kv, g, d), repeat_kv's order
        group = qg.shape[2]
        kp, vp = self.prefix[layer]
        own = qg.permute(1, 0, 2, 3).reshape(kv_heads, m * group, d) @ k.permute(1, 2, 0)
        own = own.view(kv_heads, m, group, -1).permute(1, 0, 2, 3)
        scores = torch.cat(
            (
                self._from_groups(self._to_groups(qg, layout) @ kp.transpose(-1, -2), layout),
                own.masked_fill(~ancestors[:, None, None], float("-inf")),
            ),
            dim=-1,
        )
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pp, pn = probs.split((self.prefix_len, k.shape[0]), dim=-1)
        nodes = pn.permute(1, 0, 2, 3).reshape(kv_heads, m * group, -1) @ v.transpose(0, 1)
        out = self._from_groups(self._to_groups(pp, layout) @ vp, layout)
        return (out + nodes.view(kv_heads, m, group, d).permute(1, 0, 2, 3)).reshape(m, q_heads, d)

    def keep(self, rows: torch.Tensor) -> None:
        kept = rows.tolist()
        n = len(kept)
        filled = self.buffer[:, :, :, :, : self.seen]
        filled[:, :, :n].copy_(filled.index_select(2, rows))
        self._layout([self.rows[r] for r in kept])


def _use_lean(lm: PreTrainedModel, lean: bool) -> bool:
    return lean and lean_llama_supported(lm)


def prefill(lm: PreTrainedModel, embeds: torch.Tensor, lean: bool = True) -> KV:
    """Key/value cache of whole prompts ``embeds`` ``(B, L, D)`` (positions from 0): per layer
    ``(keys, values)`` each ``(B, H_kv, L, d)``; lean where :func:`make_steps` would be."""
    if _use_lean(lm, lean):
        batch, length, _ = embeds.shape
        empty = embeds.new_empty(batch, lm.config.num_key_value_heads, 0, lean_weights(lm).head_dim)
        steps = LlamaSteps(lm, [(empty, empty)] * len(lm.model.layers), length)
        steps.forward(embeds, torch.arange(length, device=embeds.device).expand(batch, length), None)
        return [(layer[0], layer[1]) for layer in steps.buffer]
    cache = lm(inputs_embeds=embeds, use_cache=True).cache
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_steps(
    lm: PreTrainedModel,
    prefix_kv: KV,
    capacity: int,
    lean: bool = True,
    row_prefix: Sequence[int] | None = None,
) -> DecodeSteps:
    """:class:`LlamaSteps` where it applies (and ``lean``), else :class:`HFSteps` (on a copy of
    each row's prefix).  ``prefix_kv``: per layer ``(G, H_kv, P, d)``; ``row_prefix[r]``: the
    prefix of row r (default: row r has prefix r); ``capacity``: positions beyond ``P``."""
    if _use_lean(lm, lean):
        return LlamaSteps(lm, prefix_kv, capacity, row_prefix)
    if row_prefix is not None:
        rows = torch.tensor(list(row_prefix), dtype=torch.long, device=prefix_kv[0][0].device)
        prefix_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in prefix_kv]
    return HFSteps(lm, prefix_kv)
