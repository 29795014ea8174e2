"""evaluation/datasets.py: the one reader of YOLO, VOC and COCO (training and evaluation read through it)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from evaluation import datasets as ds


def _img(path: Path, w=80, h=60, rect=None):
    img = np.full((h, w), 40, np.uint8)
    if rect:
        x1, y1, x2, y2 = rect
        img[y1:y2, x1:x2] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)


def make_yolo(root: Path, labels: dict, names=("person", "dog"), sizes=None):
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("path: .\nnc: 2\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    for stem, text in labels.items():
        _img(root / "images" / f"{stem}.jpg", *(sizes or {}).get(stem, (80, 60)))
        if text is not None:
            (root / "labels" / f"{stem}.txt").write_text(text)
    return root


def test_yolo_boxes_and_class_mapping_by_name(tmp_path):
    root = make_yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.5 0.2\n1 0.2 0.2 0.1 0.1\n", "b": "", "c": None})
    rep = ds.LoadReport()
    samples = ds.load_yolo(root, "y", rep, stop=False)
    assert [s.image.stem for s in samples] == ["a", "b", "c"]
    np.testing.assert_allclose(samples[0].boxes, [[0.25, 0.4, 0.75, 0.6], [0.15, 0.15, 0.25, 0.25]], atol=1e-6)
    assert samples[0].names == ("person", "dog")
    assert samples[0].select(["person"])[1].tolist() == [0]  # the dog is background to a person detector
    assert len(samples[1].boxes) == 0 and len(samples[2].boxes) == 0
    assert rep.problems == []
    # mapped by NAME: "dog" first in the list becomes index 0
    assert samples[0].select(["dog", "person"])[1].tolist() == [1, 0]


@pytest.mark.parametrize(
    "line, needle",
    [
        ("0 0.5 abc 0.1 0.1", "bad number"),
        ("0 0.5 0.5 0.1", "expected 'class cx cy w h'"),
        ("0 0.95 0.5 0.3 0.1", "outside the image"),
        ("7 0.5 0.5 0.1 0.1", "unknown class 7"),
        ("0 0.5 0.5 0 0.1", "width/height"),
        ("0 nan 0.5 0.1 0.1", "non-finite"),
    ],
)
def test_yolo_malformed_label_names_file_and_line(tmp_path, line, needle):
    root = make_yolo(tmp_path / "y", {"good": "0 0.5 0.5 0.2 0.2\n", "bad": "0 0.5 0.5 0.2 0.2\n" + line + "\n"})
    rep = ds.LoadReport()
    samples = ds.load_yolo(root, "y", rep, stop=False)
    assert [s.image.stem for s in samples] == ["good"]  # skipped, not crashed
    assert len(rep.problems) == 1
    assert "bad.txt:2" in rep.problems[0] and needle in rep.problems[0]
    with pytest.raises(ds.LabelError, match="bad.txt:2"):
        ds.load_yolo(root, "y", ds.LoadReport(), stop=True)


def test_yolo_label_without_image_is_reported(tmp_path):
    root = make_yolo(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n"})
    (root / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    rep = ds.LoadReport()
    assert len(ds.load_yolo(root, "y", rep, stop=False)) == 1
    assert "ghost.txt" in rep.problems[0] and "no image" in rep.problems[0]
    with pytest.raises(ds.LabelError, match="ghost.txt"):
        ds.load_yolo(root, "y", ds.LoadReport(), stop=True)


def test_yaml_names_forms(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("names: [cat, 'dog']\n")
    assert ds.parse_yaml_names(p) == ["cat", "dog"]
    p.write_text("nc: 2\nnames:\n  - cat\n  - dog\ntrain: x\n")
    assert ds.parse_yaml_names(p) == ["cat", "dog"]
    p.write_text("names:\n  0: person\n  1: bicycle  # comment\n")
    assert ds.parse_yaml_names(p) == ["person", "bicycle"]


VOC = """<annotation><filename>{f}</filename><size><width>80</width><height>60</height><depth>3</depth></size>
{objs}</annotation>"""
OBJ = (
    "<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
)


def test_voc_loader_and_errors(tmp_path):
    root = tmp_path / "voc"
    (root / "annotations").mkdir(parents=True)
    _img(root / "images" / "a.jpg")
    _img(root / "images" / "b.jpg")
    objs = OBJ.format(n="raccoon", a=8, b=6, c=40, d=30) + OBJ.format(n="dog", a=1, b=1, c=5, d=5)
    (root / "annotations" / "a.xml").write_text(VOC.format(f="a.jpg", objs=objs))
    (root / "annotations" / "b.xml").write_text(
        VOC.format(f="b.jpg", objs=OBJ.format(n="raccoon", a=8, b=6, c=95, d=30))
    )
    (root / "annotations" / "c.xml").write_text(VOC.format(f="c.jpg", objs=""))
    (root / "annotations" / "d.xml").write_text("<annotation><object>")
    rep = ds.LoadReport()
    samples = ds.load_voc(root, "voc", rep, stop=False)
    assert [s.image.name for s in samples] == ["a.jpg"]
    np.testing.assert_allclose(samples[0].select(["raccoon"])[0], [[0.1, 0.1, 0.5, 0.5]], atol=1e-6)
    assert samples[0].names == ("raccoon", "dog")
    text = "\n".join(rep.problems)
    assert "b.xml" in text and "outside the image" in text
    assert "c.xml" in text and "not found" in text
    assert "d.xml" in text and "malformed XML" in text


def test_coco_loader_maps_categories_by_name(tmp_path):
    root = tmp_path / "coco"
    for name in ("1.jpg", "2.jpg"):
        _img(root / "imgs" / name, 100, 50)
    d = {
        "images": [
            {"id": 1, "file_name": "1.jpg", "width": 100, "height": 50},
            {"id": 2, "file_name": "2.jpg", "width": 100, "height": 50},
            {"id": 3, "file_name": "missing.jpg", "width": 100, "height": 50},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 18, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 99, "bbox": [0, 0, 5, 5], "iscrowd": 0},
        ],
    }
    js = root / "ann.json"
    js.write_text(json.dumps(d))
    rep = ds.LoadReport()
    samples = ds.load_coco(js, root / "imgs", "c", rep, stop=False)
    assert [s.image.name for s in samples] == ["1.jpg"]  # 2 has a bad label, 3 no image
    np.testing.assert_allclose(samples[0].select(["person"])[0], [[0.1, 0.1, 0.3, 0.3]], atol=1e-6)
    assert samples[0].names == ("person", "dog")
    text = "\n".join(rep.problems)
    assert "unknown category_id 99" in text and "missing.jpg" in text
    with pytest.raises(ds.LabelError, match="annotations\\[2\\]"):
        ds.load_coco(js, root / "imgs", "c", ds.LoadReport(), stop=True)
