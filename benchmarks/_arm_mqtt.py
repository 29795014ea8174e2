"""Guest side of benchmarks/mqtt_cost.py (runs under armcost, aarch64): what MQTT adds to the pipeline's frame.

Regions, per entry:
  30  a frame line handed to the log alone (NullLog.write): the baseline
  31  the same through MqttTee with tracks on (the status numbers)
  32  the same with tracks off (per-class counts from the line; a change every 10th frame)
  33  an enter event through MqttTee (JSON, count, presence, the outbox)
  34  with a broker port as argv[1]: the MQTT thread's work for one event, from the outbox to the socket
  35  the same: one turn of the MQTT thread's loop with nothing to send (it turns every 50 ms)
The publisher's thread is not started for 30-33: the pipeline's share is metered alone. paho is pure
Python; the guest takes it from the project's .venv after its own packages.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path += [str(p) for p in sorted((ROOT / ".venv" / "lib").glob("python3*/site-packages"))]

import numpy as np  # noqa: E402
from armcost import start, stop  # noqa: E402

from app.config import MqttConfig  # noqa: E402
from app.mqtt import MqttPublisher  # noqa: E402
from app.sinks import NullLog, frame_record  # noqa: E402
from app.sources import Frame  # noqa: E402

WARM, METERED = 100, 300
CLASSES = ["person"]


def records(n: int) -> list[dict]:
    px = np.zeros((240, 320), np.uint8)
    out = []
    for i in range(n):
        people = 2 if (i // 10) % 2 else 1
        dets = np.asarray([[10 + 40 * k, 20, 50 + 40 * k, 200, 0.8, 0] for k in range(people)], np.float32)
        rec = frame_record(Frame(px, i, 100.0 + i / 10), dets, CLASSES, 9.5, 120.0, 3)
        rec["detect_ms"] = 110.0
        out.append(rec)
    return out


def publisher(tracks: bool, port: int = 1883) -> MqttPublisher:
    cfg = MqttConfig(enabled=True, host="127.0.0.1", port=port, client_id="armcost", topic_prefix="armcost/cam")
    return MqttPublisher(cfg, CLASSES, tracks=tracks)


recs = records(WARM + METERED)
base = NullLog()
tee_on = publisher(True).tee(NullLog())
tee_off = publisher(False).tee(NullLog())
for region, sink in ((30, base), (31, tee_on), (32, tee_off)):
    for rec in recs[:WARM]:
        sink.write(rec)
    for rec in recs[WARM:]:
        start(region)
        sink.write(rec)
        stop(region)

enter = {"event": "enter", "mono_ms": 100000.0, "track": 7, "label": "person", "first_seen": "2026-12-04T17:11:09.113Z",
         "last_seen": "2026-12-04T17:11:09.513Z", "score": 0.8797, "box": [283.6, 15.3, 317.9, 185.5]}
leave = dict(enter, event="leave", duration_s=5.7, reason="lost")
for i in range(WARM + METERED):
    if i >= WARM:
        start(33)
    tee_on.event(enter if i % 2 == 0 else leave)
    if i >= WARM:
        stop(33)

if len(sys.argv) > 1:  # the MQTT thread's side, against a real broker
    pub = publisher(True, int(sys.argv[1]))
    c = pub._client
    c.connect("127.0.0.1", int(sys.argv[1]), 60)
    while not c.is_connected():
        c.loop(0.05)
    tee = pub.tee(NullLog())
    for i in range(WARM + METERED):
        tee.event(enter)
        if i >= WARM:
            start(34)
        pub._pump()
        c.loop(0.0)
        if i >= WARM:
            stop(34)
        while pub._inflight:
            c.loop(0.01)
    for i in range(WARM + METERED):
        if i >= WARM:
            start(35)
        pub._tick()
        pub._pump()
        c.loop(0.0)
        if i >= WARM:
            stop(35)
    c.disconnect()
    print(json.dumps({"published": pub.published}))
print(json.dumps({"frames": METERED, "events": METERED}))
