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


# ------------------------------------------------------------ configs real teams write (2026-12-03)
def corrected_attributes(c, chosen: str) -> dict[str, str]:
    """The attributes a correction choosing ``chosen`` in the ``color`` control of ``c`` teaches."""
    from backend.corrections import parse_result

    rect = {"id": "a", "type": "rectanglelabels", "from_name": "box", "to_name": "img",
            "original_width": 100, "original_height": 80,
            "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["A"]}}  # fmt: skip
    choice = {
        "id": "a",
        "type": "choices",
        "from_name": "color",
        "to_name": "img",
        "value": {"choices": [chosen]},
    }
    parsed = parse_result([rect, choice], open_controls=c.open_controls, aliases=c.choice_aliases)
    return parsed.regions[0].attributes


def test_choice_aliases_are_what_predictions_carry_and_corrections_translate_back():
    """Label Studio stores ``alias ?? value`` and selects a prediction's choice by it."""
    c = parse_label_config(
        cfg(
            '<Choices name="color" toName="img" perRegion="true">'
            '<Choice value="Red" alias="r"/><Choice value="Crimson" alias="cr"/></Choices>'
        )
    )
    (control,) = c.attributes
    assert control.values["color"]["red"] == "r"  # the model's "red" is answered as the alias
    assert c.choice_aliases == {"color": {"r": "Red", "cr": "Crimson"}}
    assert c.summary()["attributes"]["color"]["color"] == {"known": ["r"], "new": ["cr"]}
    assert corrected_attributes(c, "cr") == {"color": "crimson"}  # the value is learnt, not "cr"


def test_an_alias_that_is_the_known_word_is_learnt_as_itself():
    """``value="Rot" alias="red"`` (a localised label over the canonical word): "red" is stored and
    predicted, and a correction of "red" teaches red, not "rot"."""
    c = parse_label_config(
        cfg('<Choices name="color" toName="img" perRegion="true"><Choice value="Rot" alias="red"/></Choices>')
    )
    assert c.attributes[0].values["color"] == {"red": "red"} and c.choice_aliases == {}
    assert corrected_attributes(c, "red") == {"color": "red"}


def test_controls_shown_on_another_answer_are_filled_everywhere():
    """``whenTagName`` beside ``whenChoiceValue`` names a Choices, not a region tool."""
    c = parse_label_config(
        cfg(
            '<Choices name="has" toName="img"><Choice value="Yes"/></Choices>'
            '<View visibleWhen="choice-selected" whenTagName="has" whenChoiceValue="Yes">'
            '<TextArea name="caption" toName="img" perRegion="true"/></View>'
            '<View whenLabelValue="B"><Choices name="color" toName="img" perRegion="true">'
            '<Choice value="red"/></Choices></View>'
        )
    )
    assert c.shows("caption", ["A"], "box") and c.shows("color", ["A"], "box")  # a View needs visibleWhen
    assert any("fills it on every region" in w and "whenChoiceValue" in w for w in c.warnings)


def test_the_served_image_is_the_one_with_something_to_fill():
    c = parse_label_config(
        '<View><Image name="ref" value="$reference"/><Image name="image" value="$image"/>'
        '<Rectangle name="refbox" toName="ref"/>'
        '<RectangleLabels name="bbox" toName="image"><Label value="A"/></RectangleLabels>'
        '<TextArea name="caption" toName="image" perRegion="true"/></View>'
    )
    assert (c.image_name, c.caption, [r.name for r in c.rects]) == ("image", "caption", ["bbox"])
    assert any("'refbox'" in w or "refbox" in w for w in c.warnings)


def test_nested_image_fields_resolve_and_templates_are_refused_by_name():
    from backend.label_config import task_field

    c = parse_label_config(
        cfg('<TextArea name="c" toName="img" perRegion="true"/>').replace("$picture", "$meta.url")
    )
    assert c.image_var == "meta.url"
    assert task_field({"meta": {"url": "http://x/a.png"}}, c.image_var) == "http://x/a.png"
    assert task_field({"images": [{"url": "u"}]}, "images[0].url") == "u"
    assert task_field({"a.b": 1}, "a.b") == 1 and task_field({"images": []}, "images[2].url") is None
    with pytest.raises(ConfigError, match="Repeater"):
        parse_label_config(
            '<View><Repeater on="$images" indexFlag="{{idx}}">'
            '<Image name="image_{{idx}}" value="$images[{{idx}}].url"/>'
            '<RectangleLabels name="b_{{idx}}" toName="image_{{idx}}"><Label value="A"/></RectangleLabels>'
            '<TextArea name="c_{{idx}}" toName="image_{{idx}}" perRegion="true"/></Repeater></View>'
        )
    with pytest.raises(ConfigError, match="multi-page"):
        parse_label_config(
            cfg('<TextArea name="c" toName="img" perRegion="true"/>').replace(
                'value="$picture"', 'valueList="$pages"'
            )
        )


def test_lowercase_attributes_camel_case_names_and_near_misses():
    c = parse_label_config(cfg('<TextArea name="caption" toname="img" perregion="true"/>'))
    assert c.caption == "caption"  # Label Studio's editor reads attribute names in any case
    c = parse_label_config(
        cfg('<Choices name="objColor" toName="img" perRegion="true"><Choice value="Teal"/></Choices>')
    )
    assert c.open_controls == {"objColor": "color"}
    with pytest.raises(ConfigError) as info:
        parse_label_config(cfg('<TextArea name="caption" toName="img"/>'))
    assert 'Found: <TextArea name="caption"> is not per-region' in info.value.message
    with pytest.raises(ConfigError) as info:
        parse_label_config(cfg('<Relations><Relation value="touches"/></Relations>'))
    assert "declares no label the model predicts" in info.value.message


def test_unfilled_and_conditional_controls_are_named_in_warnings():
    c = parse_label_config(
        cfg(
            '<Labels name="kind" toName="img"><Label value="Text"/></Labels>'
            '<TextArea name="transcription" toName="img" perRegion="true"/>'
            '<View visibleWhen="region-selected"><Choices name="color" toName="img" perRegion="true" '
            'whenLabelValue="A"><Choice value="red"/></Choices></View>'
            '<Rating name="quality" toName="img" perRegion="true"/>'
        )
    )
    text = " | ".join(c.warnings)
    assert '<Labels name="kind"> is not predicted: a region\'s labels in it are kept' in text
    assert '<Rating name="quality"> is not a control this backend fills' in text
    assert "not transcriptions" in text
    assert 'whenLabelValue="A"' in text and "filled only there" in text and "visibleWhen" not in text
    assert c.shows("color", ["A"], "box") and not c.shows("color", ["B"], "box")


def test_huge_configs_warn_in_bounded_lines():
    """20,000 open values and 500 controls: every value is served, the warnings stay readable (the
    summary /setup answers is linear now; it was quadratic: 12.7 s at 40,000 values)."""
    values = "".join(f'<Choice value="Pantone {k}"/>' for k in range(20_000))
    many = "".join(
        f'<Choices name="c{k}" toName="img" perRegion="true"><Choice value="x"/></Choices>'
        for k in range(500)
    )
    c = parse_label_config(
        cfg(f'<Choices name="color" toName="img" perRegion="true">{values}</Choices>{many}')
    )
    assert len(c.summary()["attributes"]["color"]["color"]["new"]) == 20_000
    assert len(c.warnings) == 51 and c.warnings[-1] == "... and 451 more warnings"  # 1 + 500 in all
    assert max(len(w) for w in c.warnings) < 1000
