"""A request's questions as a token tree: shared leading tokens computed once, tokens an earlier
request on the image computed reused, and the answers still the naive path's."""

from __future__ import annotations

import pytest
import torch

from model.inference import engine as engine_module
from model.inference.describe import describe_regions
from model.inference.engine import InferenceEngine
from model.inference.question_tree import QuestionNodes, question_tree
from model.inference.reference import generate_naive
from model.tasks import ATTRIBUTE_QUESTION, CAPTION_QUESTION, RELATION_QUESTION
from tests.test_engine import _inputs, _scrambled_model


def test_tree_shares_leading_tokens_and_lays_rows_out_right_aligned():
    keys = [[1, 2, 3], [1, 2, 4, 5], [1, 6], [1, 2, 3]]  # row 3 repeats row 0
    tree = question_tree(keys, [0, 0, 0, 0], torch.device("cpu"))
    # Nodes: 1, 2, 3, 4, 5, 6 (the repeated question adds none).
    assert tree.size == 6 and not tree.context and tree.depth.tolist() == [0, 1, 2, 2, 3, 1]
    width = 4
    assert tree.slots.view(4, width).tolist() == [[0, 0, 1, 2], [0, 1, 3, 4], [0, 0, 0, 5], [0, 0, 1, 2]]
    assert tree.source.tolist()[:3] == [1, 2, 3]  # row 0 is right-aligned after one gap slot
    leaves = tree.leaves.tolist()
    assert [leaves[i] for i in tree.leaf.tolist()] == [2, 4, 5, 2]
    ancestors = tree.ancestors.nonzero().tolist()
    assert [c for r, c in ancestors if r == 4] == [0, 1, 3, 4]  # node 5: 1 -> 2 -> 4 -> 5
    # Another prefix (image) never shares nodes, even for the same tokens.
    two = question_tree([[1, 2], [1, 2]], [0, 1], torch.device("cpu"))
    assert two.size == 4 and two.group == [0, 0, 1, 1]


def test_stored_nodes_are_context_and_a_stored_question_needs_no_forward():
    store = QuestionNodes(capacity=8)
    first = question_tree([[1, 2, 3]], [0], torch.device("cpu"), [store])
    store.add(first.keys, torch.zeros(1, 2, first.size, 1, 2), {first.finals[0][1]: torch.ones(5)})
    assert len(store) == 3
    # A question sharing two tokens: those are known, the rest computed.
    second = question_tree([[1, 2, 4]], [0], torch.device("cpu"), [store])
    assert len(second.context) == 2 and second.size == 1 and second.slots.tolist() == [0, 1, 2]
    # The same question again: every node known, its logits stored.
    again = question_tree([[1, 2, 3]], [0], torch.device("cpu"), [store])
    assert again.size == 0 and len(again.context) == 3 and [r for r, _ in again.stored] == [0]
    # Beyond the capacity the least recently read nodes go.
    store.add(second.keys, torch.zeros(1, 2, 1, 1, 2), {})
    store.add([("x", i) for i in range(5)], torch.zeros(1, 2, 5, 1, 2), {})
    assert len(store) == 8 and store.kv is not None and store.kv.shape[2] == 8


@pytest.mark.parametrize("nodes_per_prefix", [10, 1])  # room for every request; evicting
def test_warm_new_box_requests_equal_the_naive_path(nodes_per_prefix, monkeypatch):
    """Requests about a box drawn after the others (caption, attributes, relations), one after
    another on one engine: later ones read the question tokens earlier ones stored, and every
    answer equals the naive path's."""
    monkeypatch.setattr(engine_module, "QUESTION_NODES_PER_PREFIX", nodes_per_prefix)
    m = _scrambled_model()
    images, boxes = _inputs(1)
    image, all_boxes = images[0], boxes[0]
    extra = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4]])
    all_boxes = torch.cat([all_boxes, extra])
    engine = InferenceEngine(m, "t", max_new_tokens=6)
    for n in range(len(all_boxes) - 2, len(all_boxes) + 1):
        b = all_boxes[:n]
        report = describe_regions(
            engine, [image], [b], attributes=list(ATTRIBUTE_QUESTION)[:2], only=[[n - 1]]
        )[0]
        ref = f"<region{n}>"
        region = report.regions[n - 1]
        asked = [(CAPTION_QUESTION.format(a=ref), region.caption)]
        asked += [(ATTRIBUTE_QUESTION[a].format(a=ref), ans) for a, ans in region.attributes.items()]
        asked += [
            (RELATION_QUESTION.format(a=f"<region{r.source + 1}>", b=f"<region{r.target + 1}>"), r.answer)
            for r in report.relations
        ]
        for question, ans in asked:
            text, score = generate_naive(m, image, b, question, max_new_tokens=6)
            assert ans.text == text, (n, question)
            assert ans.score == pytest.approx(score, abs=1e-4)
    stats = engine.stats.extra
    assert stats["question_nodes_known"] > 0  # later requests read stored question tokens
    state = next(iter(engine._cache._items.values()))[0]
    assert 0 < len(state.questions) <= state.questions.capacity
    # The last request once more: with room, its question tokens and first answer tokens are stored.
    before = stats["question_nodes"]
    describe_regions(
        engine, [image], [all_boxes], attributes=list(ATTRIBUTE_QUESTION)[:2], only=[[len(all_boxes) - 1]]
    )
    if nodes_per_prefix == 10:  # nothing evicted: no question token computed again
        assert stats["question_nodes"] == before
