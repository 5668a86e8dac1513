"""Greedy decoding of a batch of questions that continue cached prompt prefixes.

Each row is ``[prefix | pad gap | question]``: the question right-aligned after a padding gap
that is masked out and skipped in positions, so every row's last token sits in the same slot and
one forward gives every row's next-token logits.  Finished rows leave the batch, so no compute is
spent on padding after EOS.

A byte-level tokenizer's token may hold part of a character's UTF-8 bytes, so answers are turned
into text through the tokens' bytes (:class:`AnswerText`): text ends before the first byte sequence
that is not a complete character, never with U+FFFD for a split character.
"""

from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from model.inference.kv_decode import DecodeSteps

__all__ = [
    "STOP_STRING",
    "AnswerText",
    "DecodeTimes",
    "Generated",
    "QuestionBatch",
    "StopString",
    "complete_utf8",
    "greedy_decode",
    "question_batch",
    "token_bytes",
]

STOP_STRING = "###"  # the template's turn separator (model.prompt)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback
_METASPACE = "\u2581"
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decoder_types(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """Types of the fast tokenizer's decoder (a ``Sequence``'s members included); empty if slow."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    spec = json.loads(backend.to_str()).get("decoder") or {}
    return {spec.get("type", "")} | {d.get("type", "") for d in spec.get("decoders", [])}


def _build_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes] | None:
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    if "ByteLevel" in _decoder_types(tokenizer):
        # Lazy import: the module is heavy and only its GPT-2 byte alphabet is needed.
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        table = []
        for i, piece in enumerate(pieces):
            piece = piece or ""
            if i in special or not all(c in to_byte for c in piece):
                table.append(b"" if i in special else piece.encode("utf-8"))  # added tokens are plain text
            else:
                table.append(bytes(to_byte[c] for c in piece))
        return table
    if any(_BYTE_PIECE.match(p or "") for p in pieces):
        table = []
        for i, piece in enumerate(pieces):
            m = _BYTE_PIECE.match(piece or "")
            if i in special:
                table.append(b"")
            elif m:
                table.append(bytes([int(m.group(1), 16)]))
            else:
                table.append((piece or "").replace(_METASPACE, " ").encode("utf-8"))
        return table
    return None


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes] | None:
    """The UTF-8 bytes each token id stands for (special tokens: ``b""``), for byte-level BPE and
    SentencePiece byte-fallback vocabularies; None for others.  Built once per tokenizer."""
    try:
        return _TABLES[tokenizer]
    except KeyError:
        table = _TABLES[tokenizer] = _build_table(tokenizer)
        return table


def complete_utf8(data: bytes) -> str:
    """``data`` decoded up to the first byte that does not belong to a complete UTF-8 character
    (an incomplete tail or an invalid sequence ends the text there)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        return data[: err.start].decode("utf-8")


class AnswerText:
    """Generated ids -> answer text: special tokens dropped, text up to the last complete character
    (:func:`complete_utf8`) and before ``stop_text``, stripped.

    Text holds U+FFFD only where the model produced that character's own bytes.  Answers without
    a broken character are exactly the tokenizer's ``decode``; for a vocabulary whose token bytes
    are unknown (:func:`token_bytes` is None), a decoded U+FFFD ends the text.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop_text: str | None = STOP_STRING) -> None:
        self.tokenizer = tokenizer
        self.stop_text = stop_text
        self.table = token_bytes(tokenizer)

    def raw(self, ids: Sequence[int]) -> str:
        """The complete characters of ``ids`` (special tokens dropped), before any stop text."""
        tok = self.tokenizer
        text = tok.decode(list(ids), skip_special_tokens=True)
        if "\ufffd" not in text:  # the usual case: nothing split, the tokenizer's own text
            return text
        if self.table is None:
            return text.split("\ufffd")[0]
        text = complete_utf8(b"".join(self.table[i] for i in ids))
        if getattr(tok, "clean_up_tokenization_spaces", False):
            text = tok.clean_up_tokenization(text)
        return text

    def __call__(self, ids: Sequence[int]) -> str:
        text = self.raw(ids)
        return (text.split(self.stop_text)[0] if self.stop_text else text).strip()


class StopString:
    """Detects ``text`` at the end of a row's decoded tokens (models that skip EOS write the next
    turn's separator instead).

    A stop string that newly appears overlaps the last token's text, and the overlap ends the
    string: only tokens holding its last byte (:attr:`tokens`) can complete it, so only those
    are worth checking the last ``window`` tokens for.  Compared as bytes where the vocabulary's
    bytes are known (:func:`token_bytes`): a token may hold part of a character.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text: str = STOP_STRING, window: int = 4) -> None:
        self.tokenizer = tokenizer
        self.text = text
        self.table = token_bytes(tokenizer)
        self.data = text.encode("utf-8")
        # A token holds at least one byte, so this many tokens always cover the stop text.
        self.window = max(window, len(self.data)) if self.table is not None else window
        if self.table is not None:
            self.tokens = {i for i, b in enumerate(self.table) if self.data[-1] in b}
        else:
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            self.tokens = {i for i, piece in enumerate(pieces) if text[-1] in (piece or "")}

    def ends(self, tokens: list[int]) -> bool:
        """True when ``tokens`` (one row's generated ids so far) now end an answer."""
        if tokens[-1] not in self.tokens:
            return False
        last = tokens[-self.window :]
        if self.table is not None:
            return self.data in b"".join(self.table[t] for t in last)
        return self.text in self.tokenizer.decode(last)


