"""detect() on hostile frames returns a valid (N,6) float32 array or raises the documented ValueError; it never
crashes the process or hangs. The fixed cases run in a child process so that a crash is reported as a failure
naming the case instead of taking pytest down."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.support import FUZZ_COUNTS, FUZZ_EXAMPLES, ROOT

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    from app.detector import Detector

    det = Detector({model!r})
    det.warmup()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ro = noise.copy()
    ro.flags.writeable = False
    CASES = {{
        "zeros": lambda: np.zeros((240, 320), np.uint8),
        "zeros-bgr": lambda: np.zeros((240, 320, 3), np.uint8),
        "all-255": lambda: np.full((240, 320), 255, np.uint8),
        "all-255-bgr": lambda: np.full((240, 320, 3), 255, np.uint8),
        "1x1": lambda: np.zeros((1, 1), np.uint8),
        "1x1x3": lambda: np.full((1, 1, 3), 200, np.uint8),
        "1x8000": lambda: np.full((1, 8000), 90, np.uint8),
        "8000x1": lambda: np.full((8000, 1, 3), 90, np.uint8),
        "8000x8000": lambda: np.full((8000, 8000), 77, np.uint8),
        "8000x8000x3": lambda: np.full((8000, 8000, 3), 77, np.uint8),
        "strided": lambda: noise[::3, ::2],
        "negative-strides": lambda: noise[::-1, ::-1],
        "transposed": lambda: noise.transpose(1, 0, 2),
        "channel-view": lambda: noise[:, :, 1],
        "fortran": lambda: np.asfortranarray(noise),
        "read-only": lambda: ro,
        "noise": lambda: noise,
        "float32": lambda: noise.astype(np.float32),
        "float64-nan": lambda: np.full((240, 320), np.nan),
        "float16": lambda: np.zeros((240, 320), np.float16),
        "int16": lambda: noise.astype(np.int16),
        "uint16": lambda: noise.astype(np.uint16) * 256,
        "bool": lambda: noise > 128,
        "4-channels": lambda: np.zeros((240, 320, 4), np.uint8),
        "2-channels": lambda: np.zeros((240, 320, 2), np.uint8),
        "1-channel": lambda: np.zeros((240, 320, 1), np.uint8),
        "0x0": lambda: np.zeros((0, 0), np.uint8),
        "0-rows": lambda: np.zeros((0, 320), np.uint8),
        "0-cols-bgr": lambda: np.zeros((240, 0, 3), np.uint8),
        "0-channels": lambda: np.zeros((240, 320, 0), np.uint8),
        "1-d": lambda: np.zeros(320, np.uint8),
        "4-d": lambda: np.zeros((1, 240, 320, 3), np.uint8),
        "scalar": lambda: np.uint8(7),
        "list": lambda: [[0, 1], [2, 3]],
        "none": lambda: None,
    }}
    for name, make in CASES.items():
        image = make()
        print(json.dumps({{"start": name}}), flush=True)
        t = time.perf_counter()
        try:
            out = det.detect(image)
        except ValueError as exc:
            result = {{"outcome": "ValueError", "message": str(exc)}}
        except Exception as exc:
            result = {{"outcome": "other", "message": f"{{type(exc).__name__}}: {{exc}}"}}
        else:
            h, w = np.shape(image)[:2]
            ok = (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == 6
                  and bool(np.all(np.isfinite(out))))
            if ok and len(out):
                ok = bool(np.all(out[:, 0] >= 0) and np.all(out[:, 1] >= 0) and np.all(out[:, 2] <= w)
                          and np.all(out[:, 3] <= h) and np.all(out[:, 0] <= out[:, 2]) and np.all(out[:, 1] <= out[:, 3])
                          and np.all((out[:, 4] >= 0) & (out[:, 4] <= 1)) and np.all(np.diff(out[:, 4]) <= 0)
                          and np.all(np.isin(out[:, 5], np.arange(len(det.class_names)))))
            result = {{"outcome": "array" if ok else "invalid array", "n": int(len(out)) if ok else -1}}
        result.update(case=name, s=round(time.perf_counter() - t, 3))
        print(json.dumps(result), flush=True)
    """
)

MUST_REFUSE = {"float32", "float64-nan", "float16", "int16", "uint16", "bool", "4-channels", "2-channels", "0x0",
               "0-rows", "0-cols-bgr", "0-channels", "1-d", "4-d", "scalar", "list", "none"}


def test_hostile_frames_give_detections_or_value_error(model_path, tmp_path):
    script = tmp_path / "adversarial.py"
    script.write_text(CHILD.format(root=str(ROOT), model=str(model_path)))
    try:
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        started = [json.loads(x) for x in (exc.stdout or b"").decode().splitlines() if x.startswith("{")]
        pytest.fail(f"detect() hung; last case started: {started[-1] if started else None}")
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    results = {x["case"]: x for x in lines if "case" in x}
    started = [x["start"] for x in lines if "start" in x]
    assert r.returncode == 0, f"the child died ({r.returncode}) in case {started[-1] if started else None}: {r.stderr[-2000:]}"
    assert len(results) == len(started) == 35
    bad = {k: v for k, v in results.items() if v["outcome"] not in ("array", "ValueError")}
    assert not bad, bad
    for name in MUST_REFUSE:
        assert results[name]["outcome"] == "ValueError", (name, results[name])
        assert "expected" in results[name]["message"]  # the message says what is wanted
    for name in ("zeros", "all-255", "1x1", "8000x8000x3", "strided", "negative-strides", "fortran", "read-only",
                 "1-channel"):
        assert results[name]["outcome"] == "array", (name, results[name])
    assert max(v["s"] for v in results.values()) < 30


FRAME_DTYPES = st.sampled_from([np.uint8] * 6 + [np.int8, np.uint16, np.float32, np.float64, np.bool_])


@st.composite
def frames(draw):
    h, w = draw(st.integers(0, 70)), draw(st.integers(0, 70))
    channels = draw(st.sampled_from([None, None, 3, 3, 1, 4, 2, 0]))
    shape = (h, w) if channels is None else (h, w, channels)
    dtype = draw(FRAME_DTYPES)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["noise", "const", "blocks"]))
    if kind == "const":
        image = np.full(shape, draw(st.integers(0, 255)), dtype=np.uint8).astype(dtype)
    elif kind == "noise":
        image = rng.integers(0, 256, shape).astype(dtype)
    else:
        image = (rng.integers(0, 2, shape) * 255).astype(dtype)
    if image.ndim >= 2 and draw(st.booleans()):
        image = image[:: draw(st.sampled_from([1, 2, -1, -3])), :: draw(st.sampled_from([1, 2, -1]))]
    return image


@pytest.mark.fuzz
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=frames())
def test_detect_on_random_frames_returns_valid_detections_or_value_error(detector, image):
    counts = FUZZ_COUNTS["detect"]
    counts["total"] += 1
    try:
        out = detector.detect(image)
    except ValueError as exc:
        assert "expected" in str(exc)
        counts["ValueError"] += 1
        return
    counts["detections"] += 1
    assert image.dtype == np.uint8 and image.size > 0  # nothing else may be accepted
    assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == 6 and np.all(np.isfinite(out))
    h, w = image.shape[:2]
    if len(out):
        assert np.all(out[:, :2] >= 0) and np.all(out[:, 2] <= w) and np.all(out[:, 3] <= h)
        assert np.all(np.diff(out[:, 4]) <= 0)
