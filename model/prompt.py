"""Conversation template and prompt encoding (the only place that knows the template).

Text layout (GPT4RoI / LLaVA-v0 ``conv_v1_2`` shape)::

    <s>{system}\\n\\n### Human: The <image> provides an overview of the picture.   <- prefix (same for all)
    \\n{question 1}\\n### Assistant:                                               <- question segment
     {answer 1}</s>                                                               <- answer segment (trained)
    \\n### Human: {question 2}\\n### Assistant:  {answer 2}</s> ...

``<image>`` becomes ``<im_start>`` + P x ``<im_patch>`` + ``<im_end>``; ``<regionN>`` becomes
``regionN <bbox>`` and each ``<bbox>`` embedding is later replaced by the feature of box N-1.
The prefix is identical for every question on an image, which lets the inference engine cache it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from model.config import PromptConfig

__all__ = [
    "ADDED_TOKENS",
    "BBOX",
    "EncodedPrompt",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IM_END",
    "IM_PATCH",
    "IM_START",
    "PromptBuilder",
    "PromptError",
    "expand_regions",
]

IMAGE_TOKEN = "<image>"
IM_PATCH = "<im_patch>"
IM_START = "<im_start>"
IM_END = "<im_end>"
BBOX = "<bbox>"
ADDED_TOKENS = [IM_PATCH, BBOX, IM_START, IM_END]
IGNORE_INDEX = -100
REGION_RE = re.compile(r"<region(\d+)>")


class PromptError(ValueError):
    """A prompt that does not fit its boxes (unknown region index, no region, ...)."""


def expand_regions(text: str, num_boxes: int | None = None) -> tuple[str, list[int]]:
    """Rewrite ``<regionN>`` as ``regionN <bbox>``; return the text and the 0-based box indices
    in order of occurrence (the order in which region features replace ``<bbox>`` embeddings)."""
    order: list[int] = []

    def repl(m: re.Match[str]) -> str:
        n = int(m.group(1))
        if n < 1 or (num_boxes is not None and n > num_boxes):
            raise PromptError(f"<region{n}> refers to a box that does not exist ({num_boxes} boxes given)")
        order.append(n - 1)
        return f"region{n} {BBOX}"

    if BBOX in text:
        raise PromptError(f"write regions as <regionN>, not raw {BBOX}")
    return REGION_RE.sub(repl, text), order


@dataclass
class EncodedPrompt:
    """Token ids of one conversation.  ``labels`` is -100 outside answers; ``region_order`` lists the
    box index each ``<bbox>`` token takes, in order of occurrence."""

    input_ids: list[int]
    labels: list[int]
    region_order: list[int] = field(default_factory=list)


class PromptBuilder:
    """Builds token ids for training conversations and inference questions."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: PromptConfig, num_image_tokens: int) -> None:
        missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"tokenizer lacks the special tokens {missing}; call model.tokenizer.add_special_tokens"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token")
        self.tok = tokenizer
        self.cfg = cfg
        self.num_image_tokens = num_image_tokens
        self._memo: dict[str, tuple[int, ...]] = {}
        self._prefix = self._build_prefix()

    def _ids(self, text: str) -> list[int]:
        # Questions repeat (a few templates over many boxes) and a tokenizer call costs about as
        # much as a decode step of a small LM, so tokenised texts are memoised (bounded).
        ids = self._memo.get(text)
        if ids is None:
            if len(self._memo) >= 4096:
                self._memo.clear()
            ids = self._memo[text] = tuple(self.tok(text, add_special_tokens=False).input_ids)
        return list(ids)

    def _build_prefix(self) -> list[int]:
        image = IM_START + IM_PATCH * self.num_image_tokens + IM_END
        text = f"{self.cfg.system}\n\n### Human: {self.cfg.image_intro}".replace(IMAGE_TOKEN, image)
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + self._ids(text)

    @property
    def prefix_ids(self) -> list[int]:
        """Ids shared by every prompt on an image: BOS, system text, image tokens."""
        return list(self._prefix)

    def question_ids(self, question: str, first: bool, num_boxes: int | None) -> tuple[list[int], list[int]]:
        """Ids of one human turn up to ``### Assistant:``, and its region order."""
        text, order = expand_regions(question.strip(), num_boxes)
        seg = f"\n{text}\n### Assistant:" if first else f"\n### Human: {text}\n### Assistant:"
        return self._ids(seg), order

    def answer_ids(self, answer: str) -> list[int]:
        """Ids of one answer, EOS included (these tokens carry the loss)."""
        return self._ids(" " + answer.strip()) + [self.tok.eos_token_id]

    def encode_conversation(self, turns: list[tuple[str, str]], num_boxes: int) -> EncodedPrompt:
        """Training sample: ``turns`` = [(question, answer), ...]; loss only on answers."""
        if not turns:
            raise PromptError("a conversation needs at least one (question, answer) turn")
        ids = self.prefix_ids
        labels = [IGNORE_INDEX] * len(ids)
        order: list[int] = []
        for i, (question, answer) in enumerate(turns):
            q_ids, q_order = self.question_ids(question, first=i == 0, num_boxes=num_boxes)
            a_ids = self.answer_ids(answer)
            ids += q_ids + a_ids
            labels += [IGNORE_INDEX] * len(q_ids) + a_ids
            order += q_order
        return EncodedPrompt(ids, labels, order)

    def encode_question(self, question: str, num_boxes: int) -> EncodedPrompt:
        """Inference prompt: prefix + one question, ending at ``### Assistant:``."""
        q_ids, order = self.question_ids(question, first=True, num_boxes=num_boxes)
        ids = self.prefix_ids + q_ids
        return EncodedPrompt(ids, [IGNORE_INDEX] * len(ids), order)

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> answer text (EOS and special tokens dropped, stop string cut)."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        return text.split("###")[0].strip()
