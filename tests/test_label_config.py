"""Label config parsing: what the backend fills in is read from the project's XML."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from backend.label_config import ConfigError, parse_label_config
from model.tasks import RELATION_LABELS
from toyworld.scenes import COLORS, SHAPES, SIZE_FRACTIONS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "label_config"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model" / "default"

HEAD = (
    '<View><Image name="img" value="$picture"/>'
    '<RectangleLabels name="box" toName="img"><Label value="A"/></RectangleLabels>'
)


def cfg(body: str) -> str:
    return f"{HEAD}{body}</View>"


def test_region_caption_config():
    c = parse_label_config((CONFIG_DIR / "region_caption.xml").read_text())
    assert (c.image_name, c.image_var, c.caption) == ("image", "image", "caption")
    assert [(r.name, r.type, r.smart) for r in c.rects] == [("bbox", "rectanglelabels", True)]
    assert c.attributes == () and not c.wants_relations
    assert c.warnings == ()


def test_caption_attributes_config_uses_model_vocabulary():
    c = parse_label_config((CONFIG_DIR / "caption_attributes.xml").read_text())
    by_name = {a.name: a for a in c.attributes}
    assert set(by_name) == {"color", "shape", "size"}
    assert set(by_name["color"].values["color"]) == set(COLORS)
    assert set(by_name["shape"].values["shape"]) == set(SHAPES)
    assert set(by_name["size"].values["size"]) == set(SIZE_FRACTIONS)
    assert c.wanted_attributes == ("color", "shape", "size")


def test_caption_relations_config_declares_every_model_relation():
    c = parse_label_config((CONFIG_DIR / "caption_relations.xml").read_text())
    assert set(c.relation_labels) == set(RELATION_LABELS)
    assert c.wants_relations and c.relation_text is None


def test_choices_mapped_by_values_keep_config_spelling():
    c = parse_label_config(
        cfg(
            '<Choices name="tint" toName="img" perRegion="true"><Choice value="Red"/><Choice value="Blue"/>'
            '<Choice value="other"/></Choices>'
        )
    )
    (control,) = c.attributes
    assert control.values == {"color": {"red": "Red", "blue": "Blue"}}
    assert not control.multiple


def test_single_choice_spanning_two_attributes_serves_the_best_covered():
    c = parse_label_config(
        cfg(
            '<Choices name="attrs" toName="img" perRegion="true"><Choice value="red"/><Choice value="green"/>'
            '<Choice value="circle"/></Choices>'
        )
    )
    assert c.attributes[0].attributes == ("color",)
    multi = parse_label_config(
        cfg(
            '<Choices name="attrs" toName="img" perRegion="true" choice="multiple"><Choice value="red"/>'
            '<Choice value="circle"/><Choice value="large"/></Choices>'
        )
    )
    assert set(multi.attributes[0].attributes) == {"color", "shape", "size"}


def test_choices_named_after_attribute():
    c = parse_label_config(
        cfg(
            '<Choices name="obj_colour" toName="img" perRegion="true"><Choice value="RED"/>'
            '<Choice value="circle"/></Choices>'
        )
    )
    assert c.attributes[0].values == {"color": {"red": "RED"}}


def test_taxonomy_paths():
    c = parse_label_config(
        cfg(
            '<Taxonomy name="tax" toName="img" perRegion="true"><Choice value="Colour"><Choice value="red"/>'
            '<Choice value="blue"/></Choice>'
            '<Choice value="Shape"><Choice value="square"/></Choice></Taxonomy>'
        )
    )
    (control,) = c.attributes
    assert control.type == "taxonomy" and control.multiple
    assert control.values["color"]["red"] == ("Colour", "red")
    assert control.values["shape"]["square"] == ("Shape", "square")


def test_relation_labels_normalised_and_unknown_ignored():
    c = parse_label_config(
        cfg(
            '<TextArea name="cap" toName="img" perRegion="true"/><Relations><Relation value="left_of"/>'
            '<Relation value="Right-Of"/><Relation value="holds"/></Relations>'
        )
    )
    assert c.relation_labels == {"left of": "left_of", "right of": "Right-Of"}
    only_unknown = parse_label_config(
        cfg(
            '<TextArea name="cap" toName="img" perRegion="true"/>'
            '<Relations><Relation value="holds"/></Relations>'
        )
    )
    assert only_unknown.relation_labels == {} and not only_unknown.wants_relations
    assert any("Relations" in w for w in only_unknown.warnings)


def test_relation_text_area_fallback():
    c = parse_label_config(cfg('<TextArea name="relations" toName="img"/>'))
    assert c.relation_text == "relations" and c.wants_relations and c.caption is None


def test_image_level_choices_left_alone_with_warning():
    c = parse_label_config(
        cfg(
            '<TextArea name="cap" toName="img" perRegion="true"/>'
            '<Choices name="color" toName="img"><Choice value="red"/></Choices>'
        )
    )
    assert c.attributes == ()
    assert any("color" in w for w in c.warnings)


@pytest.mark.parametrize(
    "xml, needle",
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        (
            '<View><RectangleLabels name="b" toName="i"/>'
            '<TextArea name="c" toName="i" perRegion="true"/></View>',
            "no <Image",
        ),
        (
            '<View><Image name="i" value="$image"/><TextArea name="c" toName="i" perRegion="true"/></View>',
            "RectangleLabels",
        ),
        ('<View><Image name="i" value="$image"/><RectangleLabels name="b" toName="other"/></View>', "toName"),
        (
            '<View><Image name="i" value="image"/><RectangleLabels name="b" toName="i"/>'
            '<TextArea name="c" toName="i" perRegion="true"/></View>',
            "$field",
        ),
        ('<View><Image name="i" value="$image"/><RectangleLabels name="b" toName="i"/></View>', "nothing"),
        ('<!DOCTYPE x [<!ENTITY a "aaaa">]><View><Image name="i" value="$image"/></View>', "DTD"),
    ],
)
def test_unservable_configs_raise_clear_errors(xml, needle):
    with pytest.raises(ConfigError) as info:
        parse_label_config(xml)
    assert needle in str(info.value)


# ---------------------------------------------------------------------- what the model cannot fill in (yet)
UNKNOWN = (CONFIG_DIR / "unknown_choices.xml").read_text()


def test_unknown_choices_config_says_what_it_will_not_fill_in():
    c = parse_label_config(UNKNOWN)
    warnings = "\n".join(c.warnings)
    assert len(c.warnings) == 4, warnings
    assert "2 <Image> tags" in warnings and "['reference']" in warnings
    assert "['Crimson', 'Teal'] are color values the model does not predict yet" in warnings
    assert '<Choices name="condition"> matches no attribute' in warnings
    assert "['touches'] are not relations the model predicts yet" in warnings
    assert c.open_controls == {"color": "color"}
    assert c.new_relation_labels == {"touches": "touches"}
    (color,) = c.attributes
    assert color.values["color"]["crimson"] == "Crimson" and color.new_values == ("crimson", "teal")
    mapping = c.summary()
    assert mapping["attributes"] == {
        "color": {"color": {"known": ["blue", "green", "red", "yellow"], "new": ["Crimson", "Teal"]}}
    }
    assert mapping["relations"] == {
        "known": ["above", "below", "left_of", "right_of"],
        "new": ["touches"],
        "asked": True,
    }
    assert (mapping["image"], mapping["image_field"], mapping["caption"]) == ("image", "image", "caption")


def test_shipped_configs_have_no_warnings():
    for name in ("region_caption", "caption_attributes", "caption_relations"):
        assert parse_label_config((CONFIG_DIR / f"{name}.xml").read_text()).warnings == (), name


def test_values_a_control_cannot_show_are_warned_about():
    foreign = parse_label_config(
        cfg('<Choices name="colour" toName="img" perRegion="true"><Choice value="red"/>'
            '<Choice value="circle"/></Choices>')
    )  # fmt: skip
    assert any("['circle'] are not color values" in w for w in foreign.warnings), foreign.warnings
    single = parse_label_config(
        cfg('<Choices name="attrs" toName="img" perRegion="true"><Choice value="red"/><Choice value="green"/>'
            '<Choice value="circle"/></Choices>')
    )  # fmt: skip
    assert any("filled with color only; ['circle']" in w for w in single.warnings), single.warnings
    closed = parse_label_config(
        cfg('<Choices name="tint" toName="img" perRegion="true"><Choice value="Red"/>'
            '<Choice value="Crimson"/></Choices>')
    )  # fmt: skip
    assert closed.open_controls == {} and closed.attributes[0].values == {"color": {"red": "Red"}}
    assert any("['Crimson'] are not values the model knows" in w for w in closed.warnings), closed.warnings
    second = parse_label_config(
        cfg(
            '<TextArea name="cap" toName="img" perRegion="true"/>'
            '<TextArea name="note" toName="img" perRegion="true"/>'
        )
    )
    assert any('name="note"> is left empty' in w for w in second.warnings), second.warnings


def test_taxonomy_named_after_an_attribute_learns_its_new_leaves():
    c = parse_label_config(
        cfg('<Taxonomy name="color" toName="img" perRegion="true"><Choice value="Warm"><Choice value="red"/>'
            '<Choice value="Crimson"/></Choice></Taxonomy>')
    )  # fmt: skip
    (control,) = c.attributes
    assert control.values["color"] == {"red": ("Warm", "red"), "crimson": ("Warm", "Crimson")}
    assert control.new_values == ("crimson",)  # the inner node "Warm" is not a value


def test_corrections_keep_new_values_and_relations_and_training_reads_them():
    """'Crimson' chosen in an open control and a 'touches' relation are stored as answers and become
    training turns; the training data path encodes them like any other answer."""
    from backend.corrections import annotation_record, parse_result
    from model.config import load_model_config
    from model.data.converters import validate_record
    from model.data.dataset import RecordDataset, record_turns
    from model.prompt import PromptBuilder
    from model.tokenizer import load_tokenizer
    from tools.ls.payloads import region_items, relation_item

    c = parse_label_config(UNKNOWN)
    a = region_items("a", (10, 10, 40, 40), 100, 100, "a small crimson circle")
    b = region_items("b", (60, 10, 90, 40), 100, 100)
    color = {
        **a[0],
        "from_name": "color",
        "type": "choices",
        "value": {**a[0]["value"], "choices": ["Crimson"]},
    }
    color["value"].pop("rectanglelabels")
    condition = {**color, "from_name": "condition", "value": {**color["value"], "choices": ["scratched"]}}
    result = [*a, *b, color, condition, relation_item("a", "b", ["left_of", "touches"])]
    parsed = parse_result(
        result,
        c.image_name,
        c.caption,
        open_controls=c.open_controls,
        new_relations=tuple(c.new_relation_labels),
    )
    region_a = parsed.regions[0]
    assert region_a.attributes == {"color": "crimson"}  # 'scratched' answers no model question
    assert [(r.target, r.labels) for r in region_a.relations] == [("b", ("left of", "touches"))]
    without_config = parse_result(result)  # a config-less delivery keeps only what the model knows
    assert without_config.regions[0].attributes == {}
    assert [r.labels for r in without_config.regions[0].relations] == [("left of",)]

    record = annotation_record(7, 1, 3, "/data/upload/1/x.png", 100, 100, parsed.regions)
    validate_record(record)
    turns = dict(record_turns(record))
    assert "crimson" in turns.values() and "left of, touches" in turns.values()
    # The training data path (model.data.dataset) with the embedded default's tokenizer and prompts.
    cfg = load_model_config(DEFAULT_MODEL)
    tokenizer = load_tokenizer(DEFAULT_MODEL / "tokenizer")
    builder = PromptBuilder(tokenizer, cfg.prompt, num_image_tokens=4)
    model = SimpleNamespace(prompts=builder, cfg=cfg)  # what RecordDataset reads in text_only mode
    sample = RecordDataset([record], model, text_only=True, separate_turns=True)[0]
    answers = []
    for prompt in sample.prompts:
        ids = [lab for lab in prompt.labels if lab != -100]
        answers.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    assert "crimson" in answers and "left of, touches" in answers, answers


def test_new_vocabulary_is_filled_in_once_the_model_answers_it():
    """After training on corrections the model may answer 'crimson' / 'touches': the backend returns
    the config's own spelling; answers the config does not declare are still never returned."""
    from backend.results import Region, TaskPlan, region_results, relation_results
    from model.inference.describe import ImageReport, RegionReport, RelationReport
    from model.inference.engine import Answer

    c = parse_label_config(UNKNOWN)
    regions = [
        Region("a", "bbox", "rectanglelabels", ["Object"], pixels=(10, 10, 40, 40)),
        Region("b", "bbox", "rectanglelabels", ["Object"], pixels=(60, 10, 90, 40)),
    ]
    crimson = RegionReport(Answer("a crimson circle", 0.9, 4), {"color": Answer("crimson", 0.8, 1)})
    pink = RegionReport(Answer("a pink circle", 0.9, 4), {"color": Answer("pink", 0.8, 1)})
    items = region_results(regions[0], crimson, c, 100, 100) + region_results(regions[1], pink, c, 100, 100)
    assert [(r["id"], r["value"]["choices"]) for r in items if r["from_name"] == "color"] == [
        ("a", ["Crimson"])
    ]
    report = ImageReport(
        [crimson, pink],
        [
            RelationReport(0, 1, ["left of"], Answer("left of, touches", 0.7, 4)),
            RelationReport(1, 0, ["right of"], Answer("right of, holds", 0.7, 4)),
        ],
    )
    relations = relation_results(TaskPlan(1, "img", regions), report, c)
    assert [(r["from_id"], r["to_id"], r["labels"]) for r in relations] == [
        ("a", "b", ["left_of", "touches"]),
        ("b", "a", ["right_of"]),
    ]