@dataclass
class QuestionBatch:
    """Question tokens of R rows laid out after prefixes of ``P`` positions.

    ``ids``, ``positions``: ``(R, Lq)`` (gap positions are 0 and masked); ``key_mask``:
    ``(R, P + Lq)`` long, 1 = attend, or None when no row has a gap (equal lengths need no mask
    in any step, as finished rows are dropped whole).
    """

    ids: torch.Tensor
    positions: torch.Tensor
    key_mask: torch.Tensor | None


def question_batch(
    questions: Sequence[Sequence[int]], prefix_len: int, pad_id: int, device: torch.device
) -> QuestionBatch:
    """Right-align ``questions`` (token ids per row) after a prefix of ``prefix_len`` positions."""
    q_len = max(len(q) for q in questions)
    gaps = [q_len - len(q) for q in questions]
    # Built as Python lists: one tensor each instead of a few small ops per row.
    ids = torch.tensor(
        [[pad_id] * g + list(q) for g, q in zip(gaps, questions)], dtype=torch.long, device=device
    )
    positions = torch.tensor(
        [[0] * g + list(range(prefix_len, prefix_len + q_len - g)) for g in gaps],
        dtype=torch.long,
        device=device,
    )
    mask = None
    if any(gaps):
        mask = torch.tensor(
            [[1] * prefix_len + [0] * g + [1] * (q_len - g) for g in gaps], dtype=torch.long, device=device
        )
    return QuestionBatch(ids, positions, mask)


@dataclass
class Generated:
    """One row's answer: ``tokens`` without EOS or anything after the stop string's token;
    ``probs``: the probability of every chosen token, EOS included."""

    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)


@dataclass
class DecodeTimes:
    """Where :func:`greedy_decode`'s time went: the question forward (all rows' question tokens,
    giving each row's first answer token) and the one-token decode steps after it; ``tokens``:
    the rows' tokens those steps produced (one per row a step)."""

    question_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0
    tokens: int = 0


def greedy_decode(
    steps: DecodeSteps,
    question: Callable[[], torch.Tensor],
    batch: QuestionBatch,
    embed: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int,
    stop: StopString,
    max_new_tokens: int,
    times: DecodeTimes | None = None,
) -> list[Generated]:
    """Greedy answers of every row of ``batch``.

    ``steps``: decode steps holding each row's prefix KV (:func:`model.inference.kv_decode.make_steps`);
    ``question``: runs the rows' question tokens ``batch.ids`` through ``steps`` (region tokens
    filled in) and returns each row's next-token logits ``(R, V)``; ``embed``: the LM's token
    embedding, ``(R', 1)`` ids -> ``(R', 1, D)``.  A row ends at EOS, at the stop
    string or after ``max_new_tokens`` tokens.  ``times``, if given, is added the time spent.
    """
    t0 = time.perf_counter()
    mask = batch.key_mask
    logits = question()
    next_pos = batch.positions[:, -1:] + 1
    rows = [Generated() for _ in range(len(logits))]
    active = list(range(len(rows)))
    t_question, n_steps, n_tokens = 0.0, 0, 0
    for step in range(max_new_tokens):
        p = torch.softmax(logits.float(), dim=-1)
        chosen, nxt = p.max(dim=-1)
        if step == 0:
            t_question = time.perf_counter()
        else:
            n_steps, n_tokens = n_steps + 1, n_tokens + len(active)
        done = []
        for j, (r, t, c) in enumerate(zip(active, nxt.tolist(), chosen.tolist())):
            rows[r].probs.append(c)
            if t == eos_id:
                done.append(j)
            else:
                rows[r].tokens.append(t)
                if stop.ends(rows[r].tokens):
                    done.append(j)
        if step + 1 == max_new_tokens or len(done) == len(active):
            break
        if done:
            finished = set(done)
            keep_rows = [j for j in range(len(active)) if j not in finished]
            keep = torch.tensor(keep_rows, device=nxt.device, dtype=torch.long)
            active = [active[j] for j in keep_rows]
            nxt, next_pos = nxt[keep], next_pos[keep]
            if mask is not None:
                mask = mask[keep]
            steps.keep(keep)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = steps.forward(embed(nxt[:, None]), next_pos, mask)
        next_pos = next_pos + 1
    if times is not None:
        end = time.perf_counter()
        times.question_s += t_question - t0
        times.decode_s += end - t_question
        times.steps += n_steps
        times.tokens += n_tokens
    return rows
