"""The default score threshold: picked on the split's dropped images, which training and validation both skip."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")

from app.detector import Detector  # noqa: E402
from app.modelfile import read_model, write_model  # noqa: E402
from app.randmodel import synthetic_frame  # noqa: E402
from evaluation.datasets import DataError as EvalDataError  # noqa: E402
from train import calibrate as te  # noqa: E402
from train.data import DataConfig, SourceConfig  # noqa: E402


def _gt(boxes):
    return (np.asarray(boxes, np.float64).reshape(-1, 4), np.zeros(len(boxes), np.int64))


def _det(rows):
    return np.asarray([[*b, s, 0] for b, s in rows], np.float32).reshape(-1, 6)


def test_f1_best_threshold_picks_the_highest_f1_and_the_lowest_value_on_ties():
    a, b, far = [0, 0, 10, 20], [50, 50, 60, 70], [100, 0, 110, 20]
    gts = [_gt([a, b])]
    dets = [_det([(a, 0.9), (far, 0.7), (b, 0.5)])]
    # 0.3: 2 right, 1 wrong (F1 0.8); 0.6: 1 and 1 (0.5); 0.8: 1 and 0 (0.667)
    thr, f1, p, r = te.f1_best_threshold(gts, dets, [0.6, 0.8, 0.3])
    assert (thr, round(f1, 3), round(p, 3), r) == (0.3, 0.8, 0.667, 1.0)
    assert te.f1_best_threshold(gts, dets, [0.2, 0.3, 0.4])[0] == 0.2  # 0.2..0.4 give the same F1


def _images(rows_per_image):
    """One labelled box per image; each image's detections as (is_the_label, score) pairs."""
    a, far = [0, 0, 10, 20], [100, 0, 110, 20]
    gts = [_gt([a]) for _ in rows_per_image]
    dets = [_det([(a if hit else far, s) for hit, s in rows]) for rows in rows_per_image]
    return gts, dets


def test_recall_leaning_threshold_goes_lower_when_the_images_cannot_tell_the_f1s_apart():
    # 167 labels scored 0.6, 50 scored 0.4, and 67 false boxes at 0.35: F1 0.870 at 0.5 and
    # 0.866 at 0.3, a lead of 0.0035 that resampling the images cannot confirm.
    rows = [[(True, 0.6)]] * 150 + [[(True, 0.4), (False, 0.35)]] * 50 + [[(True, 0.6), (False, 0.35)]] * 17
    gts, dets = _images(rows)
    assert te.f1_best_threshold(gts, dets, [0.3, 0.5, 0.7])[0] == 0.5
    pick = te.recall_leaning_threshold(gts, dets, [0.7, 0.3, 0.5])
    assert pick["threshold"] == 0.3 and pick["f1_best_threshold"] == 0.5
    assert pick["recall"] == 1.0 and pick["f1"] == pytest.approx(434 / 501)
    assert pick["f1_best"] == pytest.approx(334 / 384)


def test_recall_leaning_threshold_keeps_the_best_when_its_lead_is_real():
    # Every image gains a false box below 0.6: F1 1.0 at 0.6 against 0.667 at 0.4, in every resample.
    gts, dets = _images([[(True, 0.8), (False, 0.5)]] * 200)
    pick = te.recall_leaning_threshold(gts, dets, [0.4, 0.6, 0.9])
    assert (pick["threshold"], pick["f1"], pick["precision"]) == (0.6, 1.0, 1.0)


def test_recall_leaning_threshold_stops_at_the_first_threshold_the_best_clearly_beats():
    # F1 0.667 at 0.5, 0.5 at 0.4 and 0.571 at 0.3: 0.3 is nearer the best than 0.4, but the walk
    # down stops at 0.4, which the best clearly beats.
    rows = [[(True, 0.8), (False, 0.45)]] * 100 + [[(True, 0.35), (False, 0.32), (False, 0.31)]] * 100
    gts, dets = _images(rows)
    f1 = [te.f1_best_threshold(gts, dets, [t])[1] for t in (0.3, 0.4, 0.5)]
    assert f1[1] < f1[2] - 0.1 and f1[0] >= f1[1]
    assert te.recall_leaning_threshold(gts, dets, [0.3, 0.4, 0.5, 0.9])["threshold"] == 0.5


