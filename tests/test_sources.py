"""Frame sources: images, demo, OpenCV files, picamera2 (against the fake), spec strings."""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from app import sources
from app.config import ConfigError, SourceConfig
from app.sinks import DrmPreview
from app.sources import (
    DemoSource,
    Frame,
    ImagesSource,
    OpenCVSource,
    Picamera2Source,
    SourceError,
    frames,
    make_factory,
    preflight,
    resolve_spec,
)
from tests.fakes import fake_picamera2
from tests.hostile_images import BOMB_FORMATS, good_image, header_bomb, png_bomb

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "person" / "images"


@pytest.fixture
def fake_cam(monkeypatch):
    module = fake_picamera2.make_module()
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return module


def write_images(tmp_path: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i:02d}.png"
        cv2.imwrite(str(p), np.full((20, 30, 3), 10 * i, np.uint8))
        paths.append(p)
    return paths


def test_frames_numbers_and_stamps_in_order(tmp_path):
    write_images(tmp_path, 3)
    out = list(frames(ImagesSource(str(tmp_path), fps=0)))
    assert [f.seq for f in out] == [0, 1, 2]
    assert all(isinstance(f, Frame) and f.pixels.dtype == np.uint8 and f.pixels.shape == (20, 30, 3) for f in out)
    assert out[0].t <= out[1].t <= out[2].t
    assert [int(f.pixels[0, 0, 0]) for f in out] == [0, 10, 20]  # sorted by name


def test_images_glob_loop_and_skip_unreadable(tmp_path, caplog):
    write_images(tmp_path, 2)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    src = ImagesSource(str(tmp_path / "*.*"), fps=0, loop=True)
    got = list(itertools.islice(frames(src), 5))
    assert len(got) == 5
    assert src.skipped >= 1
    assert "unreadable" in caplog.text


def test_images_empty_folder_raises(tmp_path):
    with pytest.raises(SourceError, match="no image files"):
        ImagesSource(str(tmp_path)).open()


def test_images_are_paced_at_fps(tmp_path):
    write_images(tmp_path, 4)
    src = ImagesSource(str(tmp_path), fps=20)
    t0 = time.monotonic()
    out = list(frames(src))
    assert len(out) == 4
    # 4 frames at 20 fps: three full periods between the first and the last.
    assert out[-1].t - out[0].t >= 3 * 0.05 * 0.9
    assert time.monotonic() - t0 < 2.0


def test_demo_needs_nothing_and_moves():
    src = DemoSource(width=160, height=120, fps=0, frames_per_photo=4)
    n_photos = len(sources.list_images(str(sources.DEMO_DIR)))
    got = list(itertools.islice(frames(src), 4 * n_photos + 1))
    assert all(f.pixels.shape == (120, 160, 3) and f.pixels.dtype == np.uint8 for f in got)
    assert not np.array_equal(got[0].pixels, got[1].pixels)  # pan/zoom within one photo
    assert not np.array_equal(got[3].pixels, got[4].pixels)  # the next photo
    np.testing.assert_array_equal(got[0].pixels, got[-1].pixels)  # loops forever, deterministic


def test_demo_photos_are_small_real_and_credited():
    photos = sorted(sources.DEMO_DIR.glob("*.jpg"))
    assert 3 <= len(photos) <= 4
    assert all(p.stat().st_size < 60_000 for p in photos)
    assert "CC BY 4.0" in (sources.DEMO_DIR / "ATTRIBUTION.md").read_text()


