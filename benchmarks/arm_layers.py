"""Guest script: aarch64 instructions per body call of the shipped network, under the ARM meter.

    ../shared/tools/armcost/armcost run --json OUT.json benchmarks/arm_layers.py [I,J]

With ``I,J`` the named layers of models/person.xnc are made ternary (stems and bits bconvs get a
second, made-up threshold row two steps from the first; rbconvs a band of 0.5), so the price of
ternary activations can be read per layer before a model is trained. Regions: 1 the stem, 3 the
whole body, 2 the head, 10+i the i-th body call (``Network._calls``). Run it once without ``I,J``
for the reference: the counts are deterministic, so two runs compare.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from armcost import start, stop  # noqa: E402

from app.modelfile import Layer, read_model  # noqa: E402
from app.network import Network  # noqa: E402

tern = [int(v) for v in sys.argv[1].split(",")] if len(sys.argv) > 1 and sys.argv[1] else []
model = read_model(str(ROOT / "models" / "person.xnc"))
layers = list(model.layers)
for i in tern:
    ly = layers[i]
    if ly.op == "rbconv":
        layers[i] = Layer(ly.op, {**ly.params, "input": "ternary", "band": 0.5}, ly.tensors)
        continue
    t, f = ly.tensors["threshold"], ly.tensors["flip"]
    if t.ndim == 2:  # already ternary
        continue
    thr = np.where(f == 1, np.stack([t + 2, t - 2]), np.stack([t - 2, t + 2])).astype(np.int32)
    layers[i] = Layer(ly.op, {**ly.params, "output": "ternary"}, {**ly.tensors, "threshold": thr, "flip": np.stack([f, f])})
model = replace(model, layers=tuple(layers))
net = Network(model)
x = np.random.default_rng(0).integers(0, 256, (model.input_height, model.input_width, model.channels), dtype=np.uint8)
net.forward(x)
net.forward(x)
start(1)
net.stem(x)
stop(1)
start(3)
net.body()
stop(3)
for i, (fn, args) in enumerate(net._calls):
    start(10 + i)
    fn(*args)
    stop(10 + i)
start(2)
net.head()
stop(2)
print(json.dumps({"ternary": tern, "calls": [getattr(fn, "__name__", str(fn)) for fn, _ in net._calls]}))
