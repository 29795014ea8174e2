"""Detector: contract of detect(), equality with decode(reference head), input validation."""

import numpy as np
import pytest

from app import reference
from app.decode import decode
from app.detector import DEFAULT_MODEL, Detector
from app.modelfile import ModelFormatError
from app.preprocess import letterbox
from app.randmodel import synthetic_frame


@pytest.fixture(scope="module")
def det(rand_model_file):
    d = Detector(rand_model_file, score_threshold=0.2)
    d.warmup()
    return d


@pytest.mark.parametrize("shape", [(240, 320, 3), (97, 333), (500, 40, 3), (192, 192)])
def test_detect_equals_decode_of_reference(det, shape):
    img = synthetic_frame(11, shape[1], shape[0], 3 if len(shape) == 3 else 1)
    got = det.detect(img)
    x, lb = letterbox(img, 192, 192, 1)
    want = decode(reference.forward(det.model, x), det.model.anchors, det.input_size, lb, img.shape,
                  0.2, det.nms_iou, det.max_detections)
    assert got.dtype == np.float32 and got.ndim == 2 and got.shape[1] == 6
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    if len(got):
        assert np.all(np.diff(got[:, 4]) <= 0)
        assert np.all(got[:, [0, 1]] >= 0) and np.all(got[:, 2] <= shape[1]) and np.all(got[:, 3] <= shape[0])
        assert np.all(got[:, 5] == 0)


def test_some_detections_on_random_model(det):
    # the random model is tuned to emit a few boxes: this keeps the equality test above meaningful
    assert len(det.detect(synthetic_frame(11, 320, 240))) > 0


def test_tiny_and_odd_images(det):
    for img in (np.zeros((1, 1), np.uint8), np.zeros((1, 1, 3), np.uint8), np.zeros((5, 3, 1), np.uint8),
                synthetic_frame(2, 321, 241)[::2, ::-1]):
        out = det.detect(img)
        assert out.dtype == np.float32 and out.shape[1] == 6


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.float32), np.zeros((0, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros(10, np.uint8), "image"])
def test_bad_images_raise_value_error(det, bad):
    with pytest.raises(ValueError, match="expected"):
        det.detect(bad)


def test_attributes_and_stage_times(det):
    assert det.class_names == ("person",) and det.input_size == (192, 192) and det.channels == 1
    det.detect(synthetic_frame(1))
    assert set(det.last_stage_ms) == {"preprocess", "stem", "body", "head", "decode"}
    assert all(v >= 0 for v in det.last_stage_ms.values())


def test_max_detections_and_settings(rand_model_file):
    img = synthetic_frame(11, 320, 240)
    many = Detector(rand_model_file, score_threshold=0.05, nms_iou=1.0).detect(img)
    assert len(many) > 3
    assert len(Detector(rand_model_file, score_threshold=0.05, nms_iou=1.0, max_detections=3).detect(img)) == 3
    with pytest.raises(ValueError):
        Detector(rand_model_file, score_threshold=2.0)


def test_default_path_and_errors(tmp_path):
    assert DEFAULT_MODEL.name == "person.xnc" and DEFAULT_MODEL.parent.name == "models"
    (tmp_path / "bad.xnc").write_bytes(b"nope")
    with pytest.raises(ModelFormatError, match="bad.xnc"):
        Detector(tmp_path / "bad.xnc")
    if DEFAULT_MODEL.exists():
        assert Detector().class_names
    else:
        with pytest.raises(ModelFormatError, match="person.xnc"):
            Detector()


def test_the_image_is_checked_once_a_frame(det, monkeypatch):
    import app.detector
    import app.preprocess

    seen = []
    real_check = app.preprocess.check_image

    def counting(image):
        seen.append(image.shape)
        return real_check(image)

    monkeypatch.setattr(app.preprocess, "check_image", counting)
    monkeypatch.setattr(app.detector, "check_image", counting, raising=False)
    det.detect(synthetic_frame(3, 320, 240))
    assert seen == [(240, 320, 3)]
