"""The lean Llama decode steps compute what the library's forward computes, and fall back to it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from model.inference import kv_decode
from model.inference.kv_decode import (
    HFSteps,
    LeanLlamaWeights,
    LlamaSteps,
    lean_llama_supported,
    lean_weights,
    make_steps,
    prefill,
)


def _llama(kv_heads: int = 4, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        **extra,
    )
    lm = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # weights (and biases, where the config has them) large enough that
        for name, p in lm.named_parameters():  # rounding differences would show
            if p.dim() == 2 or name.endswith(".bias"):
                p.normal_(0, 0.2)
    return lm


def _run(steps, embeds, positions, key_mask, lm, keep_after: int | None = None):
    """Suffix prefill then three decode steps (token ids 1..3); returns the logits of each call."""
    out = [steps.forward(embeds, positions, key_mask)]
    pos = positions[:, -1:] + 1
    mask = key_mask
    for step in range(3):
        if keep_after is not None and step == keep_after:
            rows = torch.tensor([0])
            steps.keep(rows)
            pos, mask = pos[rows], None if mask is None else mask[rows]
        ids = torch.full((pos.shape[0], 1), step + 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        out.append(steps.forward(lm.get_input_embeddings()(ids), pos, mask))
        pos = pos + 1
    return out


@pytest.mark.parametrize(
    ("kv_heads", "copy", "bias"),
    # multi-head, grouped-query, no weight copies, projections with biases (copied and not)
    [(4, True, False), (2, True, False), (4, False, False), (2, True, True), (4, False, True)],
)
@torch.inference_mode()
def test_lean_steps_equal_library_forward(kv_heads, copy, bias, monkeypatch):
    if not copy:  # a large LM: no re-laid-out weight copies
        monkeypatch.setattr(kv_decode, "COPY_LIMIT_BYTES", 0)
    lm = _llama(kv_heads, attention_bias=bias, mlp_bias=bias)
    assert lean_llama_supported(lm) and lean_weights(lm).copied == copy
    g = torch.Generator().manual_seed(1)
    prompt = torch.randn(2, 9, 64, generator=g)
    lean_kv, hf_kv = prefill(lm, prompt, lean=True), prefill(lm, prompt, lean=False)
    for (k1, v1), (k2, v2) in zip(lean_kv, hf_kv):
        assert k1.shape == k2.shape == (2, kv_heads, 9, 16)
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    # Row 1's question is two tokens shorter: a masked gap after the prefix, positions skip it.
    suffix = torch.randn(2, 5, 64, generator=g)
    positions = torch.tensor([[9, 10, 11, 12, 13], [0, 0, 9, 10, 11]])
    key_mask = torch.ones(2, 14, dtype=torch.long)
    key_mask[1, 9:11] = 0
    for keep_after in (None, 1):  # also after dropping a finished row
        lean = _run(LlamaSteps(lm, hf_kv, 8), suffix, positions, key_mask, lm, keep_after)
        ref = _run(HFSteps(lm, hf_kv), suffix, positions, key_mask, lm, keep_after)
        for a, b in zip(lean, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # No padded row: no mask at all, as the engine calls it.
    lean = _run(LlamaSteps(lm, hf_kv, 8), suffix, positions[:1].expand(2, 5), None, lm)
    ref = _run(HFSteps(lm, hf_kv), suffix, positions[:1].expand(2, 5), None, lm)
    for a, b in zip(lean, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_lean_buffer_overflow_is_an_error():
    lm = _llama()
    kv = prefill(lm, torch.randn(1, 4, 64))
    steps = LlamaSteps(lm, kv, 2)
    with pytest.raises(RuntimeError, match="KV buffer"):
        steps.forward(torch.randn(1, 3, 64), torch.arange(4, 7)[None], None)


def test_lean_weights_follow_in_place_updates():
    """A fine-tuning step changes parameters in place; the weight copies must not go stale."""
    lm = _llama()
    first = lean_weights(lm)
    assert lean_weights(lm) is first
    with torch.no_grad():
        lm.model.layers[1].self_attn.k_proj.weight.mul_(2.0)
    second = lean_weights(lm)
    assert second is not first
    k_rows = slice(64, 128)
    torch.testing.assert_close(
        second.layers[1].qkv.weight_t[:, k_rows].t(), lm.model.layers[1].self_attn.k_proj.weight
    )
    with torch.inference_mode():
        kv = prefill(lm, torch.randn(1, 5, 64), lean=False)
        x, pos = torch.randn(1, 1, 64), torch.tensor([[5]])
        torch.testing.assert_close(
            LlamaSteps(lm, kv, 1).forward(x, pos, None),
            HFSteps(lm, kv).forward(x, pos, None),
            rtol=1e-5,
            atol=1e-5,
        )


def test_other_models_use_the_library_forward():
    scaled = _llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert not lean_llama_supported(scaled)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2))
    assert not lean_llama_supported(gpt2)
    kv = [(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))]
    assert isinstance(make_steps(gpt2, kv, 4), HFSteps)
    assert isinstance(make_steps(_llama(), prefill(_llama(), torch.randn(1, 3, 64)), 4, lean=False), HFSteps)


LAYOUTS = ["mm", "linear"] + (["packed"] if torch.backends.mkldnn.is_available() else [])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kv_heads", [4, 2])
@torch.inference_mode()
def test_rows_share_their_prefix_without_copies(layout, kv_heads, monkeypatch):
    """Rows of several prompts read each prompt's one prefix cache (groups of unequal sizes, out of
    order), and give the logits the library computes on a per-row copy of the prefix, also after
    finished rows leave (the group layout changes with them)."""
    monkeypatch.setattr(kv_decode, "LAYOUT", layout)
    lm = _llama(kv_heads, seed=3)
    assert lean_weights(lm).layout == layout
    g = torch.Generator().manual_seed(5)
    prefixes = prefill(lm, torch.randn(3, 7, 64, generator=g), lean=False)  # 3 prompts, P = 7
    row_prefix = [2, 0, 2, 2, 1, 0]
    per_row = torch.tensor(row_prefix)
    copies = [(k[per_row], v[per_row]) for k, v in prefixes]
    # Questions of 4, 2 and 3 tokens: right-aligned after a masked gap, positions skip it.
    lengths = [4, 2, 3, 4, 3, 2]
    embeds = torch.randn(6, 4, 64, generator=g)
    positions = torch.tensor([[0] * (4 - n) + list(range(7, 7 + n)) for n in lengths])
    key_mask = torch.tensor([[1] * 7 + [0] * (4 - n) + [1] * n for n in lengths])
    lean = LlamaSteps(lm, prefixes, 9, row_prefix)
    ref = HFSteps(lm, copies)
    assert lean.buffer.shape[2] == 6 and all(k.shape[0] == 3 for k, _ in lean.prefix)
    pos, mask = positions[:, -1:] + 1, key_mask
    torch.testing.assert_close(
        lean.forward(embeds, positions, key_mask),
        ref.forward(embeds, positions, key_mask),
        rtol=1e-5,
        atol=1e-5,
    )
    embed = lm.get_input_embeddings()
    for step, keep in enumerate([None, [0, 2, 3, 5], None, [1, 3], None]):
        if keep is not None:
            rows = torch.tensor(keep)
            lean.keep(rows)
            ref.keep(rows)
            pos, mask = pos[rows], mask[rows]
        ids = torch.full((len(pos), 1), step + 1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        torch.testing.assert_close(
            lean.forward(embed(ids), pos, mask), ref.forward(embed(ids), pos, mask), rtol=1e-5, atol=1e-5
        )
        pos = pos + 1
    assert lean.rows == [row_prefix[i] for i in (2, 5)]  # rows 1 and 3 of [0, 2, 3, 5]


@torch.inference_mode()
def test_one_prefix_for_every_row_is_read_in_place():
    """The usual request: every row on one image reads that image's cached tensors themselves."""
    lm = _llama()
    prefix = prefill(lm, torch.randn(1, 5, 64))
    steps = make_steps(lm, prefix, 4, row_prefix=[0] * 3)
    assert isinstance(steps, LlamaSteps)
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(steps.prefix, prefix))
    assert steps.index is None and steps.per_group == 3
    x = torch.randn(3, 2, 64)
    pos = torch.tensor([[5, 6]] * 3)
    ref = make_steps(lm, prefix, 4, lean=False, row_prefix=[0] * 3)
    torch.testing.assert_close(steps.forward(x, pos, None), ref.forward(x, pos, None), rtol=1e-5, atol=1e-5)


