"""evaluation/: COCO mAP through pycocotools, the camera owner's numbers and the CLI, on datasets whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from evaluation import datasets, metrics, score
from evaluation.__main__ import main as cli

pytest.importorskip("pycocotools")

ev = SimpleNamespace(
    load_dataset=datasets.load_dataset,
    detect_format=datasets.detect_format,
    validation_split=datasets.validation_split,
    EvalDataError=datasets.DataError,
    evaluate=score.evaluate,
    frames_found=metrics.frames_found,
    upright_found=metrics.upright_found,
    main=cli,
)


def make_yolo(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text("names:\n  0: person\n  1: dog\n")
    for i in range(n):
        w, h = int(rng.integers(120, 300)), int(rng.integers(100, 240))
        img = np.full((h, w, 3), 60, np.uint8)
        lines = []
        for k in range(int(rng.integers(1, 4))):
            bw, bh = rng.uniform(0.1, 0.3), rng.uniform(0.2, 0.4)
            cx, cy = rng.uniform(bw / 2 + 0.01, 1 - bw / 2 - 0.01), rng.uniform(bh / 2 + 0.01, 1 - bh / 2 - 0.01)
            lines.append(f"{k % 2} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
        cv2.imwrite(str(root / "images" / f"im{i}.png"), img)
        (root / "labels" / f"im{i}.txt").write_text("\n".join(lines) + "\n")
    return root


def oracle(samples, names, shift=0.0, score=0.9):
    """A fake detector that returns the labels (optionally shifted by a fraction of the box), in image pixels."""
    order = iter(samples)

    def detect(image):
        s = next(order)
        h, w = image.shape[:2]
        b, c = s.select(names)
        b = b.astype(np.float64) * [w, h, w, h]
        b[:, [0, 2]] += shift * (b[:, 2] - b[:, 0])[:, None]
        return np.column_stack([b, np.full(len(b), score), c]).astype(np.float32)

    return detect


def test_perfect_detections_score_one(tmp_path):
    samples = ev.load_dataset(make_yolo(tmp_path / "d"))
    assert ev.detect_format(tmp_path / "d") == "yolo"
    m = ev.evaluate(oracle(samples, ["person"]), samples, ["person"], 0.25)
    assert m["map50"] == pytest.approx(1.0) and m["map50_95"] == pytest.approx(1.0)
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["images"] == 6


def test_wrong_boxes_score_low(tmp_path):
    samples = ev.load_dataset(make_yolo(tmp_path / "d"))
    m = ev.evaluate(oracle(samples, ["person"], shift=0.8), samples, ["person"], 0.25)
    assert m["map50"] < 0.05 and m["recall"] == 0.0 and m["precision"] == 0.0
    half = ev.evaluate(oracle(samples, ["person"], shift=0.25), samples, ["person"], 0.25)
    assert 0.5 < half["map50"] and half["map50_95"] < 0.7  # right at IoU .5, wrong at the strict ones


def test_missing_detections_lower_recall(tmp_path):
    samples = ev.load_dataset(make_yolo(tmp_path / "d"))
    nothing = ev.evaluate(lambda img: np.zeros((0, 6), np.float32), samples, ["person"], 0.25)
    assert nothing["map50"] == 0.0 and nothing["recall"] == 0.0
    # below the score threshold: counted in AP, not in precision/recall
    low = ev.evaluate(oracle(samples, ["person"], score=0.1), samples, ["person"], 0.25)
    assert low["map50"] == pytest.approx(1.0) and low["recall"] == 0.0


def test_voc_and_coco_readers(tmp_path):
    (tmp_path / "v" / "annotations").mkdir(parents=True)
    (tmp_path / "v" / "images").mkdir()
    cv2.imwrite(str(tmp_path / "v" / "images" / "a.jpg"), np.zeros((50, 80, 3), np.uint8))
    (tmp_path / "v" / "annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><name>cat</name><bndbox><xmin>1</xmin><ymin>2</ymin>"
        "<xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>"
    )
    v = ev.load_dataset(tmp_path / "v")
    assert v[0].names == ("cat",)
    np.testing.assert_allclose(v[0].boxes, [[1 / 80, 2 / 50, 30 / 80, 40 / 50]], rtol=1e-6)
    c = tmp_path / "c"
    (c / "annotations").mkdir(parents=True)
    (c / "val2017").mkdir()
    cv2.imwrite(str(c / "val2017" / "x.jpg"), np.zeros((50, 80, 3), np.uint8))
    (c / "annotations" / "instances_val2017.json").write_text(
        json.dumps(
            {
                "images": [{"id": 5, "file_name": "x.jpg", "width": 80, "height": 50}],
                "categories": [{"id": 1, "name": "person"}],
                "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [10, 10, 20, 30], "iscrowd": 0}],
            }
        )
    )
    s = ev.load_dataset(c)
    assert s[0].names == ("person",)
    np.testing.assert_allclose(s[0].boxes, [[10 / 80, 10 / 50, 30 / 80, 40 / 50]], rtol=1e-6)


def test_cli_on_a_model_file_prints_json_last(tmp_path, rand_model_file, capsys):
    data = make_yolo(tmp_path / "d", n=3)
    rc = ev.main(["--model", str(rand_model_file), "--data", str(data), "--format", "yolo", "--limit", "2"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    out = json.loads(last)
    assert {"map50", "map50_95", "images", "precision", "recall"} <= set(out)
    assert out["images"] == 2 and 0.0 <= out["map50"] <= 1.0


def test_cli_threshold_moves_precision_and_recall_but_not_map(tmp_path, rand_model_file, capsys):
    data = make_yolo(tmp_path / "d", n=4)

    def run(*extra):
        assert ev.main(["--model", str(rand_model_file), "--data", str(data), *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    default, low, top = run(), run("--threshold", "0.005"), run("--threshold", "1.0")
    assert low["score_threshold"] == 0.005 and top["score_threshold"] == 1.0
    assert default["score_threshold"] not in (0.005, 1.0)
    assert low["map50"] == default["map50"] == top["map50"]
    # Nothing scores 1.0 (a sigmoid), and at 0.005 the random model boxes something.
    assert top["recall"] == 0.0 and low["recall"] > 0.0


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1"])
def test_cli_threshold_out_of_range_is_refused(tmp_path, rand_model_file, bad, capsys):
    assert ev.main(["--model", str(rand_model_file), "--data", str(tmp_path), "--threshold", bad]) == 2
    assert "--threshold" in capsys.readouterr().err


def test_cli_without_data_or_shared_asks_for_data(tmp_path, rand_model_file, monkeypatch, capsys):
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path / "nowhere"))
    assert ev.main(["--model", str(rand_model_file)]) == 2
    assert "--data" in capsys.readouterr().err


def test_cli_bad_model_and_bad_args(tmp_path, capsys):
    bad = tmp_path / "bad.xnc"
    bad.write_bytes(b"not a model")
    assert ev.main(["--model", str(bad), "--data", str(tmp_path)]) == 65
    assert ev.main(["--limit", "x"]) == 2


def test_only_one_class_is_scored(tmp_path):
    samples = ev.load_dataset(make_yolo(tmp_path / "d"))
    names = ["person", "dog"]

    def dogs_right_people_wrong():
        perfect = oracle(samples, names)

        def detect(image):
            d = perfect(image).copy()
            d[d[:, 5] == 0, :4] += 500  # every person detection far off
            return d

        return detect

    both = ev.evaluate(dogs_right_people_wrong(), samples, names, 0.25)
    dogs = ev.evaluate(dogs_right_people_wrong(), samples, names, 0.25, only="dog")
    people = ev.evaluate(dogs_right_people_wrong(), samples, names, 0.25, only="person")
    assert both["map50"] < 0.75
    assert dogs["map50"] == pytest.approx(1.0) and dogs["precision"] == 1.0
    assert people["map50"] < 0.05


def test_default_split_reads_the_listed_scenes_and_whole_sources(tmp_path, monkeypatch):
    data = tmp_path / "datasets"
    make_yolo(data / "person" / "cam", n=5)
    whole = make_yolo(data / "whole", n=2, seed=1)
    split = tmp_path / "split.txt"
    split.write_text("# held out\nval person/cam/images/im1.png\nval person/cam/images/im3.png\ndrop person/cam/images/im0.png\n")
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path))
    monkeypatch.setattr(datasets, "VALIDATION_SPLIT_FILE", split)
    monkeypatch.setattr(datasets, "VALIDATION_WHOLE", (("whole", "yolo"),))
    got = ev.validation_split()
    assert [s.image.name for s in got] == ["im1.png", "im3.png", "im0.png", "im1.png"]
    assert got[2].image.parent.parent == whole
    split.write_text("val person/cam/images/gone.png\n")
    with pytest.raises(ev.EvalDataError, match="missing"):
        ev.validation_split()
    split.write_text("val person/cam/im1.png\n")
    with pytest.raises(ev.EvalDataError, match=r"split.txt:1"):
        ev.validation_split()


def test_frames_found_counts_frames_with_every_label_boxed():
    gts = [
        (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 0])),
        (np.array([[0, 0, 10, 10]], float), np.array([0])),
        (np.zeros((0, 4)), np.zeros(0, int)),  # no labels: not a frame that counts
    ]
    both = np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.9, 0]], np.float32)
    one = both[:1]
    assert ev.frames_found(gts, [both, one, both], 0.5) == 1.0
    assert ev.frames_found(gts, [one, one, one], 0.5) == 0.5  # frame 0 misses its second person
    assert ev.frames_found(gts, [both, one, both], 0.95) == 0.0  # below the score threshold


def test_upright_found_counts_only_lone_standing_people_a_quarter_of_the_frame_tall():
    shapes = [(100, 160)] * 5
    stand = np.array([[10, 10, 30, 60]], float)  # 50 tall in 100: counts
    gts = [
        (stand, np.array([0])),
        (np.array([[10, 10, 60, 30]], float), np.array([0])),  # lying: wider than tall
        (np.array([[10, 10, 15, 30]], float), np.array([0])),  # 20 tall: under a quarter of 100
        (np.concatenate([stand, stand + 70]), np.array([0, 0])),  # two people
        (stand + 5, np.array([0])),  # counts
    ]
    hit = [np.array([[*g[0][0], 0.9, 0]], np.float32) for g in gts]
    miss = np.zeros((0, 6), np.float32)
    assert ev.upright_found(gts, hit, shapes, 0.5) == (1.0, 2)
    assert ev.upright_found(gts, [hit[0], miss, miss, miss, miss], shapes, 0.5) == (0.5, 2)
    assert ev.upright_found(gts, hit, shapes, 0.95) == (0.0, 2)  # below the score threshold
    assert ev.upright_found(gts[1:4], hit[1:4], shapes[1:4], 0.5) == (0.0, 0)


def test_groups_are_scored_on_their_own(tmp_path):
    a = ev.load_dataset(make_yolo(tmp_path / "a", n=3))
    b = ev.load_dataset(make_yolo(tmp_path / "b", n=3, seed=5))
    samples = a + b
    perfect_a = oracle(a, ["person"])
    calls = iter(range(len(samples)))

    def detect(img):  # right on a, nothing on b
        return perfect_a(img) if next(calls) < len(a) else np.zeros((0, 6), np.float32)

    m = ev.evaluate(detect, samples, ["person"], 0.25, group_by=lambda s: s.image.parent.parent.name)
    assert m["groups"]["a"]["map50"] == pytest.approx(1.0) and m["groups"]["a"]["frames_found"] == 1.0
    assert m["groups"]["b"]["recall"] == 0.0 and m["groups"]["b"]["images"] == 3
    assert 0.0 < m["recall"] < 1.0


def _with_empty_images(root, n_empty=4):
    """make_yolo plus ``n_empty`` images without any label (the person-free scenes)."""
    make_yolo(root, n=3)
    for i in range(n_empty):
        cv2.imwrite(str(root / "images" / f"empty{i}.png"), np.full((90, 120, 3), 80, np.uint8))
        (root / "labels" / f"empty{i}.txt").write_text("")
    return root


def with_false_boxes(samples):
    """Right on the labelled images; two false boxes on empty0, one scoring 0.1 on empty1, none on the others."""
    perfect = oracle(samples, ["person", "dog"])
    order = iter(samples)
    extra = {"empty0.png": [[5, 5, 30, 30, 0.9, 0], [40, 5, 60, 30, 0.8, 0]], "empty1.png": [[5, 5, 30, 30, 0.1, 0]]}

    def detect(img):
        s = next(order)
        d = perfect(img)
        return np.array(extra.get(s.image.name, d), np.float32).reshape(-1, 6)

    return detect


def test_false_boxes_on_empty_images_are_counted_per_100(tmp_path):
    samples = ev.load_dataset(_with_empty_images(tmp_path / "d"))
    assert sum(not len(s.boxes) for s in samples) == 4
    m = ev.evaluate(with_false_boxes(samples), samples, ["person", "dog"], 0.25)
    assert m["empty_images"] == 4 and m["labelled_images"] == 3
    assert m["fp_per_100_empty"] == pytest.approx(50.0)  # 2 boxes over 4 empty images
    assert m["empty_with_box"] == pytest.approx(0.25)
    assert m["recall"] == 1.0 and m["precision"] < 1.0  # the false boxes cost precision, never recall
    low = ev.evaluate(with_false_boxes(samples), samples, ["person", "dog"], 0.05)
    assert low["fp_per_100_empty"] == pytest.approx(75.0) and low["empty_with_box"] == pytest.approx(0.5)


def test_empty_image_numbers_only_count_images_without_labels():
    gts = [(np.array([[0, 0, 10, 10]], float), np.array([0])), (np.zeros((0, 4)), np.zeros(0, int))]
    boxed = np.array([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.9, 0]], np.float32)
    got = metrics.empty_images(gts, [boxed, boxed[1:]], 0.5)
    assert got == {"empty_images": 1, "fp_per_100_empty": 100.0, "empty_with_box": 1.0}
    assert metrics.empty_images(gts[:1], [boxed], 0.5) == {
        "empty_images": 0, "fp_per_100_empty": 0.0, "empty_with_box": 0.0}


def test_match_image_marks_true_false_and_missed():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    d = np.array([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0], [100, 100, 110, 110, 0.7, 0]], np.float32)
    found, kept, true = metrics.match_image(boxes, np.array([0, 0]), d, 0.5)
    assert found.tolist() == [True, False]  # the second label is missed
    assert true.tolist() == [True, False, False]  # a duplicate and a stray box are both false
    assert kept[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_sheet_draws_found_false_and_missed_in_their_colours(tmp_path):
    from evaluation.sheet import GREEN, RED, TILE_H, TILE_W, YELLOW, draw_sheet

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((180, 240, 3), 128, np.uint8))  # one tile, scale 1
    sc = score.Scored(
        img,
        np.array([[20, 20, 80, 150], [150, 20, 200, 150]], float),
        np.array([0, 0]),
        np.array([[20, 20, 80, 150, 0.9, 0], [100, 160, 120, 175, 0.9, 0]], np.float32),
        (180, 240),
    )
    out = tmp_path / "sheet.png"
    assert draw_sheet([sc], 0.5, out, n=4, columns=3) == 1
    sheet = cv2.imread(str(out))
    assert sheet.shape[1] == TILE_W and sheet.shape[0] > TILE_H
    body = sheet[26:]

    def near(colour):
        return (np.abs(body.astype(int) - colour).sum(-1) < 40).sum()

    assert near(GREEN) > 50 and near(RED) > 20 and near(YELLOW) > 50
    # the found person's box is green at its left edge, the missed one's yellow at its left edge
    assert np.abs(body[80, 20].astype(int) - GREEN).sum() < 40
    assert np.abs(body[80, 150].astype(int) - YELLOW).sum() < 40
    with pytest.raises(ValueError):
        draw_sheet([sc], 0.5, out, n=0)


def test_sheet_picks_images_evenly():
    from evaluation.sheet import pick

    assert pick(10, 20) == list(range(10))
    assert pick(100, 5) == [0, 25, 50, 74, 99]


def test_cli_reports_empty_scenes_and_draws_the_sheet(tmp_path, rand_model_file, capsys):
    data = _with_empty_images(tmp_path / "d", n_empty=2)
    sheet = tmp_path / "out" / "sheet.png"
    rc = ev.main(["--model", str(rand_model_file), "--data", str(data), "--threshold", "0.005",
                  "--sheet", str(sheet), "--sheet-images", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    out = json.loads(text.strip().splitlines()[-1])
    assert out["empty_images"] == 2 and out["labelled_images"] == 3
    assert out["fp_per_100_empty"] > 0 and out["empty_with_box"] == 1.0  # a random net boxes noise at 0.005
    assert "sheet: 3 images" in text
    assert cv2.imread(str(sheet)) is not None


@pytest.mark.parametrize(
    "extra, needle",
    [(["--sheet", "x.jpg"], "--sheet"), (["--sheet-images", "0", "--sheet", "x.png"], "--sheet-images"),
     (["--source", "person/fall"], "--source")],
)
def test_cli_refuses_bad_sheet_and_source_flags(tmp_path, rand_model_file, extra, needle, capsys):
    assert ev.main(["--model", str(rand_model_file), "--data", str(tmp_path), *extra]) == 2
    assert needle in capsys.readouterr().err


def test_cli_source_keeps_one_source_of_the_split(tmp_path, monkeypatch, rand_model_file, capsys):
    data = tmp_path / "datasets"
    make_yolo(data / "person" / "cam", n=4)
    make_yolo(data / "whole", n=2, seed=1)
    split = tmp_path / "split.txt"
    split.write_text("val person/cam/images/im1.png\nval person/cam/images/im2.png\n")
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path))
    monkeypatch.setattr(datasets, "VALIDATION_SPLIT_FILE", split)
    monkeypatch.setattr(datasets, "VALIDATION_WHOLE", (("whole", "yolo"),))
    assert ev.main(["--model", str(rand_model_file), "--source", "person/cam"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 2
    assert ev.main(["--model", str(rand_model_file), "--source", "nope"]) == 2
    assert "person/cam" in capsys.readouterr().err  # names the sources there are
    split.write_text("val person/cam/images/im1.png\ndrop person/cam/images/im0.png\ndrop person/cam/images/im3.png\n")
    assert ev.main(["--model", str(rand_model_file), "--images", "drop"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["images"] == 2 and "dropped images" in out  # no coco_mini
    assert ev.main(["--model", str(rand_model_file), "--images", "drop", "--data", str(data)]) == 2


# --- no silent mAP 0: class names, classes without boxes, malformed COCO, the metric's dependency -------------

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "person"


def _copy_person(tmp_path, yaml_text=None):
    import shutil

    d = tmp_path / "person"
    shutil.copytree(FIXTURES, d)
    if yaml_text is not None:
        (d / "data.yaml").write_text(yaml_text)
    return d


@pytest.mark.parametrize("yaml_text", [None, "names: {0: person}\n", "names: {0: 'person'}\nnc: 1\n",
                                       "names:\n  0: person\n", "names: [person]\n", "names:\n  - person\n"])
def test_every_names_form_and_none_keeps_the_labels(tmp_path, rand_model_file, yaml_text, capsys):
    data = _copy_person(tmp_path, yaml_text)
    assert ev.main(["--model", str(rand_model_file), "--data", str(data)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["boxes"] == 3  # every label kept: not dropped as "0"
    if yaml_text is None:
        assert "no data.yaml" in out.err and "0 = person" in out.err


@pytest.mark.parametrize("yaml_text, named", [("names: {0: dog}\n", "dog"), ("names: [cat, dog]\n", "cat"),
                                              ("names:\n  0: car\n", "car")])
def test_a_class_without_boxes_is_said_and_refused(tmp_path, rand_model_file, yaml_text, named, capsys):
    data = _copy_person(tmp_path, yaml_text)
    assert ev.main(["--model", str(rand_model_file), "--data", str(data)]) == 65
    err = capsys.readouterr().err
    assert "no labelled box of class 'person'" in err and named in err  # and what the labels do name
    assert ev.main(["--model", str(rand_model_file), "--data", str(data), "--allow-no-boxes"]) == 0


def test_a_requested_class_without_boxes_is_refused(tmp_path, rand_model_file, capsys):
    data = make_yolo(tmp_path / "d", n=2)
    (data / "data.yaml").write_text("names:\n  0: dog\n  1: cat\n")
    assert ev.main(["--model", str(rand_model_file), "--data", str(data), "--class", "person"]) == 65
    assert "'person'" in capsys.readouterr().err


def _coco(tmp_path, images=None, anns=None):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(root / "images" / name), np.full((50, 80, 3), 60, np.uint8))
    doc = {"images": images or [{"id": 1, "file_name": "a.jpg", "width": 80, "height": 50},
                                {"id": 2, "file_name": "b.jpg", "width": 80, "height": 50}],
           "categories": [{"id": 1, "name": "person"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 30]},
                           {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20]}, *(anns or [])]}
    path = root / "annotations" / "instances_images.json"
    path.write_text(json.dumps(doc, allow_nan=True))
    return root, path


BAD_ANNOTATIONS = {
    "missing bbox": ({"id": 9, "image_id": 1, "category_id": 1}, "missing 'bbox'"),
    "missing image_id": ({"id": 9, "category_id": 1, "bbox": [1, 1, 2, 2]}, "missing 'image_id'"),
    "outside the image": ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [70, 10, 40, 10]}, "outside the image"),
    "negative size": ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [10, 10, -5, 10]}, "must be > 0"),
    "NaN": ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 1, 2, 2]}, "non-finite"),
    "short bbox": ({"id": 9, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2]}, "not [x, y, width, height]"),
    "bbox not a list": ({"id": 9, "image_id": 1, "category_id": 1, "bbox": "1 1 2 2"}, "not [x, y, width, height]"),
    "annotation not an object": (7, "annotations[2]"),
}


@pytest.mark.parametrize("name", sorted(BAD_ANNOTATIONS))
def test_malformed_coco_annotations_are_named_or_skipped_and_counted(tmp_path, rand_model_file, name, capsys):
    entry, needle = BAD_ANNOTATIONS[name]
    root, path = _coco(tmp_path, anns=[entry])
    with pytest.raises(datasets.LabelError) as e:
        datasets.load_dataset(root)
    assert str(path) in str(e.value) and "annotations[2]" in str(e.value) and needle in str(e.value)
    assert ev.main(["--model", str(rand_model_file), "--data", str(root)]) == 65
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert ev.main(["--model", str(rand_model_file), "--data", str(root), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 malformed label" in captured.err and needle in captured.err
    images = json.loads(captured.out.strip().splitlines()[-1])["images"]
    assert images == (2 if name in ("missing image_id", "annotation not an object") else 1)


@pytest.mark.parametrize("bad, needle", [
    ({"id": 3, "width": 80, "height": 50}, "missing 'file_name'"),
    ({"file_name": "a.jpg", "width": 80, "height": 50}, "missing 'id'"),
    ({"id": 3, "file_name": "../a.jpg", "width": 80, "height": 50}, "is not a file name"),
    ({"id": 3, "file_name": "a.jpg", "width": 0, "height": 50}, "must be > 0"),
    ({"id": 3, "file_name": "a.jpg", "height": 50}, "missing 'width'"),
])
def test_malformed_coco_images_are_named(tmp_path, bad, needle):
    images = [{"id": 1, "file_name": "a.jpg", "width": 80, "height": 50},
              {"id": 2, "file_name": "b.jpg", "width": 80, "height": 50}, bad]
    root, path = _coco(tmp_path, images=images)
    with pytest.raises(datasets.LabelError) as e:
        datasets.load_dataset(root)
    assert str(path) in str(e.value) and "images[2]" in str(e.value) and needle in str(e.value)
    report = datasets.LoadReport()
    assert len(datasets.load_dataset(root, report=report, stop=False)) == 2 and len(report.problems) == 1


def test_the_metrics_dependency_is_checked_before_any_detection(tmp_path, rand_model_file, monkeypatch, capsys):
    import sys

    import app.detector

    def no_detector(*a, **k):
        raise AssertionError("the model was loaded before the metric's dependency was checked")

    monkeypatch.setattr(app.detector, "Detector", no_detector)
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)  # an import of it now raises ImportError
    assert ev.main(["--model", str(rand_model_file), "--data", str(make_yolo(tmp_path / "d", n=2))]) == 1
    assert "pycocotools" in capsys.readouterr().err
