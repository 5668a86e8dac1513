"""Greedy decoding of a batch of questions that continue cached prompt prefixes.

Each row is ``[prefix | pad gap | question]``: the question right-aligned after a padding gap
that is masked out and skipped in positions, so every row's last token sits in the same slot and
one forward gives every row's next-token logits.  Finished rows leave the batch, so no compute is
spent on padding after EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from model.inference.kv_decode import DecodeSteps

__all__ = ["STOP_STRING", "Generated", "QuestionBatch", "StopString", "greedy_decode", "question_batch"]

STOP_STRING = "###"  # the template's turn separator (model.prompt)


class StopString:
    """Detects ``text`` at the end of a row's decoded tokens (models that skip EOS write the next
    turn's separator instead).

    A stop string that newly appears overlaps the last token's text, and the overlap ends the
    string: only tokens holding its last character (:attr:`tokens`) can complete it, so only those
    are worth decoding the last ``window`` tokens for.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text: str = STOP_STRING, window: int = 4) -> None:
        self.tokenizer = tokenizer
        self.text = text
        self.window = window
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.tokens = {i for i, piece in enumerate(pieces) if text[-1] in (piece or "")}

    def ends(self, tokens: list[int]) -> bool:
        """True when ``tokens`` (one row's generated ids so far) now end an answer."""
        return tokens[-1] in self.tokens and self.text in self.tokenizer.decode(tokens[-self.window :])


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


def greedy_decode(
    steps: DecodeSteps,
    embeds: torch.Tensor,
    batch: QuestionBatch,
    embed: Callable[[torch.Tensor], torch.Tensor],
    eos_id: int,
    stop: StopString,
    max_new_tokens: int,
) -> list[Generated]:
    """Greedy answers of every row of ``batch``.

    ``steps``: decode steps holding each row's prefix KV (:func:`model.inference.kv_decode.make_steps`);
    ``embeds``: ``(R, Lq, D)`` embeddings of ``batch.ids`` with region tokens filled in; ``embed``:
    the LM's token embedding, ``(R', 1)`` ids -> ``(R', 1, D)``.  A row ends at EOS, at the stop
    string or after ``max_new_tokens`` tokens.
    """
    mask = batch.key_mask
    logits = steps.forward(embeds, batch.positions, mask)
    next_pos = batch.positions[:, -1:] + 1
    rows = [Generated() for _ in range(len(embeds))]
    active = list(range(len(rows)))
    for step in range(max_new_tokens):
        p = torch.softmax(logits.float(), dim=-1)
        chosen, nxt = p.max(dim=-1)
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
    return rows
