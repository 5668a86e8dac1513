"""Label config parsing: what the backend fills in is read from the project's XML."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.label_config import ConfigError, parse_label_config
from model.tasks import RELATION_LABELS
from toyworld.scenes import COLORS, SHAPES, SIZE_FRACTIONS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "label_config"

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
