"""Convert public region datasets (COCO, RefCOCO, Visual Genome) into region-text JSONL records.

Every line of a region-text JSONL file is one JSON object::

    {"image": "<path relative to the JSONL file's folder, absolute path, or http(s) URL>",
     "width": 640, "height": 480,              # pixels; 0 means "unknown, read it from the image"
     "boxes": [[x0, y0, x1, y1], ...],         # pixels, xyxy, in the original image
     "conversations": [{"from": "human", "value": "What is <region1>?"},
                       {"from": "gpt", "value": "a small red triangle"}, ...],
     "source": "coco" | "refcoco" | "vg" | "synthetic" | "labelstudio",
     "id": "<stable string id>"}

``<regionN>`` (1-based) may only appear in human turns and refers to ``boxes[N-1]``. Every box is
referenced at least once, every ``<regionN>`` has a box, and turns alternate human/gpt, starting
with human and ending with gpt.  Converters are deterministic: the same input gives the same
records, in input order, with the same ids.  Boxes are clipped to the image when its size is known,
rounded to 2 decimals, and dropped when narrower or shorter than 1 px.  Texts are whitespace-
normalised; empty texts are dropped, as are images left without any box.

CLI: ``python -m model.data.converters {coco,refcoco,vg} --input IN.json --output OUT.jsonl [...]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = [
    "REFCOCO_TEMPLATES",
    "REQUIRED_KEYS",
    "Record",
    "Region",
    "SOURCES",
    "convert_coco",
    "convert_refcoco",
    "convert_visual_genome",
    "main",
    "read_jsonl",
    "validate_record",
    "write_jsonl",
]

Record = dict[str, Any]
JsonSource = str | os.PathLike[str] | Mapping[str, Any] | Sequence[Any]

REQUIRED_KEYS = ("image", "width", "height", "boxes", "conversations", "source", "id")
SOURCES = frozenset({"coco", "refcoco", "vg", "synthetic", "labelstudio"})
REGION_TOKEN_RE = re.compile(r"<region(\d+)>")
COCO_TEMPLATE = "What is the category of <region{k}>?"
COCO_CAPTION_QUESTION = "Describe the image briefly."
VG_TEMPLATE = "What is in <region{k}>?"
REFCOCO_TEMPLATES = (
    "Please describe <region{k}> briefly.",
    "Give a short description of <region{k}>.",
    "Briefly, what is in <region{k}>?",
    "Describe <region{k}> in a few words.",
)
MIN_BOX_SIZE = 1.0


@dataclass(frozen=True)
class Region:
    """One box and its question/answer; ``template`` holds a ``{k}`` placeholder for the region index."""

    box: tuple[float, ...]
    template: str
    answer: str


def _load_json(src: JsonSource) -> Any:
    """Return ``src`` itself if already loaded, else parse the JSON file it points to."""
    if isinstance(src, (str, os.PathLike)):
        with open(src, encoding="utf-8") as f:
            return json.load(f)
    return src


def _clean_text(value: Any) -> str:
    """Collapse whitespace and drop stray ``<regionN>`` tokens; non-strings become ``""``."""
    if not isinstance(value, str):
        return ""
    return " ".join(REGION_TOKEN_RE.sub(" ", value).split())


def _size(value: Any) -> int:
    """A positive int pixel size, or 0 when unknown/invalid."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        return 0
    return max(size, 0)


def _xywh_to_xyxy(xywh: Any, width: int, height: int) -> tuple[float, ...] | None:
    """Convert ``[x, y, w, h]`` to a clipped, rounded xyxy tuple; ``None`` if invalid or degenerate."""
    try:
        x, y, w, h = (float(v) for v in xywh)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w < MIN_BOX_SIZE or h < MIN_BOX_SIZE:
        return None
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), max(x + w, 0.0), max(y + h, 0.0)
    if width > 0:
        x0, x1 = min(x0, width), min(x1, width)
    if height > 0:
        y0, y1 = min(y0, height), min(y1, height)
    box = tuple(round(v, 2) for v in (x0, y0, x1, y1))
    if box[2] - box[0] < MIN_BOX_SIZE or box[3] - box[1] < MIN_BOX_SIZE:
        return None
    return box


def _image_ref(images_root: str | os.PathLike[str], name: str) -> str:
    """Join ``name`` onto ``images_root`` unless it is a URL, absolute, or there is no root."""
    if not images_root or urlparse(name).scheme in ("http", "https") or os.path.isabs(name):
        return name
    return os.path.join(os.fspath(images_root), name)


