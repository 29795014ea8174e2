"""aarch64 instructions per detect() (and per stage) vs the float cv2.dnn twin, and per tracker update, under the armcost meter.

    python benchmarks/bench_arm.py [--model FILE] [--tracker-only]

Runs benchmarks/_arm_detect.py in the emulated Cortex-A53 (armcost), one
metered detect() after warm-up calls outside the regions, on the 320x240
bench frame and on the Pi's frame (the lores stream at the network's size);
then benchmarks/_arm_threads.py: the instructions each of 1, 2 and 4 threads
runs in one detect() of the Pi's frame, the critical path and the estimated
fps, and detect() on real numba threads (bit-identical outputs); then
benchmarks/_arm_track.py: ``Tracker.update`` per frame with 0, 5 and 20
people in view. The last line is one JSON object. Exits 0 with a message when
../shared/tools/armcost is absent.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("preprocess", "stem", "body", "head", "decode")


def armcost_path() -> Path:
    shared = Path(os.environ["XNORCAM_SHARED"]) if os.environ.get("XNORCAM_SHARED") else ROOT / ".." / "shared"
    return (shared / "tools" / "armcost" / "armcost").resolve()


def run_guest(tool: Path, guest: Path, extra: list[str], env: dict | None = None) -> tuple[dict, str] | None:
    """The meter's JSON result and the guest's stdout, or None (said on stderr) when the run failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "armcost.json"
        proc = subprocess.run([str(tool), "run", "--json", str(out), "--quiet", str(guest), *extra],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
        if proc.returncode != 0 or not out.exists():
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            print(f"armcost run failed (exit {proc.returncode})", file=sys.stderr)
            return None
        result = json.loads(out.read_text())
    if result.get("exit_code", 0) != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        print(f"guest script failed (exit {result.get('exit_code')})", file=sys.stderr)
        return None
    return result, proc.stdout


def net_of(result: dict, region: int) -> int:
    r = result["regions"][str(region)]
    return int(r.get("net_instructions", r["instructions"]))


def tracker_figures(tool: Path) -> dict | None:
    """Instructions per Tracker.update with 0, 5 and 20 people (benchmarks/_arm_track.py)."""
    got = run_guest(tool, ROOT / "benchmarks" / "_arm_track.py", [])
    if got is None:
        return None
    result, stdout = got
    scenes = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"people"')]
    per = {}
    for region, scene in zip((20, 21, 22), scenes, strict=True):
        r = result["regions"][str(region)]
        per[str(scene["people"])] = round(net_of(result, region) / r["entries"])
        print(f"tracker, {scene['people']:2d} people: {per[str(scene['people'])] / 1e3:.0f} k aarch64 instructions/frame "
              f"(Pi Zero 2 W estimate {r.get('est_ms_per_entry', {})} ms; {scene['live_tracks']} live tracks)")
    return per


IPCS = (0.42, 0.64)  # the meter's range for numba's NEON code on the Pi's Cortex-A53 (its README)


def fps(instructions: float) -> list[float]:
    """Frames a second on one 1 GHz A53 core for a critical path of that many instructions, per IPC in IPCS."""
    return [round(ipc * 1e9 / instructions, 1) for ipc in IPCS]


def thread_report(tool: Path, extra: list[str]) -> dict | None:
    """benchmarks/_arm_threads.py under the meter with 4 numba threads: per-thread and critical-path figures."""
    from app.bench import thread_figures

    got = run_guest(tool, ROOT / "benchmarks" / "_arm_threads.py", extra, env={"ARMCOST_NUMBA_NUM_THREADS": "4"})
    if got is None:
        return None
    result, stdout = got
    info = json.loads([line for line in stdout.splitlines() if line.startswith('{"model"')][-1])
    figs = thread_figures(info["raw"], lambda rid: net_of(result, rid))
    print(f"threads on the Pi's frame ({info['frame']}): aarch64 instructions per thread in one detect(); "
          f"critical path = the one-thread parts ({figs['one_thread_parts'] / 1e6:.2f} M) + each split call's "
          f"slowest thread")
    report = {"one_thread_parts": figs["one_thread_parts"], "detect": figs["detect"]}
    for T in info["raw"]["work"]:
        f = figs[T]
        lo, hi = fps(f["critical_path"])
        line = (f"  {T} thread{'s' if T != '1' else ' '}: per thread " + " ".join(f"{v / 1e6:.2f}" for v in f["per_thread"])
                + f" M; critical path {f['critical_path'] / 1e6:.2f} M -> {lo:.0f}-{hi:.0f} fps")
        entry = {"per_thread": f["per_thread"], "critical_path": f["critical_path"], "est_fps": [lo, hi]}
        real = info["real"].get(T)
        if real:
            total = net_of(result, real["region"])
            entry.update(real_threads_total=total, sync_overhead=total - sum(f["per_thread"]),
                         identical=real["identical"])
            line += (f"; on {T} real threads {total / 1e6:.2f} M in all ({(total - sum(f['per_thread'])) / 1e3:+.0f} k "
                     f"for the {info['layer']} pool), output {'bit-identical' if real['identical'] else 'DIFFERENT'}")
        print(line)
        report[T] = entry
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model file (default: models/person.xnc, else a random model)")
    ap.add_argument("--tracker-only", action="store_true", help="meter only the tracker")
    args = ap.parse_args(argv)
    tool = armcost_path()
    if not tool.exists():
        print(f"SKIP: the ARM meter is absent ({tool}); nothing measured")
        return 0
    if args.tracker_only:
        per = tracker_figures(tool)
        if per is None:
            return 1
        print(json.dumps({"tracker_instructions_per_frame": per}))
        return 0
    guest = ROOT / "benchmarks" / "_arm_detect.py"
    extra = [str(Path(args.model).resolve())] if args.model else []
    got = run_guest(tool, guest, extra)
    if got is None:
        return 1
    result, stdout = got
    info = {}
    for line in stdout.splitlines():
        if line.startswith("{") and '"model"' in line:
            info = json.loads(line)
    regs = result["regions"]

    def net(k):
        r = regs[str(k)]
        return int(r.get("net_instructions", r["instructions"]))

    total, flt, pi_total = net(1), net(7), net(11)
    stages = {s: net(2 + i) for i, s in enumerate(STAGES)}
    pi_stages = {s: net(12 + i) for i, s in enumerate(STAGES)}
    ms = regs["1"].get("est_ms_per_entry", {})
    print(f"model: {info.get('model', '?')}; frame: {info.get('frame', '?')}")
    print(f"detect(): {total / 1e6:.2f} M aarch64 instructions/frame  (Pi Zero 2 W estimate {ms} ms)")
    print("stages (M instr): " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in stages.items()))
    print(f"detect() of the Pi's frame ({info.get('pi_frame', '?')}, the lores stream at the network's size): "
          f"{pi_total / 1e6:.2f} M  (Pi Zero 2 W estimate {regs['11'].get('est_ms_per_entry', {})} ms)")
    print("stages (M instr): " + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in pi_stages.items()))
    print(f"float cv2.dnn twin: {flt / 1e6:.2f} M instructions/frame  (x{flt / total:.1f} of detect)")
    print(f"peak RSS of the metered detector (emulator included): {info.get('peak_rss_mib')} MiB")
    threads = thread_report(tool, extra)
    if threads is None:
        return 1
    tracker = tracker_figures(tool)
    if tracker is None:
        return 1
    print(json.dumps({
        "aarch64_instructions_per_frame": total,
        "aarch64_float_instructions_per_frame": flt,
        "float_over_binary": round(flt / total, 2),
        "stages": stages,
        "pi_frame_instructions_per_frame": pi_total,
        "pi_frame_stages": pi_stages,
        "threads": threads,
        "est_ms_per_frame": ms,
        "model": info.get("model"),
        # The metered guest's peak resident memory after the warm-up and three frames (no float twin yet),
        # counted for the emulator's process: the guest's memory and the emulator's own.
        "emulated_peak_rss_mib": info.get("peak_rss_mib"),
        "tracker_instructions_per_frame": tracker,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
