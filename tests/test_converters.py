"""Tests for model.data.converters (COCO / RefCOCO / Visual Genome -> region-text JSONL)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.data.converters import (
    REFCOCO_TEMPLATES,
    convert_coco,
    convert_refcoco,
    convert_visual_genome,
    main,
    read_jsonl,
    validate_record,
    write_jsonl,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _ann(ann_id: int, image_id: int, bbox: list[float], cat: int = 1, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": cat, "iscrowd": iscrowd}


INSTANCES = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 640, "height": 480},
        {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100},
        {"id": 3, "file_name": "http://example.com/c.jpg", "width": 200, "height": 100},
    ],
    "annotations": [
        _ann(1, 1, [10, 20, 100, 50]),
        _ann(2, 1, [0, 0, 300, 300], iscrowd=1),  # crowd -> skipped
        _ann(3, 1, [5, 5, 0.5, 40]),  # degenerate -> skipped
        _ann(4, 1, [600, 400, 100, 100], cat=2),  # out of bounds -> clipped
        _ann(5, 1, [700, 10, 50, 50]),  # fully outside -> degenerate after clipping
        _ann(6, 1, [10, 10, 20, 20], cat=99),  # unknown category -> skipped
        _ann(7, 2, [1, 1, 10, 10], iscrowd=1),  # image 2 has only a crowd box -> no record
        _ann(8, 3, [0, 0, 10, 10], cat=2),
        _ann(9, 3, [20, 20, 10, 10]),
        _ann(10, 3, [40, 40, 10, 10], cat=2),
    ],
    "categories": [{"id": 1, "name": " cat "}, {"id": 2, "name": "dog"}],
}

CAPTIONS = {
    "annotations": [
        {"id": 1, "image_id": 1, "caption": "  A cat\n on a   mat. "},
        {"id": 2, "image_id": 1, "caption": "Second caption."},
        {"id": 3, "image_id": 3, "caption": "   "},
    ]
}

REFS = [
    {
        "ref_id": 10,
        "ann_id": 1,
        "image_id": 1,
        "split": "train",
        "sentences": [{"sent": " "}, {"sent": "left cat"}],
    },
    {"ref_id": 11, "ann_id": 4, "image_id": 1, "split": "train", "sentences": [{"sent": "dog  corner"}]},
    {
        "ref_id": 12,
        "ann_id": 3,
        "image_id": 1,
        "split": "train",
        "sentences": [{"sent": "tiny"}],
    },  # degenerate
    {"ref_id": 13, "ann_id": 999, "image_id": 1, "split": "train", "sentences": [{"sent": "missing"}]},
    {"ref_id": 14, "ann_id": 8, "image_id": 3, "split": "val", "sentences": [{"sent": "top left dog"}]},
    {"ref_id": 15, "ann_id": 9, "image_id": 3, "split": "val", "sentences": []},  # no text
]

REGION_DESCRIPTIONS = [
    {
        "id": 1,
        "regions": [
            {"region_id": 1, "image_id": 1, "phrase": " a man ", "x": 10, "y": 10, "width": 50, "height": 80},
            {"region_id": 2, "image_id": 1, "phrase": "a man", "x": 10, "y": 10, "width": 50, "height": 80},
            {"region_id": 3, "image_id": 1, "phrase": "", "x": 0, "y": 0, "width": 20, "height": 20},
            {"region_id": 4, "image_id": 1, "phrase": "speck", "x": 3, "y": 3, "width": 0, "height": 5},
            {"region_id": 5, "image_id": 1, "phrase": "sky", "x": 700, "y": -5, "width": 200, "height": 100},
            {"region_id": 6, "image_id": 1, "phrase": "tree", "x": 100, "y": 100, "width": 30, "height": 30},
        ],
    },
    {
        "id": 2,
        "regions": [
            {"region_id": 7, "image_id": 2, "phrase": "road", "x": -4, "y": 2, "width": 50, "height": 20},
        ],
    },
    {"id": 3, "regions": []},
]

IMAGE_DATA = [
    {
        "image_id": 1,
        "width": 800,
        "height": 600,
        "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/1.jpg",
    },
]


def _valid_record() -> dict:
    return {
        "image": "a.jpg",
        "width": 100,
        "height": 80,
        "boxes": [[0, 0, 10, 10], [5.5, 5.5, 100, 80]],
        "conversations": [
            {"from": "human", "value": "What is <region1>?"},
            {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "And <region2> next to <region1>?"},
            {"from": "gpt", "value": "a dog"},
        ],
        "source": "synthetic",
        "id": "x-1",
    }


# ----------------------------------------------------------------------------------------------- COCO


def test_convert_coco_filters_clips_and_asks_categories(tmp_path: Path) -> None:
    recs = list(convert_coco(_write(tmp_path / "inst.json", INSTANCES), images_root="imgs"))
    assert [r["id"] for r in recs] == ["coco-1", "coco-3"]  # image 2 has only a crowd box
    first = recs[0]
    assert first["image"] == "imgs/a.jpg" and (first["width"], first["height"]) == (640, 480)
    assert first["boxes"] == [[10.0, 20.0, 110.0, 70.0], [600.0, 400.0, 640.0, 480.0]]
    assert first["source"] == "coco"
    assert first["conversations"] == [
        {"from": "human", "value": "What is the category of <region1>?"},
        {"from": "gpt", "value": "cat"},
        {"from": "human", "value": "What is the category of <region2>?"},
        {"from": "gpt", "value": "dog"},
    ]
    assert recs[1]["image"] == "http://example.com/c.jpg"  # URLs are not joined onto images_root
    for rec in recs:
        validate_record(rec)


def test_convert_coco_max_regions_and_captions(tmp_path: Path) -> None:
    recs = list(convert_coco(INSTANCES, _write(tmp_path / "caps.json", CAPTIONS), max_regions=2))
    by_id = {r["id"]: r for r in recs}
    assert len(by_id["coco-3"]["boxes"]) == 2  # truncated from 3
    assert by_id["coco-3"]["conversations"][0]["value"].startswith("What is the category")  # blank caption
    turns = by_id["coco-1"]["conversations"]
    assert turns[:2] == [
        {"from": "human", "value": "Describe the image briefly."},
        {"from": "gpt", "value": "A cat on a mat."},
    ]
    assert len(turns) == 6
    with pytest.raises(ValueError, match="max_regions"):
        list(convert_coco(INSTANCES, max_regions=0))


def test_convert_coco_is_deterministic() -> None:
    assert list(convert_coco(INSTANCES)) == list(convert_coco(copy.deepcopy(INSTANCES)))


# -------------------------------------------------------------------------------------------- RefCOCO


def test_convert_refcoco_groups_by_image(tmp_path: Path) -> None:
    refs_path = _write(tmp_path / "refs.json", REFS)
    recs = list(convert_refcoco(refs_path, _write(tmp_path / "inst.json", INSTANCES), images_root="/data"))
    assert [r["id"] for r in recs] == ["refcoco-1-0", "refcoco-3-0"]
    first = recs[0]
    assert first["source"] == "refcoco" and first["image"] == "/data/a.jpg"
    assert first["boxes"] == [[10.0, 20.0, 110.0, 70.0], [600.0, 400.0, 640.0, 480.0]]
    humans = [t["value"] for t in first["conversations"][::2]]
    answers = [t["value"] for t in first["conversations"][1::2]]
    assert answers == ["left cat", "dog corner"]
    for k, question in enumerate(humans, 1):
        assert question in {t.format(k=k) for t in REFCOCO_TEMPLATES}
    assert len(recs[1]["boxes"]) == 1  # ref 15 has no sentence


def test_convert_refcoco_split_chunking_and_determinism() -> None:
    train = list(convert_refcoco(REFS, INSTANCES, split="train", max_regions=1))
    assert [r["id"] for r in train] == ["refcoco-1-0", "refcoco-1-1"]
    assert all(r["conversations"][0]["value"].count("<region1>") == 1 for r in train)
    val = list(convert_refcoco(REFS, INSTANCES, split=["val"], id_prefix="refcocog"))
    assert [r["id"] for r in val] == ["refcocog-3-0"]
    assert list(convert_refcoco(REFS, INSTANCES, seed=3)) == list(convert_refcoco(REFS, INSTANCES, seed=3))
    questions = {
        seed: [r["conversations"][0]["value"] for r in convert_refcoco(REFS, INSTANCES, seed=seed)]
        for seed in range(8)
    }
    assert len({tuple(q) for q in questions.values()}) > 1  # the seed changes the template choice
    with pytest.raises(ValueError, match="list"):
        list(convert_refcoco({"refs": REFS}, INSTANCES))


# --------------------------------------------------------------------------------------- Visual Genome


def test_convert_visual_genome(tmp_path: Path) -> None:
    recs = list(
        convert_visual_genome(
            _write(tmp_path / "rd.json", REGION_DESCRIPTIONS),
            _write(tmp_path / "img.json", IMAGE_DATA),
            images_root="vg",
        )
    )
    assert [r["id"] for r in recs] == ["vg-1-0", "vg-2-0"]  # image 3 has no regions
    first, second = recs
    assert first["image"] == "vg/VG_100K_2/1.jpg" and (first["width"], first["height"]) == (800, 600)
    assert first["boxes"] == [
        [10.0, 10.0, 60.0, 90.0],
        [700.0, 0.0, 800.0, 95.0],
        [100.0, 100.0, 130.0, 130.0],
    ]
    assert [t["value"] for t in first["conversations"][1::2]] == ["a man", "sky", "tree"]
    assert first["conversations"][2] == {"from": "human", "value": "What is in <region2>?"}
    # No image_data entry: size unknown (0), boxes only clipped at 0.
    assert (second["width"], second["height"]) == (0, 0)
    assert second["image"] == "vg/2.jpg" and second["boxes"] == [[0.0, 2.0, 46.0, 22.0]]


def test_convert_visual_genome_chunks_and_urls() -> None:
    recs = list(convert_visual_genome(REGION_DESCRIPTIONS, IMAGE_DATA, max_regions=2))
    assert [(r["id"], len(r["boxes"])) for r in recs] == [("vg-1-0", 2), ("vg-1-1", 1), ("vg-2-0", 1)]
    assert recs[0]["image"] == IMAGE_DATA[0]["url"]  # no images_root -> keep the URL
    assert recs[1]["conversations"][0]["value"] == "What is in <region1>?"
    image_data_by_id = [{"id": 1, "width": 800, "height": 600}]
    assert list(convert_visual_genome(REGION_DESCRIPTIONS, image_data_by_id))[0]["width"] == 800


# ------------------------------------------------------------------------------------------ validation


def _set(path: tuple, value: object):
    def mutate(rec: dict) -> None:
        target = rec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("boxes"), "missing keys: boxes"),
        (lambda r: r.pop("id"), "missing keys: id"),
        (_set(("boxes", 0), [10, 0, 5, 10]), "box 1 .* not a valid xyxy"),
        (_set(("boxes", 0), [0, 0, 10]), "box 1 must be 4 finite numbers"),
        (_set(("boxes", 0), [0, 0, "1", 10]), "box 1 must be 4 finite numbers"),
        (_set(("boxes", 1), [5, 5, 101, 80]), "box 2 .* outside the 100x80 image"),
        (_set(("boxes",), []), "'boxes' must be a non-empty list"),
        (_set(("conversations", 2, "value"), "And <region3>?"), r"<region3> but the record has 2 box"),
        (_set(("conversations", 0, "value"), "What is <region0> and <region2>?"), r"<region0>"),
        (_set(("conversations", 2, "value"), "And <region1>?"), r"box\(es\) \[2\] are never referenced"),
        (_set(("conversations", 0, "from"), "gpt"), "turn 0 is from 'gpt', expected 'human'"),
        (_set(("conversations", 1, "from"), "human"), "turn 1 is from 'human', expected 'gpt'"),
        (lambda r: r["conversations"].pop(), "must end with a gpt turn"),
        (_set(("conversations", 1, "value"), "  "), "turn 1 has empty"),
        (_set(("conversations", 1, "value"), "it is <region1>"), "only allowed in human turns"),
        (_set(("conversations",), []), "'conversations' must be a non-empty list"),
        (_set(("source",), "imagenet"), "'source' must be one of"),
        (_set(("width",), 10.5), "'width' must be a non-negative int"),
        (_set(("image",), ""), "'image' must be a non-empty string"),
    ],
)
def test_validate_record_errors(mutate, message: str) -> None:
    rec = _valid_record()
    validate_record(rec)
    mutate(rec)
    with pytest.raises(ValueError, match=message):
        validate_record(rec)


def test_validate_record_accepts_unknown_size_and_extra_keys() -> None:
    rec = _valid_record() | {"width": 0, "height": 0, "meta": {"note": "extra keys are fine"}}
    rec["boxes"][1] = [5, 5, 5000, 5000]
    validate_record(rec)
    with pytest.raises(ValueError, match="JSON object"):
        validate_record(["not", "a", "dict"])


# ------------------------------------------------------------------------------------------------ I/O


def test_jsonl_round_trip(tmp_path: Path) -> None:
    records = list(convert_coco(INSTANCES, CAPTIONS)) + list(convert_visual_genome(REGION_DESCRIPTIONS))
    records[0]["conversations"][1]["value"] = "ünïcödé caption"
    out = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(records, out) == len(records)
    assert list(read_jsonl(out)) == records
    assert not (tmp_path / "sub" / "out.jsonl.tmp").exists()
    assert "ünïcödé" in out.read_text(encoding="utf-8")


def test_write_jsonl_rejects_invalid_record(tmp_path: Path) -> None:
    bad = _valid_record() | {"id": "bad-1", "source": "nope"}
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"record 2 \(id='bad-1'\)"):
        write_jsonl([_valid_record(), bad], out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_read_jsonl_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = json.dumps(_valid_record())
    path.write_text(f"{good}\n\n{{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path.name}:3: "):
        list(read_jsonl(path))
    bad = _valid_record()
    bad["boxes"].append([0, 0, 1, 1])
    path.write_text(f"{good}\n{json.dumps(bad)}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path.name}:2: box\(es\) \[3\] are never referenced"):
        list(read_jsonl(path))
    assert len(list(read_jsonl(path, validate=False))) == 2


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_main_coco_and_refcoco(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inst = _write(tmp_path / "inst.json", INSTANCES)
    caps = _write(tmp_path / "caps.json", CAPTIONS)
    out = tmp_path / "coco.jsonl"
    assert main(["coco", "--input", str(inst), "--captions", str(caps), "--output", str(out)]) == 0
    assert f"wrote 2 records with 5 regions to {out}" in capsys.readouterr().out
    assert [r["id"] for r in read_jsonl(out)] == ["coco-1", "coco-3"]

    refs = _write(tmp_path / "refs.json", REFS)
    out = tmp_path / "ref.jsonl"
    argv = [
        "refcoco",
        "--input",
        str(refs),
        "--instances",
        str(inst),
        "--split",
        "train",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    assert "wrote 1 records with 2 regions" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["refcoco", "--input", str(refs), "--output", str(out)])  # --instances is required


def test_cli_subprocess_vg(tmp_path: Path) -> None:
    rd = _write(tmp_path / "rd.json", REGION_DESCRIPTIONS)
    img = _write(tmp_path / "img.json", IMAGE_DATA)
    out = tmp_path / "vg.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "model.data.converters",
        "vg",
        "--input",
        str(rd),
        "--image-data",
        str(img),
        "--images-root",
        "images",
        "--max-regions",
        "2",
        "--output",
        str(out),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 records with 4 regions" in result.stdout
    assert [r["id"] for r in read_jsonl(out)] == ["vg-1-0", "vg-1-1", "vg-2-0"]
