"""Conversation templates and prompt encoding (the only place that knows the templates).

Templates by name (``PromptConfig.template``):

``roi_v0`` (this project's default; GPT4RoI / LLaVA-v0 ``conv_v1_2`` shape, answers end with EOS)::

    <s>{system}\\n\\n### Human: The <image> provides an overview of the picture.   <- prefix (same for all)
    \\n{question 1}\\n### Assistant:                                               <- question segment
     {answer 1}</s>                                                               <- answer segment (trained)
    \\n### Human: {question 2}\\n### Assistant:  {answer 2}</s> ...

``gpt4roi_v0`` (as the official checkpoints were trained, train.py ``_add_speaker_and_signal``):
the same text, but an answer ends with ``\\n###`` instead of EOS and the next turn continues
`` Human: ...``; segments are tokenised as continuations of the text before them, so the ids equal
those of the whole conversation tokenised at once (a SentencePiece tokenizer would otherwise put a
word-start marker at every segment start).  Generation stops at ``###``.

``chat_template``: the tokenizer's own chat template (system message, then one user message
holding the image introduction and the question); the turn-end text after an answer is trained.

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
POINT = "<point>"  # defined by GPT4RoI (id 32003 in its vocabulary), never used in a prompt
# GPT4RoI's added tokens in its order (after [PAD]); the prompts need all but <point>.
ADDED_TOKENS = [IM_PATCH, BBOX, POINT, IM_START, IM_END]
REQUIRED_TOKENS = [IM_PATCH, BBOX, IM_START, IM_END]
STOP_TEXT = "###"  # the v0 templates' turn separator
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
        missing = [t for t in REQUIRED_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"tokenizer lacks the special tokens {missing}; call model.tokenizer.add_special_tokens"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token")
        self.tok = tokenizer
        self.cfg = cfg
        self.template = cfg.template
        self.num_image_tokens = num_image_tokens
        self._memo: dict[tuple[str, str], tuple[int, ...]] = {}
        if self.template == "chat_template":
            self._chat = _ChatPieces(tokenizer, cfg)
        elif tokenizer.eos_token_id is None and self.template == "roi_v0":
            raise ValueError("tokenizer has no EOS token")
        self._prefix = self._build_prefix()

    @property
    def stop_text(self) -> str | None:
        """Text that ends an answer besides EOS (None: EOS only)."""
        return self._chat.stop if self.template == "chat_template" else STOP_TEXT

    def _ids(self, text: str, after: str = "") -> list[int]:
        """Ids of ``text``; with ``after`` (the template text before it), the ids ``text`` gets when
        tokenised together with ``after`` (falls back to ``text`` alone when the tokenizer merges
        across the boundary).  The ``roi_v0`` template always tokenises segments alone."""
        # Questions repeat (a few templates over many boxes) and a tokenizer call costs about as
        # much as a decode step of a small LM, so tokenised texts are memoised (bounded).
        key = (after, text)
        ids = self._memo.get(key)
        if ids is None:
            if len(self._memo) >= 4096:
                self._memo.clear()
            ids = self._memo[key] = tuple(self._encode(text, after))
        return list(ids)

    def _encode(self, text: str, after: str) -> list[int]:
        def enc(t: str) -> list[int]:
            return self.tok(t, add_special_tokens=False).input_ids

        if not after or self.template == "roi_v0":
            return enc(text)
        head, both = enc(after), enc(after + text)
        return both[len(head) :] if both[: len(head)] == head else enc(text)

    def _image_text(self) -> str:
        return IM_START + IM_PATCH * self.num_image_tokens + IM_END

    def _build_prefix(self) -> list[int]:
        if self.template == "chat_template":
            return self._ids(self._chat.prefix.replace(IMAGE_TOKEN, self._image_text()))
        text = f"{self.cfg.system}\n\n### Human: {self.cfg.image_intro}"
        text = text.replace(IMAGE_TOKEN, self._image_text())
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return bos + self._ids(text)

    @property
    def prefix_ids(self) -> list[int]:
        """Ids shared by every prompt on an image: BOS, system text, image tokens."""
        return list(self._prefix)

    def question_ids(self, question: str, first: bool, num_boxes: int | None) -> tuple[list[int], list[int]]:
        """Ids of one human turn up to the assistant's turn, and its region order."""
        text, order = expand_regions(question.strip(), num_boxes)
        if self.template == "chat_template":
            seg = (self._chat.first if first else self._chat.later).replace(_Q, text)
            after = self._chat.before_first if first else self._chat.stop_after
            return self._ids(seg, after), order
        if self.template == "gpt4roi_v0" and not first:
            return self._ids(f" Human: {text}\n### Assistant:", after="\n" + STOP_TEXT), order
        seg = f"\n{text}\n### Assistant:" if first else f"\n### Human: {text}\n### Assistant:"
        return self._ids(seg, after=self.cfg.image_intro.split(IMAGE_TOKEN)[-1]), order

    def answer_ids(self, answer: str) -> list[int]:
        """Ids of one answer with its end (EOS, ``\\n###`` or the chat template's turn end): the
        tokens that carry the loss."""
        if self.template == "chat_template":
            return self._ids(answer.strip() + self._chat.answer_end, after=self._chat.before_answer)
        if self.template == "gpt4roi_v0":
            return self._ids(" " + answer.strip() + "\n" + STOP_TEXT, after="### Assistant:")
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
        """Generated ids -> answer text (EOS and special tokens dropped, stop text cut)."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        stop = self.stop_text
        return (text.split(stop)[0] if stop else text).strip()


_Q = "\x00QUESTION\x00"  # stand-ins located in the rendered chat template
_A = "\x00ANSWER\x00"
_Q2 = "\x00QUESTION2\x00"


class _ChatPieces:
    """The tokenizer's chat template cut into the pieces the builder needs, found by rendering
    conversations with stand-in texts: ``prefix`` (up to the first question), ``first``/``later``
    (a question turn up to the assistant's answer, with :data:`_Q` for the question),
    ``answer_end`` (what follows an answer) and the texts just before each piece."""

    def __init__(self, tok: PreTrainedTokenizerBase, cfg: PromptConfig) -> None:
        if not getattr(tok, "chat_template", None):
            raise ValueError("prompt.template 'chat_template' but the tokenizer has no chat template")
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        user = {"role": "user", "content": f"{cfg.image_intro}\n{_Q}"}

        def render(messages: list[dict[str, str]], generation: bool) -> str:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

        one = render([*system, user], True)
        answered = render([*system, user, {"role": "assistant", "content": _A}], False)
        two = render(
            [*system, user, {"role": "assistant", "content": _A}, {"role": "user", "content": _Q2}], True
        )
        q_at = one.index(_Q)
        cut = q_at - 1 if one[q_at - 1 : q_at] == "\n" else q_at  # the newline before the question
        self.prefix = one[:cut]
        self.first = one[cut:]
        self.before_first = self.prefix[-16:]
        a_at = answered.index(_A)
        self.before_answer = answered[max(0, a_at - 16) : a_at]
        closing = answered[a_at + len(_A) :]  # the turn end when the answer is the last message
        later = two[two.index(_A) + len(_A) :]
        same = 0
        while same < min(len(closing), len(later)) and closing[same] == later[same]:
            same += 1
        self.answer_end = later[:same]
        self.later = later[same:].replace(_Q2, _Q)
        self.stop_after = self.answer_end[-16:] if self.answer_end else self.before_answer
        self.stop = self.answer_end.strip() or None
