"""Decode (YOLOv5 form), per-class NMS, letterbox and its inverse."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.decode import decode
from app.preprocess import Letterbox, letterbox

ANCHORS = np.array([[10, 20], [40, 40]], np.float32)


def _logit(p):
    return float(np.log(p / (1 - p)))


def _head(cells, gh=4, gw=4, classes=2):
    """cells: list of (gy, gx, anchor, tx, ty, tw, th, obj_p, class, cls_p)."""
    h = np.full((gh, gw, 2, 5 + classes), -20.0, np.float32)
    for gy, gx, a, tx, ty, tw, th, obj, c, p in cells:
        h[gy, gx, a, :4] = (tx, ty, tw, th)
        h[gy, gx, a, 4] = _logit(obj)
        h[gy, gx, a, 5 + c] = _logit(p)
    return h.reshape(gh, gw, -1)


def test_single_box_geometry():
    # sigmoid(0)=0.5: cx = (gx + 0.5) * stride, w = anchor_w * 1
    h = _head([(1, 2, 1, 0, 0, 0, 0, 0.9, 1, 0.8)])
    d = decode(h, ANCHORS, (64, 64), score_threshold=0.25)
    assert d.dtype == np.float32 and d.shape == (1, 6)
    np.testing.assert_allclose(d[0], [40 - 20, 24 - 20, 40 + 20, 24 + 20, 0.72, 1], rtol=1e-5)


def test_threshold_and_sort_and_limit():
    h = _head([(0, 0, 0, 0, 0, 0, 0, 0.9, 0, 0.9), (3, 3, 0, 0, 0, 0, 0, 0.9, 0, 0.5),
               (0, 3, 0, 0, 0, 0, 0, 0.3, 0, 0.5)])
    d = decode(h, ANCHORS, (64, 64), score_threshold=0.25)
    np.testing.assert_allclose(d[:, 4], [0.81, 0.45], rtol=1e-5)
    assert decode(h, ANCHORS, (64, 64), max_detections=1).shape == (1, 6)
    assert decode(h, ANCHORS, (64, 64), score_threshold=0.95).shape == (0, 6)
    assert decode(h, ANCHORS, (64, 64), max_detections=0).shape == (0, 6)


def test_nms_is_per_class():
    same = [(1, 1, 1, 0, 0, 0, 0, 0.9, 0, 0.9), (1, 1, 0, 0, 0, 1.0, 0.5, 0.9, 0, 0.8)]
    # anchor 0 scaled: w = 10 * (2*sig(1))^2 ~ 21.4, h = 20*(2 sig(.5))^2 ~ 30.0 vs 40x40: IoU ~0.40
    d = decode(_head(same), ANCHORS, (64, 64), nms_iou=0.3)
    assert d.shape[0] == 1
    assert decode(_head(same), ANCHORS, (64, 64), nms_iou=0.5).shape[0] == 2
    other = [same[0], (1, 1, 0, 0, 0, 1.0, 0.5, 0.9, 1, 0.8)]
    assert decode(_head(other), ANCHORS, (64, 64), nms_iou=0.3).shape[0] == 2


def test_letterbox_undo_and_clip():
    img = np.zeros((100, 200, 3), np.uint8)
    x, lb = letterbox(img, 64, 64, 1)
    assert x.shape == (64, 64, 1) and lb == Letterbox(scale=0.32, pad_x=0, pad_y=16)
    h = _head([(2, 0, 1, 0, 0, 0, 0, 0.9, 0, 0.9)])
    d = decode(h, ANCHORS, (64, 64), lb, img.shape)
    # input box x: -12..28 -> clipped 0..87.5 ; y: 20..60 -> (y-16)/0.32 = 12.5..137.5 -> clip 100
    np.testing.assert_allclose(d[0, :4], [0, 12.5, 87.5, 100], rtol=1e-5)
    # a box wholly inside the padding is dropped
    pad = _head([(0, 2, 0, 0, 0, -5, -5, 0.9, 0, 0.9)])
    assert decode(pad, ANCHORS, (64, 64), lb, img.shape).shape == (0, 6)


@given(st.integers(1, 500), st.integers(1, 500), st.sampled_from([1, 3]), st.sampled_from([(0, 0), (1, 1), (3, 0)]))
def test_letterbox_shapes_and_centering(h, w, ch, kind):
    nd, _ = kind
    img = np.full((h, w, 3) if kind[0] == 3 else (h, w), 200, np.uint8)
    x, lb = letterbox(img, 96, 64, ch)
    assert x.shape == (64, 96, ch) and x.dtype == np.uint8
    nw, nh = max(1, round(w * lb.scale)), max(1, round(h * lb.scale))
    assert lb.scale == pytest.approx(min(96 / w, 64 / h))
    assert (lb.pad_x, lb.pad_y) == ((96 - min(96, nw)) // 2, (64 - min(64, nh)) // 2)
    assert np.all(x[lb.pad_y:lb.pad_y + nh, lb.pad_x:lb.pad_x + nw] == 200)
    assert (x == 128).sum() == x.size - min(96, nw) * min(64, nh) * ch
    # corners map back to the image corners
    back = lb.to_image(np.array([lb.pad_x, lb.pad_y, lb.pad_x + nw, lb.pad_y + nh], float))
    np.testing.assert_allclose(back, [0, 0, w, h], atol=1.0 / lb.scale)


def test_letterbox_shrinks_without_aliasing():
    # 1-px stripes, one lit in three, shrunk about 14x: an area average covers 4 or 5 lit stripes
    # (73..91 grey, mean 85); bilinear samples a couple of columns per output pixel, so it keeps 0s and 255s.
    img = np.zeros((900, 900), np.uint8)
    img[:, ::3] = 255
    x, _ = letterbox(img, 64, 64, 1)
    assert 70 <= x.min() and x.max() <= 95 and abs(float(x.mean()) - 85.0) < 3.0


def test_letterbox_grey_conversion_matches_cv2():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    x, lb = letterbox(img[:, ::-1], 64, 64, 1)  # non-contiguous input is fine
    np.testing.assert_array_equal(x[:, :, 0], cv2.cvtColor(np.ascontiguousarray(img[:, ::-1]), cv2.COLOR_BGR2GRAY))
    grey, _ = letterbox(x[:, :, 0], 64, 64, 3)
    assert np.all(grey == x)


@pytest.mark.parametrize("shape, ch", [((64, 96), 1), ((64, 96, 3), 3), ((64, 96, 1), 1)])
def test_letterbox_of_a_frame_at_the_network_size_is_a_copy(shape, ch):
    """The Pi's lores stream comes at the network's size: the frame's own bytes, the identity map,
    and a copy (the camera reuses its buffer)."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    x, lb = letterbox(img[::1, ::-1][:, ::-1], 96, 64, ch)  # a non-contiguous view of the same bytes
    assert x.shape == (64, 96, ch) and x.flags.c_contiguous and not np.shares_memory(x, img)
    np.testing.assert_array_equal(x, img.reshape(64, 96, ch))
    assert lb == Letterbox(scale=1.0, pad_x=0, pad_y=0)
    np.testing.assert_allclose(lb.to_image(np.array([0.0, 0.0, 96.0, 64.0])), [0, 0, 96, 64])


def test_letterbox_of_a_colour_frame_at_the_network_size_still_turns_it_grey():
    import cv2

    img = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    x, lb = letterbox(img, 96, 64, 1)
    np.testing.assert_array_equal(x[:, :, 0], cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    assert lb == Letterbox(scale=1.0, pad_x=0, pad_y=0)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((0, 4), np.uint8), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((2, 2, 2, 2), np.uint8), [[1, 2]]])
def test_letterbox_rejects_bad_images(bad):
    with pytest.raises(ValueError, match="expected"):
        letterbox(bad, 64, 64, 1)