def test_opencv_file_source_plays_and_ends(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    out = list(frames(OpenCVSource(str(path))))
    assert len(out) == 5 and out[0].pixels.shape == (48, 64, 3)
    looped = list(itertools.islice(frames(OpenCVSource(str(path), loop=True)), 8))
    assert len(looped) == 8


def test_opencv_unopenable_raises(tmp_path):
    with pytest.raises(SourceError, match="could not open"):
        OpenCVSource(str(tmp_path / "nope.mp4")).open()
    assert OpenCVSource("3").target == 3
    assert OpenCVSource("rtsp://cam/stream").finite is False


def test_spec_resolution_and_preflight(tmp_path):
    assert resolve_spec("auto", probe=lambda: True) == "picamera2"
    assert resolve_spec("auto", probe=lambda: False) == "demo"
    assert resolve_spec("images:x", probe=lambda: True) == "images:x"
    with pytest.raises(ConfigError, match="no image files"):
        preflight(f"images:{tmp_path}")
    with pytest.raises(ConfigError, match="no such file"):
        preflight(f"opencv:{tmp_path / 'missing.mp4'}")
    preflight("opencv:0")
    preflight("opencv:http://example.invalid/x.mjpg")
    preflight("demo")
    preflight(f"images:{FIXTURES}")


def test_factory_makes_fresh_sources():
    f = make_factory("demo", SourceConfig(width=64, height=48, fps=0))
    a, b = f(), f()
    assert isinstance(a, DemoSource) and a is not b and a.size == (64, 48)
    assert isinstance(make_factory("images:x", SourceConfig())(), ImagesSource)
    assert isinstance(make_factory("opencv:0", SourceConfig())(), OpenCVSource)
    assert isinstance(make_factory("picamera2", SourceConfig())(), Picamera2Source)
    assert make_factory("picamera2", SourceConfig())().drm is None  # headless unless handed a DRM preview
    drm = DrmPreview(["person"])
    f = make_factory("picamera2", SourceConfig(), drm)
    assert f() is not f() and f().drm is drm and f().drm is drm


# --- picamera2 against the fake -------------------------------------------------------


def test_picamera2_not_available_off_a_pi(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import fails like on a laptop
    assert sources.picamera2_available() is False


def test_picamera2_available_with_fake(fake_cam):
    assert sources.picamera2_available() is True
    fake_cam.state.cameras = 0
    assert sources.picamera2_available() is False


def test_picamera2_configures_lores_yuv420_and_crops_the_y_plane(fake_cam):
    # 200 px wide: the fake pads the YUV420 stride to 256, like the real one.
    src = Picamera2Source(width=200, height=150, preview_size=(800, 600))
    with src:
        cam = fake_cam.state.opened[-1]
        cfg = cam.camera_configuration()
        assert cfg["lores"]["format"] == "YUV420" and cfg["lores"]["size"] == (200, 150)
        assert cfg["lores"]["stride"] == 256
        assert cfg["main"]["size"] == (800, 600)
        y = src.read()
        assert y.shape == (150, 200) and y.dtype == np.uint8 and y.flags.c_contiguous
        assert not (y == fake_picamera2.PAD_VALUE).any()  # no stride padding leaked in
        n = fake_cam.state.captures - 1
        expected = (np.arange(200)[None, :] + np.arange(150)[:, None] + n) % 200
        np.testing.assert_array_equal(y, expected.astype(np.uint8))
        assert cam.preview[0] == fake_picamera2.Preview.NULL  # headless: no DRM asked
    assert cam.closed and not cam.started


def test_picamera2_odd_size_is_cropped_to_what_the_camera_configured(fake_cam):
    with Picamera2Source(width=321, height=241) as src:
        assert src.read().shape == (240, 320)


def test_picamera2_offers_each_camera_to_the_drm_preview(fake_cam):
    drm = DrmPreview(["person"])
    with Picamera2Source(drm=drm) as src:
        cam = fake_cam.state.opened[-1]
        assert drm.camera is cam and cam.started
        assert cam.preview[0] == fake_picamera2.Preview.DRM
        assert cam.camera_configuration()["display"] == "main"
        assert src.read().shape == (240, 320)
    assert drm.camera is None and cam.closed


def test_picamera2_runs_headless_when_drm_fails(fake_cam, caplog):
    fake_cam.state.drm_ok = False
    drm = DrmPreview(["person"])
    with Picamera2Source(drm=drm) as src:
        cam = fake_cam.state.opened[-1]
        assert cam.started and cam.preview[0] == fake_picamera2.Preview.NULL
        assert src.read().shape == (240, 320)
    assert drm.failed and drm.camera is None
    assert caplog.text.count("DRM preview unavailable") == 1


def test_picamera2_open_failure_raises(fake_cam):
    fake_cam.state.cameras = 0
    with pytest.raises(RuntimeError):
        Picamera2Source().open()


def test_picamera2_bad_buffer_raises(fake_cam):
    fake_cam.state.on_capture = lambda n: np.zeros((10, 10), np.uint8)
    with Picamera2Source() as src:
        with pytest.raises(SourceError, match="cannot hold"):
            src.read()


# --- hostile files: skipped once each, a finite folder ends, bombs refused from the header ------------------


def _bad_1x1(p):
    cv2.imwrite(str(p / "b.png"), np.zeros((1, 1, 3), np.uint8))


def _bad_thin(p):
    cv2.imwrite(str(p / "b.png"), np.zeros((40, 1, 3), np.uint8))


def _bad_flat(p):
    cv2.imwrite(str(p / "b.jpg"), np.zeros((1, 40), np.uint8))


def _bad_text(p):
    (p / "b.jpg").write_bytes(b"not a jpeg at all")


def _bad_empty(p):
    (p / "b.png").write_bytes(b"")


def _bad_truncated(p):
    good_image(p / "t.png", 5)
    (p / "b.png").write_bytes((p / "t.png").read_bytes()[:60])
    (p / "t.png").unlink()


BAD_FILES = {
    "1x1 png": (_bad_1x1, "empty image"),
    "40x1 png": (_bad_thin, "empty image"),
    "1x40 jpeg": (_bad_flat, "empty image"),
    "text named .jpg": (_bad_text, "unreadable header"),
    "zero bytes": (_bad_empty, "unreadable header"),
    "truncated png": (_bad_truncated, "cannot be decoded"),
    **{f"{fmt} declaring 9000x9000": ((lambda p, fmt=fmt: header_bomb(p / "b.img", fmt)), "9000x9000")
       for fmt in BOMB_FORMATS},
    "real png bomb 6000x6000": ((lambda p: png_bomb(p / "b.png", 6000, 6000)), "6000x6000"),
}


def _folder_with(tmp_path, make_bad):
    good_image(tmp_path / "a.png", 10)
    make_bad(tmp_path)
    good_image(tmp_path / "c.png", 20)
    for f in tmp_path.glob("b.img"):
        f.rename(f.with_suffix({b"\xff\xd8": ".jpg", b"BM": ".bmp", b"RI": ".webp", b"II": ".tif", b"MM": ".tif",
                                b"P5": ".pgm", b"\x89P": ".png"}[f.read_bytes()[:2]]))
    bad = [p for p in tmp_path.iterdir() if p.name.startswith("b.")]
    assert len(bad) == 1
    return bad[0]


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_is_skipped_once_and_a_finite_folder_ends(tmp_path, kind, caplog):
    make_bad, why = BAD_FILES[kind]
    bad = _folder_with(tmp_path, make_bad)
    src = ImagesSource(str(tmp_path), fps=0, max_pixels=25_000_000)
    got = list(frames(src))
    assert [int(f.pixels[0, 0, 0]) for f in got] == [10, 20]  # the good ones, once each, then the end
    skips = src.take_skips()
    assert len(skips) == 1 and skips[0][0] == str(bad) and why in skips[0][1], skips
    assert src.skipped == 1 and caplog.text.count(bad.name) == 1


@pytest.mark.parametrize("kind", ["1x1 png", "png declaring 9000x9000", "truncated png"])
def test_a_looping_folder_skips_a_bad_file_once_not_every_pass(tmp_path, kind, caplog):
    bad = _folder_with(tmp_path, BAD_FILES[kind][0])
    src = ImagesSource(str(tmp_path), fps=0, loop=True)
    got = list(itertools.islice(frames(src), 7))
    assert [int(f.pixels[0, 0, 0]) for f in got] == [10, 20] * 3 + [10]
    assert src.skipped == 1 and len(src.take_skips()) == 1 and caplog.text.count(bad.name) == 1


@pytest.mark.parametrize("loop", [False, True])
def test_a_folder_of_only_bad_files_raises_instead_of_ending_or_spinning(tmp_path, loop):
    _bad_1x1(tmp_path)
    header_bomb(tmp_path / "c.png", "png")
    _bad_text(tmp_path)
    src = ImagesSource(str(tmp_path), fps=0, loop=loop)
    with pytest.raises(SourceError, match="no usable image files"):
        list(itertools.islice(frames(src), 5))
    assert src.skipped == 3


def test_the_pixel_cap_is_the_configured_one(tmp_path):
    good_image(tmp_path / "a.png", 10, size=(100, 100))
    assert len(list(frames(ImagesSource(str(tmp_path), fps=0, max_pixels=10_000)))) == 1
    src = ImagesSource(str(tmp_path), fps=0, max_pixels=9_999)
    with pytest.raises(SourceError):
        list(frames(src))
    assert "over source.max_pixels = 9999" in src.take_skips()[0][1]
    f = make_factory(f"images:{tmp_path}", SourceConfig(max_pixels=9_999))
    assert f().max_pixels == 9_999


@pytest.mark.parametrize("ext, params", [
    (".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".png", []), (".bmp", []),
    (".webp", []), (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101]), (".tiff", []), (".pgm", []), (".ppm", []),
    (".pbm", []), (".pam", []),
])
@pytest.mark.parametrize("size", [(37, 53), (480, 2), (2, 300)])
def test_image_size_reads_the_header_of_every_format_the_folder_takes(tmp_path, ext, params, size):
    image = np.random.default_rng(0).integers(0, 255, (*size, 3), np.uint8)
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), image[:, :, 0] if ext in (".pgm", ".pbm") else image, params)
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert sources.image_size(path) == (decoded.shape[1], decoded.shape[0]) == (size[1], size[0])


def test_image_size_agrees_with_opencv_on_the_fixture_photos():
    paths = [p for p in FIXTURES.iterdir() if p.suffix.lower() in sources.IMAGE_SUFFIXES][:40]
    assert paths
    for p in paths:
        im = cv2.imread(str(p), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
        assert sources.image_size(p) == (im.shape[1], im.shape[0]), p
