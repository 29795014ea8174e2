"""Training steps with and without train.train.keep_freed_memory, in bfloat16, and compiled, measured in the same run.

    python benchmarks/bench_train_step.py [--steps 8] [--rounds 2]

glibc's malloc settings are per process, so each side runs in its own
subprocess: a binary Detector (widths 64, 64, 128, 256, 256) on a synthetic
batch, 1 torch thread. The sides alternate (default, kept, bf16, default...)
so drift in the machine's load hits all of them. "bf16" is "kept" with the
forward under bfloat16 autocast (train.precision = "bf16"); its speed-up is
against "kept". "compiled" is "bf16" through torch.compile (train.compile,
`--set train.compile=true`); its speed-up is against "bf16", and its compile time (the
first round's two warm-up steps, less bf16's) is reported apart. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("default", "kept", "bf16", "compiled")

_PROBE = """
import json, resource, sys, time
import numpy as np, torch
from train.train import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] != "default" else False
torch.manual_seed(0)
torch.set_num_threads(1)
from train.loss import YoloLoss
from train.model import Detector, ModelConfig
m = Detector(ModelConfig(widths=(64, 64, 128, 256, 256), binary=True), 1)
crit = YoloLoss(np.array([[3, 11], [20, 33], [50, 96]], np.float32), m.stride, 1, 0.15, 1.0, 0.05)
opt = torch.optim.AdamW(m.parameters(), 1e-3)
fwd = torch.compile(m) if sys.argv[1] == "compiled" else m
x = torch.rand(16, 1, 192, 192) * 255
tg = torch.tensor([[0, 0, 50, 50, 90, 150], [3, 0, 10, 10, 40, 80]], dtype=torch.float32)
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=sys.argv[1] in ("bf16", "compiled")):
        head = fwd(x)
    loss, _ = crit(head.float(), tg)
    opt.zero_grad()
    loss.backward()
    opt.step()
t0 = time.perf_counter()
step(); step()
warm = time.perf_counter() - t0
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(int(sys.argv[2])):
    step()
r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
print(json.dumps({"kept": kept, "warmup_s": warm, "wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime,
                  "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt}))
"""


def run(side: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, side, str(steps)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    sums = {side: {"warmup_s": 0.0, "wall_s": 0.0, "user_s": 0.0, "sys_s": 0.0, "minor_faults": 0} for side in SIDES}
    applied = True
    first = {}  # the first round's warm-up: later rounds may find the compiled code in inductor's on-disk cache
    for _ in range(args.rounds):
        for side in SIDES:
            r = run(side, args.steps)
            first.setdefault(side, r["warmup_s"])
            applied &= r["kept"] if side != "default" else True
            for k in sums[side]:
                sums[side][k] += r[k]
            print(f"{side:8s} wall {r['wall_s']:.2f} s  user {r['user_s']:.2f} s  sys {r['sys_s']:.2f} s  "
                  f"minor faults {r['minor_faults']}")
    d, k, b, c = sums["default"], sums["kept"], sums["bf16"], sums["compiled"]
    cpu = lambda s: s["user_s"] + s["sys_s"]  # noqa: E731
    result = {"steps": args.steps * args.rounds, "mallopt_applied": bool(applied),
              "default": d, "kept": k, "bf16": b, "compiled": c,
              "wall_speedup": d["wall_s"] / k["wall_s"], "cpu_speedup": cpu(d) / cpu(k),
              "bf16_wall_speedup": k["wall_s"] / b["wall_s"], "compiled_wall_speedup": b["wall_s"] / c["wall_s"],
              "compile_s": first["compiled"] - first["bf16"]}
    print(f"kept freed memory: wall x{result['wall_speedup']:.2f}, CPU time x{result['cpu_speedup']:.2f}")
    print(f"bf16 forwards (both kept): wall x{result['bf16_wall_speedup']:.2f}")
    print(f"compiled bf16 against eager bf16: wall x{result['compiled_wall_speedup']:.2f}, "
          f"after {result['compile_s']:.0f} s of compiling")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
