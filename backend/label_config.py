"""Label Studio labeling config (XML) -> what the backend fills in for a project.

The backend never hard-codes control names: it reads them from the project's config.

* ``<Image name value="$var">`` — the image tag; ``task.data[var]`` is the image URL.
* ``<RectangleLabels>`` / ``<Rectangle>`` pointing at that image — the boxes to describe.
* a per-region ``<TextArea perRegion="true">`` — receives the caption.
* per-region ``<Choices>`` / ``<Taxonomy>`` — receive attribute answers (colour, shape, size) when
  the control is named after an attribute (``color``, ``colour``, ``shape``, ``size``) or its
  values overlap the model's vocabulary for one (``model.tasks.attribute_vocabulary``).  Only values
  the config declares are ever returned.
* ``<Relations>`` — relation labels matching ``model.tasks.RELATION_LABELS`` (case-insensitive,
  ``_``/``-`` read as spaces) are returned as relations between boxes; without ``<Relations>``, a
  non-per-region TextArea whose name contains ``relation`` gets the relations as text.

A config the backend cannot serve raises :class:`ConfigError` with a message for the user.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache

from backend.errors import ClientError
from model.tasks import ATTRIBUTE_QUESTION, attribute_vocabulary, normalize_relation_label

RECT_TAGS = {"rectanglelabels": "rectanglelabels", "rectangle": "rectangle"}
ATTRIBUTE_NAMES = {"color": "color", "colour": "color", "shape": "shape", "size": "size"}
MAX_CONFIG_CHARS = 1_000_000


class ConfigError(ClientError):
    """A labeling config the backend cannot serve (the message says why)."""


@dataclass(frozen=True)
class RectControl:
    """A rectangle control drawing on the served image."""

    name: str
    type: str  # "rectanglelabels" or "rectangle"
    labels: tuple[str, ...]
    smart: bool


@dataclass(frozen=True)
class AttributeControl:
    """A per-region Choices/Taxonomy control filled from attribute answers.

    ``values[attribute][model word]`` is the config's own value: a string for Choices, a path
    (tuple of strings, root first) for Taxonomy.
    """

    name: str
    type: str  # "choices" or "taxonomy"
    values: dict[str, dict[str, str | tuple[str, ...]]]
    multiple: bool

    @property
    def attributes(self) -> tuple[str, ...]:
        return tuple(self.values)


@dataclass(frozen=True)
class LabelConfig:
    """Everything :mod:`backend.predictions` needs to know about a project's config."""

    image_name: str
    image_var: str
    rects: tuple[RectControl, ...]
    caption: str | None = None
    attributes: tuple[AttributeControl, ...] = ()
    relation_labels: dict[str, str] = field(default_factory=dict)  # model label -> config label
    has_relations: bool = False
    relation_text: str | None = None
    control_names: frozenset[str] = frozenset()
    warnings: tuple[str, ...] = ()

    @property
    def rect_names(self) -> frozenset[str]:
        return frozenset(r.name for r in self.rects)

    def rect(self, name: str) -> RectControl:
        for r in self.rects:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def wanted_attributes(self) -> tuple[str, ...]:
        """Attribute questions to ask (model order), only those some control can show."""
        wanted = {a for c in self.attributes for a in c.attributes}
        return tuple(a for a in ATTRIBUTE_QUESTION if a in wanted)

    @property
    def wants_relations(self) -> bool:
        return bool(self.relation_labels) or self.relation_text is not None

    def summary(self) -> dict:
        """What the backend will fill in (for logs and the /setup answer)."""
        return {
            "image": self.image_name,
            "boxes": sorted(self.rect_names),
            "caption": self.caption,
            "attributes": {c.name: list(c.attributes) for c in self.attributes},
            "relations": sorted(self.relation_labels.values()) or self.relation_text,
        }


def _bool(node: ET.Element, attr: str) -> bool:
    return node.get(attr, "false").strip().lower() == "true"


def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def _choice_value(node: ET.Element) -> str | None:
    value = node.get("value")
    if value is None:
        value = node.get("alias")
    return value