def test_row_prefix_out_of_range_is_an_error():
    lm = _llama()
    with torch.inference_mode():
        prefix = prefill(lm, torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="row_prefix"):
        LlamaSteps(lm, prefix, 4, [0, 2])


def test_weight_layout_follows_the_weights_size(monkeypatch):
    """Small LMs: transposed copies (per-call cost); mid-sized: oneDNN-packed copies on CPU;
    beyond the copy limit: the original weights."""
    lm = _llama()
    assert LeanLlamaWeights(lm).layout == "mm"
    monkeypatch.setattr(kv_decode, "MM_COPY_BYTES", 0)
    assert LeanLlamaWeights(lm).layout == ("packed" if torch.backends.mkldnn.is_available() else "mm")
    monkeypatch.setattr(kv_decode, "COPY_LIMIT_BYTES", 0)
    assert LeanLlamaWeights(lm).layout == "linear"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN packing")
@torch.inference_mode()
def test_packed_layout_takes_one_row_through_the_layers_own_weights(monkeypatch):
    """A one-row step on packed weights multiplies by the layers' own weights (faster for one row
    than the packed kernel): the same logits as the library's forward, bias included."""
    monkeypatch.setattr(kv_decode, "LAYOUT", "packed")
    lm = _llama(2, seed=7, attention_bias=True, mlp_bias=True)
    assert lean_weights(lm).layout == "packed"
    kv = prefill(lm, torch.randn(1, 5, 64), lean=False)
    x, pos = torch.randn(1, 1, 64), torch.tensor([[5]])
    torch.testing.assert_close(
        LlamaSteps(lm, kv, 1).forward(x, pos, None),
        HFSteps(lm, kv).forward(x, pos, None),
        rtol=1e-5,
        atol=1e-5,
    )