def _chunks(items: Sequence[Region], size: int) -> Iterator[Sequence[Region]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_max_regions(max_regions: int) -> None:
    if not isinstance(max_regions, int) or max_regions < 1:
        raise ValueError(f"max_regions must be a positive int, got {max_regions!r}")


def _build_record(
    image: str,
    width: int,
    height: int,
    regions: Sequence[Region],
    source: str,
    rec_id: str,
    preamble: Sequence[tuple[str, str]] = (),
) -> Record:
    """Assemble and validate one record; ``preamble`` holds region-free (question, answer) turns."""
    conversations: list[dict[str, str]] = []
    pairs = list(preamble) + [(r.template.format(k=k), r.answer) for k, r in enumerate(regions, 1)]
    for question, answer in pairs:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    rec = {
        "image": image,
        "width": width,
        "height": height,
        "boxes": [list(r.box) for r in regions],
        "conversations": conversations,
        "source": source,
        "id": rec_id,
    }
    validate_record(rec)
    return rec


def convert_coco(
    instances_json: JsonSource,
    captions_json: JsonSource | None = None,
    images_root: str | os.PathLike[str] = "",
    max_regions: int = 15,
) -> Iterator[Record]:
    """Convert COCO detection annotations into one record per image.

    The first ``max_regions`` usable annotations (file order; crowd boxes, boxes under 1 px and
    unknown categories skipped) become turns "What is the category of <regionK>?" -> category name;
    the rest are dropped.  If ``captions_json`` (COCO captions) is given, the image's first non-empty
    caption is prepended as a region-free turn "Describe the image briefly." -> caption.  Images
    without a usable box are skipped.  Record ids are ``coco-<image_id>``.
    """
    _check_max_regions(max_regions)
    data = _load_json(instances_json)
    names = {c.get("id"): _clean_text(c.get("name")) for c in data.get("categories", [])}
    anns_by_image: dict[Any, list[Mapping[str, Any]]] = {}
    for ann in data.get("annotations", []):
        anns_by_image.setdefault(ann.get("image_id"), []).append(ann)
    captions: dict[Any, str] = {}
    if captions_json is not None:
        for ann in _load_json(captions_json).get("annotations", []):
            text = _clean_text(ann.get("caption"))
            if text:
                captions.setdefault(ann.get("image_id"), text)

    for img in data.get("images", []):
        width, height = _size(img.get("width")), _size(img.get("height"))
        regions: list[Region] = []
        for ann in anns_by_image.get(img.get("id"), []):
            name = names.get(ann.get("category_id"), "")
            box = _xywh_to_xyxy(ann.get("bbox"), width, height)
            if ann.get("iscrowd") or not name or box is None:
                continue
            regions.append(Region(box, COCO_TEMPLATE, name))
            if len(regions) == max_regions:
                break
        if not regions:
            continue
        caption = captions.get(img.get("id"))
        preamble = [(COCO_CAPTION_QUESTION, caption)] if caption else []
        image = _image_ref(images_root, str(img.get("file_name") or img.get("coco_url") or ""))
        yield _build_record(image, width, height, regions, "coco", f"coco-{img.get('id')}", preamble)


def _refcoco_template(ref_id: Any, seed: int) -> str:
    """Pick a question template deterministically from ``(seed, ref_id)`` (crc32, not ``hash()``)."""
    return REFCOCO_TEMPLATES[zlib.crc32(f"{seed}:{ref_id}".encode()) % len(REFCOCO_TEMPLATES)]


def convert_refcoco(
    refs: JsonSource,
    instances_json: JsonSource,
    images_root: str | os.PathLike[str] = "",
    split: str | Iterable[str] | None = None,
    max_regions: int = 15,
    seed: int = 0,
    id_prefix: str = "refcoco",
) -> Iterator[Record]:
    """Convert RefCOCO/RefCOCO+/RefCOCOg referring expressions into records grouped per image.

    ``refs`` is the JSON form of ``refs(unc).p`` (list of dicts with ``ref_id``, ``ann_id``,
    ``image_id``, ``split``, ``sentences: [{"sent": ...}]``); boxes and image info come from the
    COCO-style ``instances_json``.  ``split`` keeps only refs of the given split(s).  Each usable ref
    becomes "Please describe <regionK> briefly." (template picked by a seeded hash of ``ref_id``)
    -> its first non-empty sentence.  An image's refs are chunked into records of at most
    ``max_regions`` boxes, with ids ``<id_prefix>-<image_id>-<chunk>``.  Refs whose annotation is
    missing, crowd, or degenerate are skipped.
    """
    _check_max_regions(max_regions)
    ref_list = _load_json(refs)
    if not isinstance(ref_list, Sequence) or isinstance(ref_list, str):
        raise ValueError("refs must be a JSON list of ref dicts")
    splits = None if split is None else ({split} if isinstance(split, str) else set(split))
    data = _load_json(instances_json)
    anns = {a.get("id"): a for a in data.get("annotations", [])}
    images = {i.get("id"): i for i in data.get("images", [])}

    by_image: dict[Any, list[Region]] = {}
    for ref in ref_list:
        ann = anns.get(ref.get("ann_id"))
        if (splits is not None and ref.get("split") not in splits) or ann is None or ann.get("iscrowd"):
            continue
        img = images.get(ann.get("image_id"))
        if img is None:
            continue
        sentences = ref.get("sentences") or []
        texts = (_clean_text(s.get("sent") or s.get("raw")) for s in sentences if isinstance(s, Mapping))
        text = next((t for t in texts if t), "")
        box = _xywh_to_xyxy(ann.get("bbox"), _size(img.get("width")), _size(img.get("height")))
        if text and box is not None:
            region = Region(box, _refcoco_template(ref.get("ref_id"), seed), text)
            by_image.setdefault(img.get("id"), []).append(region)

    for image_id, regions in by_image.items():
        img = images[image_id]
        width, height = _size(img.get("width")), _size(img.get("height"))
        image = _image_ref(images_root, str(img.get("file_name") or img.get("coco_url") or ""))
        for i, chunk in enumerate(_chunks(regions, max_regions)):
            yield _build_record(image, width, height, chunk, "refcoco", f"{id_prefix}-{image_id}-{i}")


def _vg_image_ref(images_root: str | os.PathLike[str], image_id: Any, url: str) -> str:
    """VG image path: ``<root>/<VG_100K[_2]>/<id>.jpg`` from the URL's last two parts, else the URL."""
    if url and not images_root:
        return url
    if url:
        return _image_ref(images_root, "/".join(urlparse(url).path.rstrip("/").split("/")[-2:]))
    return _image_ref(images_root, f"{image_id}.jpg")


def convert_visual_genome(
    region_descriptions: JsonSource,
    image_data: JsonSource | None = None,
    images_root: str | os.PathLike[str] = "",
    max_regions: int = 15,
) -> Iterator[Record]:
    """Convert Visual Genome ``region_descriptions.json`` into records grouped per image.

    Each region becomes "What is in <regionK>?" -> phrase; exact duplicate (box, phrase) pairs are
    dropped and an image's regions are chunked into records of at most ``max_regions`` boxes, with
    ids ``vg-<image_id>-<chunk>``.  ``image_data`` (``image_data.json``) supplies sizes, used for
    clipping, and URLs; without it width/height are 0 (unknown) and boxes are only clipped at 0.
    Image paths are ``<images_root>/<VG_100K or VG_100K_2>/<id>.jpg`` when the URL is known (the
    URL itself if no root is given), else ``<images_root>/<id>.jpg``.
    """
    _check_max_regions(max_regions)
    meta: dict[Any, Mapping[str, Any]] = {}
    if image_data is not None:
        for item in _load_json(image_data):
            meta[item.get("image_id", item.get("id"))] = item

    for entry in _load_json(region_descriptions):
        raw_regions = entry.get("regions") or []
        image_id = entry.get("id", entry.get("image_id"))
        if image_id is None and raw_regions:
            image_id = raw_regions[0].get("image_id")
        info = meta.get(image_id, {})
        width, height = _size(info.get("width")), _size(info.get("height"))
        regions: list[Region] = []
        seen: set[tuple[Any, ...]] = set()
        for r in raw_regions:
            text = _clean_text(r.get("phrase"))
            box = _xywh_to_xyxy([r.get(k) for k in ("x", "y", "width", "height")], width, height)
            if not text or box is None or (box, text.lower()) in seen:
                continue
            seen.add((box, text.lower()))
            regions.append(Region(box, VG_TEMPLATE, text))
        image = _vg_image_ref(images_root, image_id, str(info.get("url") or ""))
        for i, chunk in enumerate(_chunks(regions, max_regions)):
            yield _build_record(image, width, height, chunk, "vg", f"vg-{image_id}-{i}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_record(rec: Any) -> None:
    """Raise ``ValueError`` describing the first problem in a region-text record (see module doc).

    Also checks types, ``width``/``height`` >= 0 (0 = unknown), ``0 <= x0 < x1``, ``0 <= y0 < y1``,
    boxes inside the image when its size is known, and non-empty turn texts.  Extra keys are allowed.
    """
    if not isinstance(rec, Mapping):
        raise ValueError(f"record must be a JSON object, got {type(rec).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise ValueError(f"record is missing keys: {', '.join(missing)}")
    if not isinstance(rec["image"], str) or not rec["image"].strip():
        raise ValueError("'image' must be a non-empty string")
    if not isinstance(rec["id"], str) or not rec["id"]:
        raise ValueError("'id' must be a non-empty string")
    if rec["source"] not in SOURCES:
        raise ValueError(f"'source' must be one of {sorted(SOURCES)}, got {rec['source']!r}")
    for key in ("width", "height"):
        if not isinstance(rec[key], int) or isinstance(rec[key], bool) or rec[key] < 0:
            raise ValueError(f"'{key}' must be a non-negative int (0 = unknown), got {rec[key]!r}")
    width, height, boxes = rec["width"], rec["height"], rec["boxes"]
    if not isinstance(boxes, list) or not boxes:
        raise ValueError("'boxes' must be a non-empty list")
    for n, box in enumerate(boxes, 1):
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise ValueError(f"box {n} must be 4 finite numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = box
        if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {n} {list(box)} is not a valid xyxy box (need 0 <= x0 < x1, 0 <= y0 < y1)")
        if (width and x1 > width) or (height and y1 > height):
            raise ValueError(f"box {n} {list(box)} lies outside the {width}x{height} image")
    turns = rec["conversations"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list")
    if len(turns) % 2:
        raise ValueError("'conversations' must end with a gpt turn (even number of turns)")
    referenced: set[int] = set()
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {i} must be an object with 'from' and 'value'")
        if turn["from"] != expected:
            raise ValueError(f"turn {i} is from {turn['from']!r}, expected {expected!r} (must alternate)")
        if not isinstance(turn["value"], str) or not turn["value"].strip():
            raise ValueError(f"turn {i} has empty or non-string 'value'")
        indices = [int(m) for m in REGION_TOKEN_RE.findall(turn["value"])]
        if indices and expected == "gpt":
            raise ValueError(f"turn {i}: <regionN> tokens are only allowed in human turns")
        for n in indices:
            if not 1 <= n <= len(boxes):
                raise ValueError(f"turn {i} references <region{n}> but the record has {len(boxes)} box(es)")
            referenced.add(n)
    unreferenced = [n for n in range(1, len(boxes) + 1) if n not in referenced]
    if unreferenced:
        raise ValueError(f"box(es) {unreferenced} are never referenced by a <regionN> token")


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Validate and write ``records`` as UTF-8 JSONL (atomically, via a temp file); return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for count, rec in enumerate(records, 1):
                try:
                    validate_record(rec)
                except ValueError as e:
                    rec_id = rec.get("id") if isinstance(rec, Mapping) else None
                    raise ValueError(f"record {count} (id={rec_id!r}): {e}") from None
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def read_jsonl(path: str | os.PathLike[str], validate: bool = True) -> Iterator[Record]:
    """Yield the records of a JSONL file, skipping blank lines.

    Raises ``ValueError("<path>:<line>: ...")`` on invalid JSON or, if ``validate``, invalid records.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if validate:
                    validate_record(rec)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: {e}") from None
            yield rec


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m model.data.converters", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--input", required=True, help="main annotation JSON file")
    common.add_argument("--output", required=True, help="output .jsonl path")
    common.add_argument("--images-root", default="", help="prefix joined onto relative image paths")
    common.add_argument("--max-regions", type=int, default=15, help="max boxes per record")
    coco = sub.add_parser("coco", parents=[common], help="COCO instances (--input) [+ captions]")
    coco.add_argument("--captions", help="COCO captions JSON")
    ref = sub.add_parser("refcoco", parents=[common], help="RefCOCO refs JSON (--input) + COCO instances")
    ref.add_argument("--instances", required=True, help="COCO instances JSON with the referred boxes")
    ref.add_argument("--split", action="append", help="keep only this split (repeatable)")
    ref.add_argument("--seed", type=int, default=0, help="seed for the question template choice")
    ref.add_argument("--id-prefix", default="refcoco", help="record id prefix, e.g. refcocog")
    vg = sub.add_parser("vg", parents=[common], help="Visual Genome region_descriptions.json (--input)")
    vg.add_argument("--image-data", help="VG image_data.json (sizes and URLs)")
    args = parser.parse_args(argv)

    if args.dataset == "coco":
        records = convert_coco(args.input, args.captions, args.images_root, args.max_regions)
    elif args.dataset == "refcoco":
        opts = {"split": args.split, "seed": args.seed, "id_prefix": args.id_prefix}
        records = convert_refcoco(
            args.input, args.instances, args.images_root, max_regions=args.max_regions, **opts
        )
    else:
        records = convert_visual_genome(args.input, args.image_data, args.images_root, args.max_regions)

    n_regions = 0

    def counted(recs: Iterable[Record]) -> Iterator[Record]:
        nonlocal n_regions
        for rec in recs:
            n_regions += len(rec["boxes"])
            yield rec

    n_records = write_jsonl(counted(records), args.output)
    print(f"wrote {n_records} records with {n_regions} regions to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
