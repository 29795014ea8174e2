"""What the web preview costs on the Pi Zero 2 W: aarch64 instructions per frame under the meter
(../shared/tools/armcost), with nobody watching and with one viewer, and the memory (RSS) it adds.

    python benchmarks/web_cost.py [--no-rss | --no-meter]

The meter's part runs benchmarks/_arm_web.py in the emulated Cortex-A53 (skipped, saying so, when the
meter is absent). The RSS part runs ``python -m app --source demo`` here three times, for 20 s each:
without the web preview, with it and nobody watching, with it and one viewer reading the stream, and
reads VmRSS (and its anonymous and file-backed parts) at the end. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_arm import armcost_path, net_of, run_guest  # noqa: E402

LABELS = {
    40: "hand-over to the web preview, nobody watching (pipeline thread, per frame)",
    41: "hand-over with one viewer (pipeline thread, per frame)",
    42: "encoder thread: overlay + JPEG of one 320x240 frame",
    43: "stream handler: one frame written to the viewer's socket",
}


def meter() -> dict | None:
    tool = armcost_path()
    if not tool.exists():
        print(f"web_cost: meter SKIPPED: not at {tool}")
        return None
    got = run_guest(tool, ROOT / "benchmarks" / "_arm_web.py", [])
    if got is None:
        return None
    result, stdout = got
    per = {}
    for region, label in LABELS.items():
        r = result["regions"][str(region)]
        per[region] = round(net_of(result, region) / r["entries"])
        print(f"{region}  {label}: {per[region] / 1e3:.1f} k instructions (Pi Zero 2 W {r.get('est_ms_per_entry')} ms)")
    viewer = per[41] + per[42] + per[43]
    print(f"per frame: {per[40] / 1e3:.1f} k instructions with 0 viewers; with 1 viewer {viewer / 1e3:.0f} k "
          f"for each frame the stream sends (web.fps a second at most), {per[41] / 1e3:.1f} k for the others "
          f"(a detect() is about 30 M)")
    return {"instructions": {str(k): v for k, v in per.items()}, "per_frame_0_viewers": per[40],
            "per_sent_frame_1_viewer": viewer, "guest": stdout.strip().splitlines()[-1:]}


def rss_of(args: list[str], viewer: bool, seconds: float = 20.0) -> tuple[float, float, float]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--source", "demo", "--preview", "none", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    if args:
        for line in proc.stderr:
            m = re.search(r"web preview: http://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()
    stop = threading.Event()

    def watch() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
            while not stop.is_set() and s.recv(65536):
                pass

    if viewer:
        threading.Thread(target=watch, daemon=True).start()
    time.sleep(seconds)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    stop.set()
    proc.terminate()
    proc.wait(timeout=30)
    def kb(key: str) -> float:
        return int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024

    return kb("VmRSS"), kb("RssAnon"), kb("RssFile")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-rss", action="store_true", help="only the meter")
    ap.add_argument("--no-meter", action="store_true", help="only the RSS")
    args = ap.parse_args()
    out: dict = {"meter": None if args.no_meter else meter()}
    if not args.no_rss:
        web = ["--web", "127.0.0.1:0"]
        rss = {"off": rss_of([], False), "on_0_viewers": rss_of(web, False), "on_1_viewer": rss_of(web, True)}
        for k, (total, anon, file) in rss.items():
            print(f"RSS {k}: {total:.1f} MiB ({anon:.1f} anonymous, {file:.1f} mapped files: code and libraries)")
        for k, what in (("on_0_viewers", "with nobody watching"), ("on_1_viewer", "with one viewer")):
            added = [a - b for a, b in zip(rss[k], rss["off"], strict=True)]
            print(f"RSS added {what}: {added[0]:+.1f} MiB ({added[1]:+.1f} anonymous, {added[2]:+.1f} mapped files)")
        out["rss_mib"] = {k: [round(x, 1) for x in v] for k, v in rss.items()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
