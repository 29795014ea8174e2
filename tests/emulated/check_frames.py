"""Check the frame lines of the emulated arm64 run against the same run on this machine.

    python tests/emulated/check_frames.py ARM.jsonl HOST.jsonl IMAGES FRAMES

Both runs read the same images: folder in a loop, so a frame's image is its
sequence number modulo the folder's count; the network is integer arithmetic
between two resizes, so the same image must give the same people in the same
places on both machines (score and box within what OpenCV's resize may move
between its versions). Exit 1 naming the first difference.
"""

from __future__ import annotations

import json
import sys

BOX_TOLERANCE_PX = 3.0
SCORE_TOLERANCE = 0.03


def frame_lines(path: str) -> list[dict]:
    lines = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{n}: not JSON ({e}): {text[:80]!r}")
            if "seq" in line and "detections" in line:
                lines.append(line)
    return lines


def check(arm_path: str, host_path: str, images: int, frames: int) -> str:
    arm, host = frame_lines(arm_path), frame_lines(host_path)
    if len(arm) != frames:
        sys.exit(f"{arm_path}: {len(arm)} frame lines, expected {frames}")
    by_image = {line["seq"] % images: line["detections"] for line in host}
    seqs = [line["seq"] for line in arm]
    if seqs != sorted(set(seqs)):
        sys.exit(f"{arm_path}: sequence numbers not increasing: {seqs}")
    compared = people = 0
    for line in arm:
        if line.get("v") != 1 or line["width"] <= 0 or line["height"] <= 0:
            sys.exit(f"{arm_path}: seq {line['seq']}: bad frame line {line}")
        want = by_image.get(line["seq"] % images)
        if want is None:
            continue
        got = line["detections"]
        if len(got) != len(want):
            sys.exit(f"seq {line['seq']}: {len(got)} detections on arm64, {len(want)} here: {got} vs {want}")
        for g, w in zip(sorted(got, key=lambda d: d["box"]), sorted(want, key=lambda d: d["box"]), strict=True):
            far = max(abs(a - b) for a, b in zip(g["box"], w["box"], strict=True))
            if g["label"] != w["label"] or abs(g["score"] - w["score"]) > SCORE_TOLERANCE or far > BOX_TOLERANCE_PX:
                sys.exit(f"seq {line['seq']}: arm64 found {g}, here {w}")
        compared += 1
        people += len(got)
    if compared == 0 or people == 0:
        sys.exit(f"nothing compared: {compared} frames matched an image of this machine's run, {people} people")
    return f"{len(arm)} frame lines; {compared} compared with this machine's run of the same images, {people} people alike"


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    print(check(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
