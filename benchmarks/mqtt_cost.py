"""What MQTT costs on the Pi Zero 2 W, under the aarch64 meter (../shared/tools/armcost).

    python benchmarks/mqtt_cost.py

Runs benchmarks/_arm_mqtt.py in the emulated Cortex-A53, with a mosquitto broker on 127.0.0.1 for the
MQTT thread's share when mosquitto is installed, and prints per frame and per event the aarch64
instructions MQTT adds and the meter's Pi Zero 2 W estimate. The last line is one JSON object.
Skips (exit 0, saying so) when the meter is absent.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_arm import armcost_path, net_of, run_guest  # noqa: E402
from tests.mosquitto import MOSQUITTO, Broker  # noqa: E402

LABELS = {
    30: "frame line to the log alone (baseline)",
    31: "frame line with MQTT, tracks on",
    32: "frame line with MQTT, tracks off (counts from boxes)",
    33: "one event (enter/leave) queued",
    34: "MQTT thread: one event from the queue to the socket",
    35: "MQTT thread: one idle turn (every 50 ms)",
}


def main() -> int:
    tool = armcost_path()
    if not tool.exists():
        print(f"mqtt_cost: SKIPPED: the meter is not at {tool}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if MOSQUITTO:
            with Broker(Path(tmp)) as broker:
                got = run_guest(tool, ROOT / "benchmarks" / "_arm_mqtt.py", [str(broker.port)])
        else:
            print("mosquitto is not installed: the MQTT thread's share is not metered")
            got = run_guest(tool, ROOT / "benchmarks" / "_arm_mqtt.py", [])
    if got is None:
        return 1
    result, _ = got
    per = {}
    for region, label in LABELS.items():
        r = result["regions"].get(str(region))
        if r is None:
            continue
        per[region] = round(net_of(result, region) / r["entries"])
        print(f"{region}  {label}: {per[region] / 1e3:.1f} k instructions (Pi Zero 2 W {r.get('est_ms_per_entry')} ms)")
    added = {"tracks_on": per[31] - per[30], "tracks_off": per[32] - per[30]}
    print(f"added per frame: {added['tracks_on'] / 1e3:.1f} k instructions with tracks, "
          f"{added['tracks_off'] / 1e3:.1f} k without (a detect() is about 30 M)")
    print(json.dumps({"instructions": {str(k): v for k, v in per.items()}, "added_per_frame": added}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
