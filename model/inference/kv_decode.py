"""Decode steps over a prefix KV cache: the Hugging Face forward, or a lean Llama forward.

The engine's greedy loop runs one LM forward per generated token.  On a small LM most of a
Hugging Face forward is Python and dispatch around the maths (output capturing, mask building,
cache objects, kwargs plumbing; step times in docs/design-notes.md).  :class:`LlamaSteps` runs
the same Llama maths - the model's own weights, the same operations - straight on preallocated
key/value buffers, with the rotary tables computed once, q/k/v and gate/up as one matmul each,
and the last layer of a multi-token forward computed past its keys and values for the last token
only (nothing else reads the rest).
It applies to plain Llama-architecture models (the GPT4RoI LMs: LLaMA / Vicuna, and the embedded
default); anything else (LoRA-wrapped, other architectures, other rotary scalings) goes through
:class:`HFSteps`, the library's own forward.

Both take the same calls, so the engine's loop does not know which one it drives:

* ``steps = make_steps(lm, prefix_kv, capacity)`` - ``prefix_kv``: per layer ``(keys, values)``
  each ``(B, H_kv, P, d)``; ``capacity``: positions the cache must hold beyond ``P``;
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

__all__ = [
    "COPY_LIMIT_BYTES",
    "DecodeSteps",
    "HFSteps",
    "KV",
    "LeanLlamaWeights",
    "LlamaSteps",
    "lean_llama_supported",
    "lean_weights",
    "make_steps",
    "prefill",
]

KV = list[tuple[torch.Tensor, torch.Tensor]]


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


# Re-laid-out weight copies save per-call work, which is what a small LM's step costs; on a large
# LM the copies would cost gigabytes and the calls are noise.
COPY_LIMIT_BYTES = 256 * 2**20


class _Matmul:
    """Linear layers applied to one ``(N, in)`` input, outputs concatenated on the last axis.

    With ``copy``: one ``torch.mm`` / ``addmm`` on a transposed ``(in, sum of outs)`` copy of the
    stacked weights - one call instead of one per layer, and a row-major right operand, which at
    a decode step's sizes takes MKL's fast path (``F.linear`` multiplies by the transposed view,
    slower per call; docs/design-notes.md).  Without: ``F.linear`` on each original weight.
    """

    def __init__(self, linears: Sequence[torch.nn.Linear], copy: bool) -> None:
        self.sizes = [lin.out_features for lin in linears]
        has_bias = linears[0].bias is not None
        self.weight_t: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.weights = [lin.weight for lin in linears]
        self.biases = [lin.bias for lin in linears]
        if copy:
            self.weight_t = torch.cat(self.weights).t().contiguous()
            self.bias = torch.cat(self.biases) if has_bias else None  # type: ignore[arg-type]
            self.weights, self.biases = [], []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
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
        self.copied = copy_bytes <= COPY_LIMIT_BYTES
        with torch.no_grad():
            for layer in layers:
                q, k, v, o, gate, up, down = self._linears(layer)
                self.layers.append(
                    _LayerWeights(
                        in_norm=layer.input_layernorm.weight,
                        qkv=_Matmul([q, k, v], self.copied),
                        o=_Matmul([o], self.copied),
                        post_norm=layer.post_attention_layernorm.weight,
                        gate_up=_Matmul([gate, up], self.copied),
                        down=_Matmul([down], self.copied),
                    )
                )
            self.head = _Matmul([lm.lm_head], self.copied)
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
    """Llama forward on static per-layer key/value buffers ``(B, H_kv, P + capacity, d)``.

    The arithmetic is ``transformers``' ``LlamaDecoderLayer``'s (RMSNorm in float32, rotary
    ``x * cos + rotate_half(x) * sin``, SDPA with the model's scaling, SiLU-gated MLP); the q/k/v
    and gate/up matmuls run stacked, and a multi-token forward's last layer runs past its keys and
    values for the last token only.  tests/test_kv_decode.py compares the logits with the library
    forward; tests/test_engine.py checks that greedy answers equal ``generate``'s.
    """

    def __init__(self, lm: PreTrainedModel, prefix_kv: KV, capacity: int) -> None:
        self.w = lean_weights(lm)
        batch, _, self.length, _ = prefix_kv[0][0].shape
        total = self.length + capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for k, v in prefix_kv:
            kb = k.new_empty(batch, k.shape[1], total, k.shape[3])
            vb = v.new_empty(batch, v.shape[1], total, v.shape[3])
            kb.narrow(2, 0, self.length).copy_(k)
            vb.narrow(2, 0, self.length).copy_(v)
            self.keys.append(kb)
            self.values.append(vb)

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

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, steps, _ = embeds.shape
        start, end = self.length, self.length + steps
        if end > self.keys[0].shape[2]:
            raise RuntimeError(f"KV buffer holds {self.keys[0].shape[2]} positions, step needs {end}")
        mask = None
        if steps > 1 or key_mask is not None:
            # (B, 1, L, end): query i (cache slot start + i) sees slots <= start + i that key_mask keeps.
            slots = torch.arange(end, device=embeds.device)
            mask = (slots[None, :] <= (start + torch.arange(steps, device=embeds.device))[:, None])[
                None, None
            ]
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :end].bool()
        cos, sin = self._rotary(positions, end, embeds.dtype)
        w, d = self.w, self.w.head_dim
        hidden = embeds.reshape(batch * steps, -1)  # (B * L, D): the projections are plain matmuls
        last = len(w.layers) - 1
        for i, lw in enumerate(w.layers):
            x = self._rms(hidden, lw.in_norm)
            qkv = lw.qkv(x).view(batch, steps, -1, d)
            # q and k heads are adjacent in the projection: one rotation for both.
            n_q, n_k = lw.qkv.sizes[0] // d, lw.qkv.sizes[1] // d
            qk = self._rotate(qkv.narrow(2, 0, n_q + n_k), cos, sin).transpose(1, 2)
            # narrow + copy_ rather than slice assignment: no index-tuple parsing, fewer view ops
            self.keys[i].narrow(2, start, steps).copy_(qk.narrow(1, n_q, n_k))
            self.values[i].narrow(2, start, steps).copy_(qkv.narrow(2, n_q + n_k, n_k).transpose(1, 2))
            q = qk.narrow(1, 0, n_q)
            if i == last and steps > 1:
                # Past the last layer's keys and values only the last token's hidden state is
                # read (for its logits): its attention, output projection and MLP run on one row,
                # which sees every slot up to ``end`` - a mask only if key_mask drops some.
                q, hidden = q[:, :, -1:], hidden.view(batch, steps, -1)[:, -1]
                mask, steps = (mask[:, :, -1:] if key_mask is not None else None), 1
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i].narrow(2, 0, end),
                self.values[i].narrow(2, 0, end),
                attn_mask=mask,
                scale=w.scaling,
                enable_gqa=w.gqa,
            )
            hidden = hidden + lw.o(out.transpose(1, 2).reshape(batch * steps, -1))
            gate, up = lw.gate_up(self._rms(hidden, lw.post_norm)).chunk(2, dim=-1)
            hidden = hidden + lw.down(F.silu(gate) * up)
        self.length = end
        return w.head(self._rms(hidden, w.norm))  # one row per sequence: (B, V)

    def keep(self, rows: torch.Tensor) -> None:
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


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
        return list(zip(steps.keys, steps.values))
    cache = lm(inputs_embeds=embeds, use_cache=True).cache
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_steps(lm: PreTrainedModel, prefix_kv: KV, capacity: int, lean: bool = True) -> DecodeSteps:
    """:class:`LlamaSteps` where it applies (and ``lean``), else :class:`HFSteps`."""
    if _use_lean(lm, lean):
        return LlamaSteps(lm, prefix_kv, capacity)
    return HFSteps(lm, prefix_kv)