BF16_PACKABLE = torch.backends.mkldnn.is_available() and kv_decode._cpu_has_bf16_instructions()


def test_bf16_weights_are_packed_where_the_cpu_has_bf16_instructions(monkeypatch):
    """A mid-sized bf16 LM decodes on oneDNN-packed copies on CPUs with bf16 instructions (its
    packed step is the fastest measured there), on transposed copies elsewhere."""
    lm = _llama().to(torch.bfloat16)
    monkeypatch.setattr(kv_decode, "MM_COPY_BYTES", 0)
    assert LeanLlamaWeights(lm).layout == ("packed" if BF16_PACKABLE else "mm")
    # plain AVX-512 (oneDNN would emulate bf16; never measured): transposed copies
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert LeanLlamaWeights(lm).layout == "mm"


@pytest.mark.parametrize("layout", LAYOUTS if BF16_PACKABLE else ["mm", "linear"])
@torch.inference_mode()
def test_bf16_lean_steps_follow_the_library_forward(layout, monkeypatch):
    """In bfloat16 the lean steps (every layout) stay within bf16 rounding of the library's own
    bf16 forward over a prefix, a masked gap and decode steps, and pick the same tokens."""
    monkeypatch.setattr(kv_decode, "LAYOUT", layout)
    lm = _llama(2, seed=11).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    kv = prefill(lm, torch.randn(2, 7, 64, generator=g).bfloat16(), lean=False)
    suffix = torch.randn(2, 3, 64, generator=g).bfloat16()
    positions = torch.tensor([[7, 8, 9], [0, 7, 8]])
    key_mask = torch.ones(2, 10, dtype=torch.long)
    key_mask[1, 7] = 0
    lean = _run(LlamaSteps(lm, kv, 8), suffix, positions, key_mask, lm)
    ref = _run(HFSteps(lm, kv), suffix, positions, key_mask, lm)
    for a, b in zip(lean, ref):
        assert a.dtype == b.dtype == torch.bfloat16
        scale = b.float().abs().max()
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=0.05 * float(scale))
        assert (a.float().argmax(-1) == b.float().argmax(-1)).all()
