"""Label Studio labeling config (XML) -> what the backend fills in for a project.

The backend never hard-codes control names: it reads them from the project's config.

* ``<Image name value="$var">`` — the image tag; ``task.data[var]`` is the image URL.  With several
  images, the one the first region control points at is served (a warning names the others).
* region controls pointing at that image — the regions to describe: ``<RectangleLabels>``,
  ``<PolygonLabels>``, ``<EllipseLabels>``, ``<KeyPointLabels>``, ``<BrushLabels>`` and their
  label-less forms (``<Rectangle>``, ``<Polygon>``, ...); :mod:`backend.region_shapes` says which
  box the model describes for each.
* ``<Labels>`` pointing at that image (the labels of label-less tools: ``<Labels>`` + ``<Rectangle>``)
  — never predicted; the labels a region already has are carried into its prediction, so accepting
  it keeps them (and ``whenLabelValue`` conditions read them).
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

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
ATTRIBUTE_NAMES = {
    **{w: "color" for w in ("color", "colour", "colors", "colours")},
    **{w: "shape" for w in ("shape", "shapes")},
    **{w: "size" for w in ("size", "sizes")},
}
MAX_CONFIG_CHARS = 1_000_000
MAX_TAXONOMY_DEPTH = 32  # nested <Choice> levels of a Taxonomy
MAX_WARNINGS = 50  # a config of 5,000 controls would otherwise log 5,000 lines per /setup
# Label Studio's editor reads attribute names case-insensitively (toname, perregion...): so do we.
_ATTRIBUTES = {
    a.lower(): a
    for a in ("toName", "perRegion", "smart", "smartOnly", "choice", "whenLabelValue", "whenTagName",
              "visibleWhen", "whenChoiceValue", "valueList", "valueType", "alias", "value", "name")
}  # fmt: skip
# Controls pointing at the image that this backend never fills (named in a warning when present).
_UNFILLED = {"rating", "number", "datetime", "vectorlabels", "bitmasklabels", "vector", "bitmask"}


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
    # <Choice value="Red" alias="r">: Label Studio stores (and expects) "r"; alias -> value
    aliases: dict[str, str] = field(default_factory=dict)

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
    label_controls: frozenset[str] = frozenset()  # <Labels> on the image: carried, never predicted
    # control -> conditions it shows under, all of them: (region labels, region tools), each () = any
    shown_on: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def rect_names(self) -> frozenset[str]:
        return frozenset(r.name for r in self.rects)

    def shows(self, control: str, labels: Sequence[str], tool: str) -> bool:
        """Whether Label Studio shows ``control`` on a region with ``labels`` drawn with ``tool``."""
        for wanted_labels, wanted_tools in self.shown_on.get(control, ()):
            if wanted_labels and not set(wanted_labels) & set(labels):
                return False
            if wanted_tools and tool not in wanted_tools:
                return False
        return True

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
    def choice_aliases(self) -> dict[str, dict[str, str]]:
        """Control name -> {alias: value} of its choices with an ``alias`` (corrections hold aliases)."""
        return {c.name: c.aliases for c in self.attributes if c.aliases}

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
            new = set(c.new_values)  # a tuple of 40k values would make this quadratic
            attributes[c.name] = {
                attr: {
                    "known": sorted(_shown(v) for k, v in mapping.items() if k not in new),
                    "new": sorted(_shown(v) for k, v in mapping.items() if k in new),
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


_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def task_field(data: Mapping[str, Any], var: str) -> Any:
    """``task.data``'s value for ``<Image value="$var">``: the key ``var`` itself, else ``var`` as a
    path (``meta.url``, ``images[0].url``), as Label Studio resolves it; None when absent."""
    if var in data:
        return data[var]
    current: Any = data
    for key, index in _PATH_PART.findall(var):
        if key and isinstance(current, Mapping):
            current = current.get(key)
        elif index and isinstance(current, list) and int(index) < len(current):
            current = current[int(index)]
        else:
            return None
    return current


def _shown(value: str | tuple[str, ...]) -> str:
    return " / ".join(value) if isinstance(value, tuple) else value


def _bool(node: ET.Element, attr: str) -> bool:
    return node.get(attr, "false").strip().lower() == "true"


def _strip_ns(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


def _choice_value(node: ET.Element) -> str | None:
    """A Choice/Label's value as matched to the vocabulary: ``value`` (else ``alias``), or the
    ``alias`` when only it is a word the model knows (``value="Rot" alias="red"``)."""
    value = node.get("value")
    alias = node.get("alias")
    if value is None or (alias and attribute_of_value(value) is None and attribute_of_value(alias)):
        return alias
    return value


def _choice_stored(node: ET.Element) -> str | None:
    """What Label Studio stores for a Choice in results: ``alias`` when given, else ``value``."""
    alias = node.get("alias")
    return alias if alias else node.get("value")


def _taxonomy_paths(node: ET.Element) -> list[tuple[tuple[str, ...], ET.Element]]:
    """Every path (root first, in the config's order) of a Taxonomy's nested ``<Choice>`` tree, as
    Label Studio stores it (aliases), with the path's last ``<Choice>``; a tree deeper than
    MAX_TAXONOMY_DEPTH is a :class:`ConfigError` (walked without recursion)."""
    paths: list[tuple[tuple[str, ...], ET.Element]] = []
    stack: list[tuple[ET.Element, tuple[str, ...]]] = [(node, ())]
    while stack:
        element, path = stack.pop()
        if path:
            paths.append((path, element))
        children = []
        for child in element:
            value = _choice_stored(child) if _strip_ns(child.tag) == "choice" else None
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
    """Attribute named by a control name such as ``color``, ``obj_colour``, ``objColor`` or
    ``colors`` (None when it names none, or two)."""
    words = re.split(r"[^a-z]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower())
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
    # (visible value, what Label Studio stores: alias, or the alias path of a Taxonomy)
    entries: list[tuple[str, str | tuple[str, ...]]]
    aliases: dict[str, str] = {}
    if kind == "choices":
        choices = [c for c in node.iter() if _strip_ns(c.tag) == "choice"]
        entries = [(v, s) for v, s in ((_choice_value(c), _choice_stored(c)) for c in choices) if v and s]
        leaves = [label for label, _ in entries]
    else:
        paths = _taxonomy_paths(node)
        visible = {path: _choice_value(element) or path[-1] for path, element in paths}
        entries = [(visible[path], path) for path, _ in paths]
        leaves = [visible[path] for path in _taxonomy_leaves([p for p, _ in paths])]
    for label, out in entries:
        stored = out[-1] if isinstance(out, tuple) else out
        if stored != label and attribute_of_value(stored) is None:  # a known word is learnt as itself
            aliases.setdefault(stored, label)
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
    control = AttributeControl(
        name, kind, values, multiple, open=named is not None, new_values=new_values, aliases=aliases
    )
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
    for n in nodes:
        _canonical_attributes(n)
    tags = [(_strip_ns(n.tag), n) for n in nodes]
    templated = any("{{" in (n.get("name") or "") + (n.get("value") or "") for _, n in tags)
    if templated or any(t == "repeater" for t, _ in tags):
        raise ConfigError("Repeater configs (<Repeater>, {{idx}} names) are not supported; use one <Image>")
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
    drawn = list(dict.fromkeys(n.get("toName") for _, n in rect_nodes if n.get("toName") in images))
    if not drawn:
        raise ConfigError(f"no region control points at an Image (toName must be one of {sorted(images)})")
    # the first image drawn on that also has something to fill in (else the first drawn on)
    fillable = _fillable_images(tags)
    image_name = next((i for i in drawn if i in fillable), drawn[0])
    if images[image_name].get("valueList") is not None and images[image_name].get("value") is None:
        raise ConfigError(
            f'<Image name="{image_name}"> is multi-page (valueList): not supported; use value="$field"'
        )
    value = images[image_name].get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise ConfigError(f'<Image name="{image_name}"> needs value="$field", got {value!r}')
    warnings: list[str] = []
    if len(images) > 1:
        others = sorted(n for n in images if n != image_name)
        warnings.append(
            f"label config has {len(images)} <Image> tags: boxes are described on {image_name!r} only (the "
            f"image the region and filled controls point at); nothing is filled in for {_few(others)}"
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
    limits = _visibility(root)
    shown_on: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = {}
    for t, n in tags:
        tag = f'<{n.tag} name="{n.get("name")}">'
        written, regions, on_choice = limits.get(n, ("", (), False))
        if t in ("textarea", "choices", "taxonomy") and written and targets_image(n):
            if on_choice:
                warnings.append(f"{tag} is shown only when {written}: the backend fills it on every region")
            else:
                shown_on[n.get("name", "")] = regions
                warnings.append(f"{tag} is shown only on some regions ({written}): it is filled only there")
        if t == "textarea" and targets_image(n):
            if _bool(n, "perRegion"):
                if caption is not None:
                    warnings.append(f"{tag} is left empty: captions go to the first per-region TextArea")
                elif re.search("transcri|ocr|text", (n.get("name") or "").lower()):
                    warnings.append(
                        f"{tag} receives region descriptions (captions), not transcriptions of the text "
                        "in the region"
                    )
                caption = caption or n.get("name")
            elif "relation" in (n.get("name") or "").lower():
                relation_text = relation_text or n.get("name")
            elif re.search("question|prompt", (n.get("name") or "").lower()):
                question = question or n.get("name")
            elif "answer" in (n.get("name") or "").lower():
                answer = answer or n.get("name")
            else:
                warnings.append(
                    f'{tag} is not per-region (perRegion="true" makes it the caption) and not named '
                    "question/answer/relations: left empty"
                )
        elif t in _UNFILLED and targets_image(n):
            warnings.append(f"{tag} is not a control this backend fills: left empty")
        elif t == "labels" and targets_image(n):
            warnings.append(f"{tag} is not predicted: a region's labels in it are kept in its prediction")
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
                + (f"; {_few(new)} are stored from corrections and trained on" if new else "")
            )
        elif new:
            warnings.append(
                f"<Relations>: {_few(new)} are not relations the model predicts yet; corrections using them "
                "are stored and teach them (new vocabulary), and they are returned once the model says them"
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
        label_controls=frozenset(
            n.get("name") for t, n in tags if t == "labels" and n.get("name") and targets_image(n)
        ),
        shown_on=shown_on,
        warnings=_capped(warnings),
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
        found = " Found: " + " ".join(f"{w.rstrip('.')}." for w in config.warnings) if config.warnings else ""
        raise ConfigError(
            'nothing for the backend to fill in: add a per-region <TextArea perRegion="true"> for captions, '
            "per-region <Choices> for colour/shape/size, <Relations>, or question and answer TextAreas."
            + found
        )
    return config


def _canonical_attributes(node: ET.Element) -> None:
    """Attribute names as Label Studio's editor reads them (``toname`` is ``toName``)."""
    for key in [k for k in node.attrib if k.lower() in _ATTRIBUTES and k != _ATTRIBUTES[k.lower()]]:
        node.attrib.setdefault(_ATTRIBUTES[key.lower()], node.attrib.pop(key))


def _fillable_images(tags: list[tuple[str, ET.Element]]) -> set[str]:
    """Images some control fills per region points at: a per-region TextArea/Choices/Taxonomy, or
    a question, answer or relations TextArea."""
    out: set[str] = set()
    for t, n in tags:
        named = re.search("relation|question|prompt|answer", (n.get("name") or "").lower())
        if (t in ("textarea", "choices", "taxonomy") and _bool(n, "perRegion")) or (
            t == "textarea" and named
        ):
            out.update((n.get("toName") or "").split(","))
    return out


def _visibility(root: ET.Element) -> dict[ET.Element, tuple[str, tuple, bool]]:
    """Per element, the limits on where Label Studio shows it, its own and its ``<View>``s' (one
    top-down pass): (the limits as written; the (region labels, region tools) conditions, all of
    which must hold; whether one depends on another control's answer).  A per-region control's own
    ``whenLabelValue``/``whenTagName`` and a ``<View visibleWhen="region-selected">``'s limit the
    regions; ``whenChoiceValue`` or ``visibleWhen="choice-…"`` depend on an answer the backend does
    not know ahead (``whenTagName`` then names a Choices, not a region tool)."""
    out: dict[ET.Element, tuple[str, tuple, bool]] = {}
    stack: list[tuple[ET.Element, tuple[str, tuple, bool]]] = [(root, ("", (), False))]
    while stack:
        node, (written, conditions, on_choice) = stack.pop()
        visible = (node.get("visibleWhen") or "").strip().lower()
        is_view = _strip_ns(node.tag) == "view"
        own: tuple[str, ...] = ()
        if node.get("whenChoiceValue") or visible.startswith("choice"):
            on_choice, own = True, ("visibleWhen", "whenTagName", "whenChoiceValue")
        elif (not is_view or visible == "region-selected") and (
            node.get("whenLabelValue") or node.get("whenTagName")
        ):
            own = ("whenLabelValue", "whenTagName")
            conditions = (*conditions, (_listed(node, "whenLabelValue"), _listed(node, "whenTagName")))
        if own:
            written = ", ".join(filter(None, [written, _written(node, own)]))
        out[node] = (written, conditions, on_choice)
        stack.extend((child, out[node]) for child in node)
    return out


def _listed(node: ET.Element, attr: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in (node.get(attr) or "").split(",") if v.strip())


def _written(node: ET.Element, attrs: tuple[str, ...]) -> str:
    return ", ".join(f'{a}="{node.get(a)}"' for a in attrs if node.get(a))


def _capped(warnings: list[str]) -> tuple[str, ...]:
    if len(warnings) <= MAX_WARNINGS:
        return tuple(warnings)
    return (*warnings[:MAX_WARNINGS], f"... and {len(warnings) - MAX_WARNINGS} more warnings")
