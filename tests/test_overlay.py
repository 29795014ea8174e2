"""Overlay drawing, checked pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest

from app.overlay import Hud, class_colour, label_text, render, render_rgba

NAMES = ["person", "dog"]


def dets(*rows):
    return np.array(rows, dtype=np.float32).reshape(-1, 6)


def test_no_detections_no_hud_is_the_frame_itself():
    grey = np.random.default_rng(0).integers(0, 256, (60, 80), dtype=np.uint8)
    out = render(grey, dets(), NAMES)
    assert out.shape == (60, 80, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    bgr = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    out = render(bgr, dets(), NAMES)
    np.testing.assert_array_equal(out, bgr)
    assert out is not bgr


def test_box_edges_take_the_class_colour_and_input_is_untouched():
    frame = np.full((240, 320), 50, np.uint8)
    before = frame.copy()
    out = render(frame, dets([100, 120, 200, 220, 0.9, 0]), NAMES)
    np.testing.assert_array_equal(frame, before)
    r, g, b = class_colour(0)
    bgr = (b, g, r)
    assert tuple(out[170, 100]) == bgr  # left edge
    assert tuple(out[170, 200]) == bgr  # right edge
    assert tuple(out[220, 150]) == bgr  # bottom edge
    assert tuple(out[170, 150]) == (50, 50, 50)  # inside the box: untouched
    assert tuple(out[10, 300]) == (50, 50, 50)  # far away: untouched
    # the label sits above the box on a filled patch of the class colour
    patch = out[100:119, 100:160].reshape(-1, 3)
    assert (patch == bgr).all(axis=1).sum() > 100


def test_classes_get_distinct_colours():
    colours = {class_colour(i) for i in range(12)}
    assert len(colours) == 12
    frame = np.zeros((100, 200), np.uint8)
    out = render(frame, dets([10, 30, 60, 90, 0.8, 0], [110, 30, 160, 90, 0.7, 1]), NAMES)
    assert tuple(out[60, 10]) != tuple(out[60, 110])


def test_label_text_uses_names_and_falls_back():
    assert label_text(0, 0.876, NAMES) == "person 0.88"
    assert label_text(7, 0.5, NAMES) == "class7 0.50"


def test_hud_is_drawn_bottom_left_under_the_labels():
    frame = np.full((240, 320), 60, np.uint8)
    with_hud = render(frame, dets(), NAMES, Hud(fps=7.5, latency_ms=120.0, dropped=3))
    assert with_hud[220:, :200].max() > 200  # white text
    assert with_hud[220:, :5].min() == 0  # on a black band
    assert (with_hud[:200] == 60).all()
    assert "7.5 fps" in Hud(7.5, 120.0, 3).text() and "dropped 3" in Hud(7.5, 120.0, 3).text()


def test_rgba_overlay_is_transparent_except_drawings_and_scaled():
    # detections in a 320x240 frame drawn on a 640x480 overlay
    out = render_rgba((640, 480), dets([100, 120, 200, 220, 0.9, 0]), NAMES, None, frame_size=(320, 240))
    assert out.shape == (480, 640, 4) and out.dtype == np.uint8
    r, g, b = class_colour(0)
    assert tuple(out[340, 200]) == (r, g, b, 255)  # left edge at x=100*2
    assert tuple(out[340, 400]) == (r, g, b, 255)  # right edge at x=200*2
    assert out[340, 300, 3] == 0  # inside: transparent
    assert out[470, 630, 3] == 0
    drawn = out[..., 3] > 0
    assert 0 < drawn.mean() < 0.1  # only the drawings are opaque


def test_rgba_hud_has_translucent_background():
    out = render_rgba((320, 240), dets(), NAMES, Hud(10.0, 90.0, 0))
    alphas = set(np.unique(out[225:, :150, 3]).tolist())
    assert 160 in alphas and out[:200, :, 3].max() == 0


def test_boxes_outside_the_image_do_not_crash():
    out = render(np.zeros((50, 50), np.uint8), dets([-20, -20, 80, 80, 0.5, 0], [40, 40, 45, 45, 0.3, 3]), NAMES)
    assert out.shape == (50, 50, 3)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8)])
def test_render_refuses_bad_frames(bad):
    with pytest.raises(ValueError):
        render(bad, dets(), NAMES)


def test_cached_text_size_matches_opencv():
    import cv2

    from app.overlay import FONT, text_size

    for text in ("person 0.87", "7.5 fps  det 120.3 ms  dropped 4127", "class12 0.19", "dog 1.00"):
        assert text_size(text, 0.4) == cv2.getTextSize(text, FONT, 0.4, 1)


def test_marks_draw_track_ids_zones_and_the_line():
    from app.overlay import LINE_RGB, ZONE_RGB, Marks

    frame = np.zeros((240, 320), np.uint8)
    d = dets([100, 120, 200, 220, 0.9, 0])
    plain = render(frame, d, NAMES)
    with_id = render(frame, d, NAMES, marks=Marks(ids=np.array([7])))
    assert label_text(0, 0.9, NAMES, 7) == "#7 person 0.90" and label_text(0, 0.9, NAMES, 0) == "person 0.90"
    label = (slice(90, 120), slice(95, 260))
    assert (with_id[label] != plain[label]).any() and np.array_equal(with_id[130:], plain[130:])
    zone = ("door", ((0.5, 0.5), (1.0, 0.5), (1.0, 1.0), (0.5, 1.0)))
    out = render(frame, dets(), NAMES, marks=Marks(zones=(zone,), line=((0.0, 0.25), (1.0, 0.25))))
    zone_bgr, line_bgr = ZONE_RGB[::-1], LINE_RGB[::-1]
    assert tuple(out[round(0.75 * 239), round(0.5 * 319)]) == zone_bgr  # on the zone's left edge
    assert tuple(out[round(0.75 * 239), 100]) == (0, 0, 0)  # outside it: untouched
    assert tuple(out[round(0.25 * 239), 160]) == line_bgr
    rgba = render_rgba((640, 480), dets(), NAMES, None, frame_size=(320, 240), marks=Marks(zones=(zone,)))
    assert tuple(rgba[round(0.75 * 479), round(0.5 * 639)]) == (*ZONE_RGB, 255)  # normalised: scaled to the overlay