@pytest.fixture
def shared_with_drops(tmp_path, monkeypatch, rand_model):
    """A datasets root whose labels are the random model's own boxes scoring >= 0.3, and a split dropping 3 images."""
    src = tmp_path / "shared" / "datasets" / "cams"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir()
    (src / "data.yaml").write_text("names: ['person']\n")
    det = Detector(model=rand_model, score_threshold=0.005)
    for i in range(5):
        img = synthetic_frame(seed=i)
        cv2.imwrite(str(src / "images" / f"{i}.png"), img)
        h, w = img.shape[:2]
        rows = [d for d in det.detect(img) if d[4] >= 0.3]
        (src / "labels" / f"{i}.txt").write_text(
            "".join(f"0 {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n"
                    for x1, y1, x2, y2, *_ in rows)
        )
    split = tmp_path / "split.txt"
    split.write_text("# test split\nval cams/images/0.png\ndrop cams/images/1.png\ndrop cams/images/2.png\n"
                     "drop cams/images/4.png\n")
    monkeypatch.setenv("XNORCAM_SHARED", str(tmp_path / "shared"))
    return split


def _data(split_file) -> DataConfig:
    """The data config of the fixture's one source, whose held-out and dropped scenes ``split_file`` lists."""
    src = SourceConfig(name="cams", path="cams", format="yolo", split="scenes")
    return DataConfig(classes=("person",), sources=(src,), split_file=str(split_file))


def test_the_false_alarm_budget_raises_a_threshold_that_boxes_empty_rooms_too_often():
    person = _gt([[0, 0, 10, 10]])
    gts = [person] + [_gt([])] * 4  # one image with a person, four person-free
    found = _det([([0, 0, 10, 10], 0.9)])
    # false boxes on the empty images scoring 0.1, 0.2, 0.3, 0.4: at 0.15 three of four are boxed
    dets = [found] + [_det([([5, 5, 20, 20], s)]) for s in (0.1, 0.2, 0.3, 0.4)]
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    assert te.within_false_alarm_budget(gts, dets, 0.15, grid, 100.0) == (0.15, 75.0)  # within: kept
    assert te.within_false_alarm_budget(gts, dets, 0.15, grid, 30.0) == (0.35, 25.0)  # raised to the first within
    assert te.within_false_alarm_budget(gts, dets, 0.15, grid, 0.0) == (0.45, 0.0)
    assert te.within_false_alarm_budget([person], [found], 0.15, grid, 0.0) == (0.15, 0.0)  # no empty image: stands


def test_calibration_samples_are_the_dropped_images_only(shared_with_drops):
    samples = te.calibration_samples(shared_with_drops)
    assert [s.image.name for s in samples] == ["1.png", "2.png", "4.png"]
    assert all(set(s.names) <= {"person"} for s in samples)
    assert sum(len(s.boxes) for s in samples) > 0


def test_calibrate_writes_the_picked_threshold_on_the_dropped_images(shared_with_drops, rand_model, tmp_path):
    path = tmp_path / "m.xnc"
    write_model(path, rand_model)
    grid = np.round(np.arange(0.05, 0.61, 0.05), 2)
    thr, f1, _, _ = te.calibrate_score_threshold(path, _data(shared_with_drops), grid=grid)
    # The labels are the model's own boxes above 0.3, so thresholds up to 0.3 find every one of them,
    # and 0.3 is the first to keep no box scoring below it: F1 1 there and nowhere lower.
    assert (thr, f1) == (0.3, 1.0)
    m = read_model(path)
    assert m.score_threshold == 0.3
    cal = m.metadata["score_threshold_calibration"]
    assert cal["images"] == 3 and "dropped" in cal["on"]
    assert cal["f1_best_threshold"] == 0.3 and "bootstrap" in cal["rule"]  # a clear best: no lower one ties it
    assert cal["f1_rule_threshold"] == 0.3 and "empty_images" in cal and "fp_per_100_empty" in cal


def test_a_listed_dropped_image_that_is_missing_is_named(shared_with_drops):
    (shared_with_drops.parent / "shared" / "datasets" / "cams" / "images" / "2.png").unlink()
    with pytest.raises(EvalDataError, match="1 dropped images listed but missing"):
        te.calibration_samples(shared_with_drops)


def test_without_dropped_images_it_calibrates_on_the_configs_training_images(shared_with_drops, rand_model, tmp_path):
    no_drops = tmp_path / "no-drops.txt"
    no_drops.write_text("val cams/images/0.png\n")  # the same scene held out, nothing dropped
    path = tmp_path / "m.xnc"
    write_model(path, rand_model)
    grid = np.round(np.arange(0.05, 0.61, 0.05), 2)
    thr, f1, _, _ = te.calibrate_score_threshold(path, _data(no_drops), grid=grid)
    assert (thr, f1) == (0.3, 1.0)
    cal = read_model(path).metadata["score_threshold_calibration"]
    # images 1..4 train; 0 is held out and must not be used
    assert cal["images"] == 4 and "training" in cal["on"]
    names = sorted(s.image.name for s in te.training_samples(_data(no_drops), 400))
    assert names == ["1.png", "2.png", "3.png", "4.png"]
    assert len(te.training_samples(_data(no_drops), 2, seed=1)) == 2
