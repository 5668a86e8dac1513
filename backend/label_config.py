"""Label Studio labeling config (XML) -> what the backend fills in for a project.

The backend never hard-codes control names: it reads them from the project's config.

* ``<Image name value="$var">`` — the image tag; ``task.data[var]`` is the image URL.  With several
  images, the one the first region control points at is served (a warning names the others).
* region controls pointing at that image — the regions to describe: ``<RectangleLabels>``,
  ``<PolygonLabels>``, ``<EllipseLabels>``, ``<KeyPointLabels>``, ``<BrushLabels>`` and their
  label-less forms (``<Rectangle>``, ``<Polygon>``, ...); :mod:`backend.region_shapes` says which
  box the model describes for each.
* a per-region ``<TextArea perRegion="true">`` — receives the caption.
* per-region ``<Choices>`` / ``<Taxonomy>`` — receive attribute answers (colour, shape, size) when
  the control is named after an attribute (``color``, ``colour``, ``shape``, ``size``) or its
  values overlap the model's vocabulary for one (``model.tasks.attribute_vocabulary``).  Only values
  the config declares are ever returned.  A control *named* after its attribute is open: its values
  the model does not know yet (``Crimson``) are new vocabulary — corrections choosing them are
  stored and trained on, and the backend returns them once the model answers them.
* ``<Relations>`` — relation labels matching ``model.tasks.RELATION_LABELS`` (case-insensitive,
  ``_``/``-`` read as spaces) are returned as relations between boxes; other labels (``touches``)
  are new vocabulary as above (returned once the model says them, if the config also has a label
  the model predicts, so that relations are asked at all).  Without ``<Relations>``, a
  non-per-region TextArea whose name contains ``relation`` gets the relations as text.
* region questions (:mod:`backend.region_qa`): a non-per-region ``<TextArea>`` named ``question``
  or ``prompt`` (or containing either word) holds the questions the annotator types; one named
  ``answer`` (or containing it) receives the answers in the interactive request.

Everything the backend will not fill in, or fills in only after training, is listed in
:attr:`LabelConfig.warnings` (``/setup`` answers and logs them).  A config the backend cannot serve
raises :class:`ConfigError` with a message for the user.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from functools import lru_cache

from backend.errors import ClientError
from backend.region_shapes import REGION_TYPES
from model.tasks import (
    ATTRIBUTE_QUESTION,
    RELATION_LABELS,
    attribute_of_value,
    attribute_vocabulary,
    normalize_relation_label,
    relation_key,
)

RECT_TAGS = {t: t for t in REGION_TYPES}  # every image region tool; the result type is the tag
ATTRIBUTE_NAMES = {"color": "color", "colour": "color", "shape": "shape", "size": "size"}
MAX_CONFIG_CHARS = 1_000_000
MAX_TAXONOMY_DEPTH = 32  # nested <Choice> levels of a Taxonomy


class ConfigError(ClientError):
    """A labeling config the backend cannot serve (the message says why)."""


@dataclass(frozen=True)
class RectControl:
    """A region control (rectangle, polygon, ellipse, keypoint or brush) drawing on the served image."""

    name: str
    type: str  # the result type: "rectanglelabels", "rectangle", "polygonlabels", "brush", ...
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
    open: bool = False  # named after its one attribute: every value it declares is an answer to teach
    new_values: tuple[str, ...] = ()  # lowercased values beyond the model's vocabulary (open controls)

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
    new_relation_labels: dict[str, str] = field(default_factory=dict)  # relation_key -> config label
    has_relations: bool = False
    relation_text: str | None = None
    question: str | None = None  # non-per-region TextArea the annotator types region questions in
    answer: str | None = None  # non-per-region TextArea receiving their answers
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

    @property
    def open_controls(self) -> dict[str, str]:
        """Control name -> attribute, for controls whose every value is an answer to that attribute
        (corrections choosing a value the model does not know teach it)."""
        return {c.name: c.attributes[0] for c in self.attributes if c.open}

    def summary(self) -> dict:
        """What the backend will fill in (for logs and the /setup answer): per control, the values
        the model predicts now (``known``) and those it learns from corrections (``new``)."""
        attributes = {}
        for c in self.attributes:
            attributes[c.name] = {
                attr: {
                    "known": sorted(_shown(v) for k, v in mapping.items() if k not in c.new_values),
                    "new": sorted(_shown(v) for k, v in mapping.items() if k in c.new_values),
                }
                for attr, mapping in c.values.items()
            }
        relations: dict | str | None = None
        if self.has_relations:
            relations = {
                "known": sorted(self.relation_labels.values()),
                "new": sorted(self.new_relation_labels.values()),
                "asked": self.wants_relations,
            }
        elif self.relation_text:
            relations = {"text": self.relation_text}
        return {
            "image": self.image_name,
            "image_field": self.image_var,
            "boxes": sorted(self.rect_names),
            "caption": self.caption,
            "attributes": attributes,
            "relations": relations,
            **({"questions": {"question": self.question, "answer": self.answer}} if self.answer else {}),
        }


def _shown(value: str | tuple[str, ...]) -> str:
    return " / ".join(value) if isinstance(value, tuple) else value


def _bool(node: ET.Element, attr: str) -> bool:
    return node.get(attr, "false").strip().lower() == "true"


def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def _choice_value(node: ET.Element) -> str | None:
    value = node.get("value")
    if value is None:
        value = node.get("alias")
    return value


def _taxonomy_paths(node: ET.Element) -> list[tuple[str, ...]]:
    """Every path (root first, in the config's order) of a Taxonomy's nested ``<Choice>`` tree; a
    tree deeper than MAX_TAXONOMY_DEPTH is a :class:`ConfigError` (walked without recursion)."""
    paths: list[tuple[str, ...]] = []
    stack: list[tuple[ET.Element, tuple[str, ...]]] = [(node, ())]
    while stack:
        element, path = stack.pop()
        if path:
            paths.append(path)
        children = []
        for child in element:
            value = _choice_value(child) if _strip_ns(child.tag) == "choice" else None
            if value is not None:
                children.append((child, path + (value,)))
        if children and len(path) >= MAX_TAXONOMY_DEPTH:
            name = node.get("name", "")
            raise ConfigError(
                f'<{node.tag} name="{name}"> nests choices deeper than {MAX_TAXONOMY_DEPTH} levels'
            )
        stack.extend(reversed(children))  # popped in the config's order, each before its subtree
    return paths


def _name_attribute(name: str) -> str | None:
    """Attribute named by a control name such as ``color`` or ``obj_colour``."""
    words = re.split(r"[^a-z]+", name.lower())
    hits = {ATTRIBUTE_NAMES[w] for w in words if w in ATTRIBUTE_NAMES}
    return hits.pop() if len(hits) == 1 else None


def _few(values: list, shown: int = 10) -> str:
    """A warning's list of values, the first ``shown`` and how many more (a config may hold 40k)."""
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return f"{values[:shown]}{more}"


def _taxonomy_leaves(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The paths no other path continues, in their order (linear: a config may hold ~40k choices)."""
    inner = {q[:i] for q in paths for i in range(1, len(q))}
    return [p for p in paths if p not in inner]


def _attribute_control(node: ET.Element, kind: str) -> tuple[AttributeControl | None, list[str]]:
    """Map a per-region Choices/Taxonomy onto model attributes (``None``: nothing to fill), with
    warnings about the values it will not fill in now."""
    name = node.get("name", "")
    tag = f'<{node.tag} name="{name}">'
    vocab = attribute_vocabulary()
    if kind == "choices":
        entries: list[tuple[str, str | tuple[str, ...]]] = [
            (v, v) for v in (_choice_value(c) for c in node.iter() if _strip_ns(c.tag) == "choice") if v
        ]
        leaves = [label for label, _ in entries]
    else:
        paths = _taxonomy_paths(node)
        entries = [(path[-1], path) for path in paths]
        leaves = [path[-1] for path in _taxonomy_leaves(paths)]
    values: dict[str, dict[str, str | tuple[str, ...]]] = {}
    for attr, words in vocab.items():
        matched = {label.strip().lower(): out for label, out in entries if label.strip().lower() in words}
        if matched:
            values[attr] = matched
    multiple = kind == "taxonomy" or node.get("choice", "single").lower() == "multiple"
    unknown = list(dict.fromkeys(v for v in leaves if attribute_of_value(v) is None))
    warnings: list[str] = []
    new_values: tuple[str, ...] = ()
    named = _name_attribute(name)
    if named is not None:
        foreign = [v for v in leaves if attribute_of_value(v) not in (None, named)]
        if foreign:
            warnings.append(f"{tag}: {_few(foreign)} are not {named} values; they are never filled in")
        mapping = dict(values.get(named, {}))
        unknown_set = set(unknown)
        for label, out in entries:
            if label in unknown_set and label.strip():
                mapping.setdefault(label.strip().lower(), out)
        new_values = tuple(dict.fromkeys(v.strip().lower() for v in unknown if v.strip()))
        if new_values:
            warnings.append(
                f"{tag}: {_few(unknown)} are {named} values the model does not predict yet; "
                "corrections choosing them are stored and teach them (new vocabulary), and they are "
                "filled in once the model answers them"
            )
        values = {named: mapping}
    else:
        if len(values) > 1 and not multiple:
            # A single-choice control can show one answer: serve the attribute it covers best.
            best = max(values, key=lambda a: len(values[a]))
            dropped = [out for a, m in values.items() if a != best for out in m.values()]
            warnings.append(
                f"{tag} is single-choice: it is filled with {best} only; "
                f"{_few([_shown(v) for v in dropped])} are never filled in"
            )
            values = {best: values[best]}
        if unknown and values:
            warnings.append(
                f"{tag}: {_few(unknown)} are not values the model knows, and the control is not named "
                "after an attribute (color, colour, shape, size): they are never filled in nor learned from "
                "corrections (name the control after its attribute to teach them)"
            )
    values = {a: v for a, v in values.items() if v}
    if not values:
        return None, warnings
    control = AttributeControl(name, kind, values, multiple, open=named is not None, new_values=new_values)
    return control, warnings


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
        raise ConfigError(
            "label config has no region control to draw with (<RectangleLabels>, <PolygonLabels>, "
            "<EllipseLabels>, <KeyPointLabels>, <BrushLabels>, or their label-less forms)"
        )
    image_name = next((n.get("toName") for _, n in rect_nodes if n.get("toName") in images), None)
    if image_name is None:
        raise ConfigError(f"no region control points at an Image (toName must be one of {sorted(images)})")
    value = images[image_name].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(f'<Image name="{image_name}"> needs value="$field", got {value!r}')
    warnings: list[str] = []
    if len(images) > 1:
        others = sorted(n for n in images if n != image_name)
        warnings.append(
            f"label config has {len(images)} <Image> tags: boxes are described on {image_name!r} only (the "
            f"image the region controls point at); nothing is filled in for {others}"
        )
    for _, n in rect_nodes:
        if n.get("toName") != image_name:
            warnings.append(
                f'<{n.tag} name="{n.get("name")}"> draws on {n.get("toName")!r}, not on {image_name!r}: '
                "its boxes are not described"
            )
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
    question = None
    answer = None
    attributes: list[AttributeControl] = []
    for t, n in tags:
        tag = f'<{n.tag} name="{n.get("name")}">'
        if t == "textarea" and targets_image(n):
            if _bool(n, "perRegion"):
                if caption is not None:
                    warnings.append(f"{tag} is left empty: captions go to the first per-region TextArea")
                caption = caption or n.get("name")
            elif "relation" in (n.get("name") or "").lower():
                relation_text = relation_text or n.get("name")
            elif re.search("question|prompt", (n.get("name") or "").lower()):
                question = question or n.get("name")
            elif "answer" in (n.get("name") or "").lower():
                answer = answer or n.get("name")
        elif t in ("choices", "taxonomy"):
            if not targets_image(n):
                warnings.append(f"{tag} does not point at the image {image_name!r}: left empty")
            elif not _bool(n, "perRegion"):
                warnings.append(f'{tag} is not per-region (perRegion="true"): left empty')
            else:
                control, found = _attribute_control(n, t)
                warnings += found
                if control is not None:
                    attributes.append(control)
                elif not found:
                    warnings.append(
                        f"{tag} matches no attribute the model answers (color, shape, size): left empty"
                    )
    relations_nodes = [n for t, n in tags if t == "relations"]
    relation_labels: dict[str, str] = {}
    new_relation_labels: dict[str, str] = {}
    for rel_node in relations_nodes:
        for child in rel_node:
            label = child.get("value")
            if not label or not relation_key(label):
                continue
            known = normalize_relation_label(label)
            if known:
                relation_labels.setdefault(known, label)
            else:
                new_relation_labels.setdefault(relation_key(label), label)
    has_relations = bool(relations_nodes)
    if has_relations:
        relation_text = None  # real relations take precedence over text
        new = sorted(new_relation_labels.values())
        if not relation_labels:
            warnings.append(
                f"<Relations> declares no label the model predicts ({', '.join(RELATION_LABELS)}; "
                "underscores or hyphens allowed): no relations will be returned"
                + (f"; {new} are stored from corrections and trained on" if new else "")
            )
        elif new:
            warnings.append(
                f"<Relations>: {new} are not relations the model predicts yet; corrections using them are "
                "stored and teach them (new vocabulary), and they are returned once the model says them"
            )
    config = LabelConfig(
        image_name=image_name,
        image_var=value[1:],
        rects=rects,
        caption=caption,
        attributes=tuple(attributes),
        relation_labels=relation_labels,
        new_relation_labels=new_relation_labels,
        has_relations=has_relations,
        relation_text=relation_text,
        question=question if answer else None,
        answer=answer if question else None,
        control_names=frozenset(n.get("name") for _, n in tags if n.get("name") and n.get("toName")),
        warnings=tuple(warnings),
    )
    if (question is None) != (answer is None):
        config = replace(
            config,
            warnings=config.warnings
            + (
                "region questions need both a question and an answer <TextArea> (not per-region): "
                "none are answered",
            ),
        )
    if caption is None and not attributes and not config.wants_relations and config.answer is None:
        raise ConfigError(
            'nothing for the backend to fill in: add a per-region <TextArea perRegion="true"> for captions, '
            "per-region <Choices> for colour/shape/size, <Relations>, or question and answer TextAreas"
        )
    return config