def _taxonomy_paths(node: ET.Element, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every path (root first) of a Taxonomy's nested ``<Choice>`` tree."""
    paths = []
    for child in node:
        if _strip_ns(child.tag) != "choice":
            continue
        value = _choice_value(child)
        if value is None:
            continue
        path = prefix + (value,)
        paths.append(path)
        paths += _taxonomy_paths(child, path)
    return paths


def _name_attribute(name: str) -> str | None:
    """Attribute named by a control name such as ``color`` or ``obj_colour``."""
    words = re.split(r"[^a-z]+", name.lower())
    hits = {ATTRIBUTE_NAMES[w] for w in words if w in ATTRIBUTE_NAMES}
    return hits.pop() if len(hits) == 1 else None


def _attribute_control(node: ET.Element, kind: str) -> AttributeControl | None:
    """Map a per-region Choices/Taxonomy onto model attributes (``None``: nothing to fill)."""
    name = node.get("name", "")
    vocab = attribute_vocabulary()
    if kind == "choices":
        entries: list[tuple[str, str | tuple[str, ...]]] = [
            (v, v) for v in (_choice_value(c) for c in node.iter() if _strip_ns(c.tag) == "choice") if v
        ]
    else:
        entries = [(path[-1], path) for path in _taxonomy_paths(node)]
    values: dict[str, dict[str, str | tuple[str, ...]]] = {}
    for attr, words in vocab.items():
        matched = {label.strip().lower(): out for label, out in entries if label.strip().lower() in words}
        if matched:
            values[attr] = matched
    multiple = kind == "taxonomy" or node.get("choice", "single").lower() == "multiple"
    named = _name_attribute(name)
    if named is not None:
        values = {named: values.get(named, {})}
    elif len(values) > 1 and not multiple:
        # A single-choice control can show one answer: serve the attribute it covers best.
        best = max(values, key=lambda a: len(values[a]))
        values = {best: values[best]}
    values = {a: v for a, v in values.items() if v}
    if not values:
        return None
    return AttributeControl(name=name, type=kind, values=values, multiple=multiple)


def _reject_dtd(xml: str) -> None:
    head = xml.upper()
    if "<!DOCTYPE" in head or "<!ENTITY" in head:
        raise ConfigError("label config must not contain a DTD or entity declarations")


@lru_cache(maxsize=64)
def parse_label_config(xml: str) -> LabelConfig:
    """Parse and check a labeling config; raises :class:`ConfigError` with a clear message."""
    if not isinstance(xml, str) or not xml.strip():
        raise ConfigError("label config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise ConfigError(f"label config is too long ({len(xml)} characters)")
    _reject_dtd(xml)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConfigError(f"label config is not valid XML: {exc}") from None
    nodes = list(root.iter())
    tags = [(_strip_ns(n.tag), n) for n in nodes]
    images = {n.get("name"): n for t, n in tags if t == "image" and n.get("name")}
    if not images:
        raise ConfigError(
            'label config has no <Image name=... value="$..."> tag; this backend describes images'
        )
    rect_nodes = [(t, n) for t, n in tags if t in RECT_TAGS and n.get("name")]
    if not rect_nodes:
        raise ConfigError("label config has no <RectangleLabels> (or <Rectangle>) control to draw boxes with")
    image_name = next((n.get("toName") for _, n in rect_nodes if n.get("toName") in images), None)
    if image_name is None:
        raise ConfigError(f"no rectangle control points at an Image (toName must be one of {sorted(images)})")
    value = images[image_name].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(f'<Image name="{image_name}"> needs value="$field", got {value!r}')
    rects = tuple(
        RectControl(
            name=n.get("name", ""),
            type=RECT_TAGS[t],
            labels=tuple(v for v in (_choice_value(c) for c in n if _strip_ns(c.tag) == "label") if v),
            smart=_bool(n, "smart") or _bool(n, "smartOnly"),
        )
        for t, n in rect_nodes
        if n.get("toName") == image_name
    )

    def targets_image(n: ET.Element) -> bool:
        return image_name in (n.get("toName") or "").split(",")

    caption = None
    relation_text = None
    attributes: list[AttributeControl] = []
    for t, n in tags:
        if t == "textarea" and targets_image(n):
            if _bool(n, "perRegion"):
                caption = caption or n.get("name")
            elif "relation" in (n.get("name") or "").lower():
                relation_text = relation_text or n.get("name")
        elif t in ("choices", "taxonomy") and targets_image(n) and _bool(n, "perRegion"):
            control = _attribute_control(n, t)
            if control is not None:
                attributes.append(control)
    relations_nodes = [n for t, n in tags if t == "relations"]
    relation_labels: dict[str, str] = {}
    for rel_node in relations_nodes:
        for child in rel_node:
            label = child.get("value")
            known = normalize_relation_label(label) if label else None
            if known and known not in relation_labels:
                relation_labels[known] = label  # type: ignore[assignment]
    has_relations = bool(relations_nodes)
    warnings: list[str] = []
    if has_relations:
        relation_text = None  # real relations take precedence over text
        if not relation_labels:
            warnings.append(
                "<Relations> declares no label the model predicts (left of, right of, above, below, "
                "larger than, smaller than; underscores or hyphens allowed): no relations will be returned"
            )
    mapped = {c.name for c in attributes}
    for t, n in tags:
        if t in ("choices", "taxonomy") and n.get("name") not in mapped:
            warnings.append(
                f'<{n.tag} name="{n.get("name")}"> is not per-region or matches no attribute: left empty'
            )
    config = LabelConfig(
        image_name=image_name,
        image_var=value[1:],
        rects=rects,
        caption=caption,
        attributes=tuple(attributes),
        relation_labels=relation_labels,
        has_relations=has_relations,
        relation_text=relation_text,
        control_names=frozenset(n.get("name") for _, n in tags if n.get("name") and n.get("toName")),
        warnings=tuple(warnings),
    )
    if caption is None and not attributes and not config.wants_relations:
        raise ConfigError(
            'nothing for the backend to fill in: add a per-region <TextArea perRegion="true"> for captions, '
            "per-region <Choices> for colour/shape/size, or <Relations>"
        )
    return config
