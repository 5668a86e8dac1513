"""Answers are whole characters: a byte-level token holding part of a character never becomes U+FFFD."""

from __future__ import annotations

import pytest

from model.inference.decode import AnswerText, StopString, complete_utf8, token_bytes
from tests.model_helpers import tiny_tokenizer

# Chinese, Arabic (RTL), an emoji ZWJ sequence, combining marks, a flag, mixed with ASCII.
TEXTS = [
    "红色的圆形",
    "a 小 red 三角形",
    "مربع أحمر كبير",
    "👩\u200d💻 and 👨\u200d👩\u200d👧",
    "e\u0301 n\u0303 a\u0308\u0304",
    "🇯🇵 flag",
]


def _ids(text: str) -> list[int]:
    return tiny_tokenizer()(text, add_special_tokens=False).input_ids


def _byte_len(ids: list[int]) -> int:
    """Bytes ``ids`` stand for, counted on the GPT-2 alphabet pieces (one character per byte)."""
    return sum(len(p) for p in tiny_tokenizer().convert_ids_to_tokens(ids))


def _whole_chars(text: str, nbytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 fits in ``nbytes``."""
    out, used = [], 0
    for ch in text:
        used += len(ch.encode("utf-8"))
        if used > nbytes:
            break
        out.append(ch)
    return "".join(out)


@pytest.mark.parametrize("text", TEXTS)
def test_every_token_prefix_gives_whole_characters(text):
    tok = tiny_tokenizer()
    ids = _ids(text)
    raw = AnswerText(tok, None).raw
    assert raw(ids) == text  # the whole sequence round-trips
    split = 0
    for k in range(len(ids) + 1):
        got = raw(ids[:k])
        split += "\ufffd" in tok.decode(ids[:k])
        assert "\ufffd" not in got, (k, got)
        assert got == _whole_chars(text, _byte_len(ids[:k])), k
    assert split, "the tokenizer never split a character here: the case is not exercised"


def test_answer_ending_mid_character_drops_the_tail():
    tok = tiny_tokenizer()
    text = AnswerText(tok, "###")
    ids = _ids("a 红")
    assert tok.decode(ids[:-1]).endswith("\ufffd")
    assert text(ids[:-1]) == "a"
    assert text(ids) == "a 红"


def test_invalid_bytes_end_the_text():
    tok = tiny_tokenizer()
    lead = _ids("红")[:1]  # a lead byte without its continuation bytes
    cont = _ids("红")[-1:]  # continuation bytes without their lead byte
    text = AnswerText(tok, "###")
    assert text(_ids("ok ") + lead + _ids(" red")) == "ok"
    assert text(cont + _ids("red")) == ""
    assert text(_ids("蓝") + cont + _ids("蓝")) == "蓝"


def test_a_real_replacement_character_is_kept():
    tok = tiny_tokenizer()
    ids = _ids("a\ufffdb")
    assert AnswerText(tok, "###")(ids) == "a\ufffdb"
    assert AnswerText(tok, "###")(ids + _ids("红")[:1]) == "a\ufffdb"


def test_special_tokens_and_stop_text():
    tok = tiny_tokenizer()
    text = AnswerText(tok, "###")
    ids = _ids("红色") + [tok.eos_token_id] + _ids("###蓝") + _ids("绿")[:1]
    assert text(ids) == "红色"
    ascii_ids = _ids("  a small red circle ")
    assert text(ascii_ids) == tok.decode(ascii_ids, skip_special_tokens=True).strip()  # unchanged


def test_complete_utf8():
    assert complete_utf8("añ😀".encode()) == "añ😀"
    assert complete_utf8("añ😀".encode()[:-1]) == "añ"
    assert complete_utf8(b"ab\xffcd") == "ab"
    assert complete_utf8(b"") == ""


def test_token_bytes_of_a_byte_level_vocabulary():
    tok = tiny_tokenizer()
    table = token_bytes(tok)
    assert table is token_bytes(tok)  # built once
    for text in TEXTS:
        assert b"".join(table[i] for i in _ids(text)) == text.encode("utf-8")
    assert all(table[i] == b"" for i in tok.all_special_ids)


def test_stop_string_split_inside_a_character():
    """A non-ASCII stop text is found when its bytes arrive over several tokens."""
    tok = tiny_tokenizer()
    stop = StopString(tok, "。")
    ids = _ids("好。")
    assert len(ids) > 2  # the full stop's bytes are split over tokens
    assert not any(stop.ends(ids[:k]) for k in range(1, len(ids)))
    assert stop.ends(ids)
    assert AnswerText(tok, "。")(ids + _ids("x")) == "好"


def test_engine_and_naive_cut_split_characters_alike():
    """A random model emits lone non-ASCII bytes: both paths end the text there, alike, without U+FFFD."""
    from model.inference.engine import InferenceEngine
    from model.inference.reference import generate_naive
    from tests.test_engine import QUESTIONS, _inputs, _scrambled_model

    m = _scrambled_model(whole_characters=False)
    images, boxes = _inputs(2)
    queries = [(i, q) for i in range(2) for q in QUESTIONS]
    engine = InferenceEngine(m, "t", max_new_tokens=12)
    seen: list[list[int]] = []
    assemble = engine.text
    engine.text = lambda ids: seen.append(list(ids)) or assemble(ids)
    got = engine.answer(images, boxes, queries)
    assert sum("\ufffd" in m.tokenizer.decode(ids) for ids in seen) >= len(queries) // 2  # exercised
    for (i, q), ans in zip(queries, got):
        text, score = generate_naive(m, images[i], boxes[i], q, max_new_tokens=12)
        assert ans.text == text and "\ufffd" not in text, (i, q)
        assert ans.raw_score == pytest.approx(score, abs=1e-4)
