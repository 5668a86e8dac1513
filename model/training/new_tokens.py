"""Input-embedding rows a model never trained, lifted to the trained rows' scale before a
fine-tuning run teaches them.

A token that never occurred in a model's training inputs keeps its initial input row: a small
random vector (a byte of a script the model never wrote, a word of a held-out concept).  A short
fine-tuning run moves such rows little, so the LM reads them as noise.  Adding the trained rows'
mean puts them where the LM reads tokens; training then only has to tell them apart.  A row is
untrained when its norm is below ``ratio`` times the median norm of the rows of ``trained`` tokens
(every row of a pretrained LLM is trained, so none is lifted).  The mean can be short, so a lifted
row may still look untrained: callers pass each token once per lineage (the fine-tuning job
records the lifted tokens in ``version.json``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from model.mllm import RegionMLLM

__all__ = ["lift_untrained_rows", "text_token_ids"]


def text_token_ids(model: RegionMLLM, texts: Iterable[str]) -> set[int]:
    """The ids of the tokens ``model``'s tokenizer makes of ``texts`` (no special tokens)."""
    ids: set[int] = set()
    for text in texts:
        ids.update(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


@torch.no_grad()
def lift_untrained_rows(
    model: RegionMLLM, needed: Iterable[int], trained: Iterable[int], ratio: float = 0.5
) -> list[int]:
    """Add the mean of the ``trained`` tokens' input rows (``[V, D]`` embedding) to the rows of
    the ``needed`` tokens whose norm is below ``ratio`` x the trained rows' median norm; returns
    those token ids (sorted; empty when ``trained`` names no row)."""
    weight = model.lm.get_input_embeddings().weight
    reference = sorted(i for i in set(trained) if 0 <= i < weight.shape[0])
    if not reference:
        return []
    rows = weight[reference].float()  # [R, D]
    floor = ratio * rows.norm(dim=1).median()
    lifted = sorted(
        i
        for i in set(needed) - set(reference)
        if 0 <= i < weight.shape[0] and weight[i].float().norm() < floor
    )
    if lifted:
        weight[lifted] += rows.mean(dim=0).to(weight.dtype)
    return lifted
