"""A test clip from real stills: a camera panning along a strip of photos, as the demo source pans.

The stills in ``tests/fixtures/clip/`` (``NN_name.jpg``, in strip order, all
240 px tall; ``NN_name.txt`` the YOLO labels of those with people) are laid
side by side; a 320x240 window slides along the strip from left to right, so
people come into view at its right edge and leave at its left edge. The pan
runs at ``FPS`` frames a second and ``SPEED`` pixels a frame, slower (``SLOW``)
while the window's middle is over the photo named in ``SLOW_OVER``, so that the
people's durations differ. ``labelled_people`` says, from the labels, when each
person is in view: from the first frame their box's middle is inside the
window to the last.

``pan`` does the same over any list of images (``benchmarks/false_events.py``
pans over person-free photos).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

CLIP = Path(__file__).resolve().parent / "fixtures" / "clip"
WIDTH, HEIGHT = 320, 240
FPS = 10.0
SPEED, SLOW = 10, 5  # pixels per frame
SLOW_OVER = "02_capston2_a95a7a2ba2"


@dataclass(frozen=True)
class Person:
    still: str
    x: float  # the box's middle, in strip pixels
    enter_s: float
    leave_s: float

    @property
    def duration_s(self) -> float:
        return self.leave_s - self.enter_s


def to_height(img: np.ndarray, height: int = HEIGHT) -> np.ndarray:
    h, w = img.shape[:2]
    return img if h == height else cv2.resize(img, (max(1, round(w * height / h)), height),
                                              interpolation=cv2.INTER_AREA)


def offsets(strip_width: int, slow: tuple[int, int] = (0, 0)) -> list[int]:
    """The window's left edge on each frame: SPEED a frame, SLOW while its middle is within ``slow``."""
    out, o = [], 0
    while o + WIDTH <= strip_width:
        out.append(o)
        o += SLOW if slow[0] <= o + WIDTH / 2 < slow[1] else SPEED
    return out


def pan(stills: Sequence[np.ndarray], slow: tuple[int, int] = (0, 0)) -> Iterator[tuple[int, np.ndarray]]:
    """(index, 320x240 frame) along a strip of ``stills`` (each made 240 px tall)."""
    strip = np.hstack([to_height(s) for s in stills])
    for i, o in enumerate(offsets(strip.shape[1], slow)):
        yield i, np.ascontiguousarray(strip[:, o:o + WIDTH])


def load(folder: Path = CLIP) -> tuple[list[np.ndarray], list[tuple[str, int, int]], tuple[int, int]]:
    """The stills, (name, x0, width) of each in the strip, and the slow stretch."""
    stills, where, x = [], [], 0
    for path in sorted(folder.glob("*.jpg")):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None or img.shape[0] != HEIGHT:
            raise ValueError(f"{path}: not a {HEIGHT} px tall image")
        stills.append(img)
        where.append((path.stem, x, img.shape[1]))
        x += img.shape[1]
    slow = next(((x0, x0 + w) for name, x0, w in where if name == SLOW_OVER), (0, 0))
    return stills, where, slow


def frames(folder: Path = CLIP) -> Iterator[tuple[int, np.ndarray]]:
    stills, _, slow = load(folder)
    return pan(stills, slow)


def labelled_people(folder: Path = CLIP) -> list[Person]:
    """Every labelled person, with when their box's middle is in view, in the order they come into view."""
    stills, where, slow = load(folder)
    offs = offsets(sum(s.shape[1] for s in stills), slow)
    found = []
    for name, x0, w in where:
        label = folder / f"{name}.txt"
        if not label.exists():
            continue
        for line in label.read_text().splitlines():
            if line.strip():
                x = x0 + float(line.split()[1]) * w
                seen = [i for i, o in enumerate(offs) if o <= x <= o + WIDTH]
                found.append(Person(name, x, seen[0] / FPS, seen[-1] / FPS))
    return sorted(found, key=lambda p: p.enter_s)
