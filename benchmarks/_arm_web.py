"""Guest side of benchmarks/web_cost.py (runs under armcost, aarch64): what the web preview costs.

Regions: 40 the pipeline's hand-over (``WebPreview.show``) with nobody watching, 41 the same with one
viewer (it also wakes the encoder), 42 the encoder thread's work for one frame (overlay drawn on a
320x240 demo frame with one box, the HUD and a track id, JPEG at the default quality 70), 43 one
stream handler turn (the newest JPEG taken and written as a multipart part to a socket). No server
thread runs: the calls are made on one thread, so that the counts are not mixed.
"""

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from armcost import start, stop  # noqa: E402

from app import overlay  # noqa: E402
from app.config import WebConfig  # noqa: E402
from app.sources import DemoSource, Frame  # noqa: E402
from app.web import BOUNDARY, WebPreview  # noqa: E402

N = 50
src = DemoSource(320, 240, fps=0)
src.open()
frames = [Frame(src.read(), i, float(i)) for i in range(N + 5)]
src.close()
det = np.array([[100, 40, 180, 230, 0.87, 0]], np.float32)
hud = overlay.Hud(7.9, 118.2, 17)
marks = overlay.Marks(np.array([3]), (), ())
web = WebPreview(WebConfig(enabled=True), ["person"])

for f in frames[:3]:  # warm: imports, caches
    web.show(f, None, det, hud, marks)
    web.encode((f, det, hud, marks))

for i in range(N):
    start(40)
    web.show(frames[i], None, det, hud, marks)
    stop(40)

web._viewers = 1  # one viewer joined (as WebPreview.joined does, without a server)
for i in range(N):
    start(41)
    web.show(frames[i], None, det, hud, marks)
    stop(41)

jpegs = []
for i in range(N):
    item = (frames[i], det, hud, marks)
    start(42)
    jpegs.append(web.encode(item))
    stop(42)

a, b = socket.socketpair()
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
writer = a.makefile("wb", buffering=0)
web._jpeg, web._jpeg_seq = jpegs[0], 1
sizes = []
for i in range(N):
    web._jpeg, web._jpeg_seq = jpegs[i], i + 1
    start(43)
    jpeg, seq = web.next_jpeg(i, timeout=0)
    writer.write(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                 + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n")
    stop(43)
    got = 0
    while got < len(jpeg):
        got += len(b.recv(1 << 20))
    sizes.append(len(jpeg))
print(f'{{"jpeg_bytes_mean": {sum(sizes) / len(sizes):.0f}}}')
