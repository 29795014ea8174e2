"""The xnorcam model file: reader, writer and strict validation (spec: models/FORMAT.md).

Layout: 8-byte magic, uint32 version, uint32 header length, UTF-8 JSON header,
zero padding to a 64-byte boundary, the tensors (raw little-endian, each at a
64-byte aligned offset relative to the start of the data section), then the
32-byte sha256 of every byte before it. numpy alone reads it; nothing is pickled.

Every problem found on load is one ``ModelFormatError`` naming the file and the
exact problem, so a bad file never surfaces as an IndexError deep in a kernel.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.bits import WORD_BITS, n_words
from app.limits import json_too_deep

MAGIC = b"XNORCAM\x00"
VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_DIGEST = 32
MAX_HEADER = 16 * 1024 * 1024
MAX_SIDE = 4096
MAX_CHANNELS = 1 << 16
MAX_LAYERS = 256
# A model file is a few hundred KB; the reader refuses, before reading it, a file larger than this.
MAX_FILE_BYTES = 64 * 1024 * 1024
# Every activation buffer of the network is allocated once, when the model loads (app/network.py). The Pi
# Zero 2 W has 512 MB for the OS, Python, numba and the camera's buffers: the app runs in about 180 MB with
# the shipped model, whose activations take about 5 MB. A model that needs more than this is refused.
MAX_ACTIVATION_BYTES = 64 * 1024 * 1024
DEFAULT_SCORE_THRESHOLD = 0.25
DEFAULT_NMS_IOU = 0.45

# File dtype strings (always little-endian) and the native dtype handed to callers.
_DTYPES = {
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "uint64": np.dtype("<u8"),
    "float32": np.dtype("<f4"),
}


class ModelFormatError(ValueError):
    """A model file (or a model about to be written) is not valid."""


@dataclass(frozen=True)
class Layer:
    op: str
    params: dict
    tensors: dict


@dataclass(frozen=True)
class Model:
    input_width: int
    input_height: int
    channels: int
    class_names: tuple
    anchors: np.ndarray
    layers: tuple
    metadata: dict = field(default_factory=dict)
    score_threshold: float = DEFAULT_SCORE_THRESHOLD
    nms_iou: float = DEFAULT_NMS_IOU

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------- layer specs
def _tensor_specs(layer: Layer) -> dict:
    """Expected dtype and shape of every tensor of a layer whose params are valid."""
    op, p = layer.op, layer.params
    if op == "stem":
        k, o, i = p["kernel"], p["out_ch"], p["in_ch"]
        rule = (2, o) if output_kind(layer) == "ternary" else (o,)
        return {"weight": ("int8", (o, k, k, i)), "threshold": ("int32", rule), "flip": ("uint8", rule)}
    if op == "maxpool2":
        return {}
    if op in ("bconv", "rbconv"):
        # in_ch is the logical channel count even over a ternary input: the weight has one ±1 per channel.
        k, o, i = p["kernel"], p["out_ch"], p["in_ch"]
        spec = {"weight": ("uint64", (o, k, k, n_words(i)))}
        output = output_kind(layer)
        if output in ("bits", "ternary"):
            # A ternary output has one threshold rule per bit plane: row 0 lo, row 1 hi (app/bits.py).
            rule = (2, o) if output == "ternary" else (o,)
            spec.update(threshold=("int32", rule), flip=("uint8", rule))
        else:
            spec.update(scale=("float32", (o,)), bias=("float32", (o,)))
        return spec
    if op == "head":
        return {"weight": ("float32", (p["out_ch"], p["in_ch"])), "bias": ("float32", (p["out_ch"],))}
    raise AssertionError(op)


# Required params: op -> name -> allowed values (a tuple), or None for "an int in 1..MAX_CHANNELS".
_PARAMS = {
    "stem": {"kernel": (1, 3, 5, 7), "stride": (1, 2), "in_ch": None, "out_ch": None},
    "maxpool2": {},
    "bconv": {"kernel": (1, 3), "stride": (1, 2), "in_ch": None, "out_ch": None, "output": ("bits", "real", "ternary")},
    # Bi-Real block on a real stream r: r + scale·y + bias, y the binary conv of sign(r); stride 1, in = out.
    "rbconv": {"kernel": (1, 3), "stride": (1,), "in_ch": None, "out_ch": None},
    "head": {"in_ch": None, "out_ch": None},
}

# Optional params: op -> name -> (allowed values, default when absent), or (_BAND, None) for a float
# in (0, inf). An absent optional param is left absent in Layer.params (files written before it existed
# read back unchanged); code reads a Layer's params with ``param(layer, name)``, the one place that
# knows the defaults. An older reader refuses a file that has one ("unknown params"), which is what
# keeps the format at version 1.
_BAND = "finite float > 0"
_OPTIONAL = {
    # What the stem's threshold rule produces: binary bits, or a ternary activation (2 bit planes).
    "stem": {"output": (("bits", "ternary"), "bits")},
    # The sign of the real stream, or its ternary with the zero band |r| < band (then band is required).
    "rbconv": {"input": (("bits", "ternary"), "bits"), "band": (_BAND, None)},
}


def param(layer: Layer, name: str):
    """A layer's param, with the default of an optional one that the file leaves out (None: no such param)."""
    if name in layer.params:
        return layer.params[name]
    return _OPTIONAL.get(layer.op, {}).get(name, (None, None))[1]


def output_kind(layer: Layer):
    """What a conv layer writes: "bits" or "ternary" (packed), or "real" (a stream; an rbconv always adds
    to its real stream and has no output param). None for a pool (it keeps its input's kind) or the head."""
    return "real" if layer.op == "rbconv" else param(layer, "output")


def check_input(model: Model, x) -> np.ndarray:
    """``x`` if it is the letterboxed uint8 (H, W, C) input ``model`` takes, else a ValueError saying so."""
    want = (model.input_height, model.input_width, model.channels)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.shape != want:
        got = (getattr(x, "dtype", type(x).__name__), getattr(x, "shape", None))
        raise ValueError(f"expected a letterboxed uint8 input of shape {want}, got {got[0]} {got[1]}")
    return x


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output side of a conv padded by kernel // 2."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class _Checker:
    def __init__(self, source):
        self.source = str(source)

    def fail(self, problem: str):
        raise ModelFormatError(f"{self.source}: {problem}")

    # -------------------------------------------------------------- pieces
    def params(self, idx: int, op, params) -> dict:
        where = f"layer {idx}"
        if op not in _PARAMS:
            self.fail(f"{where}: unknown op {op!r} (expected one of {sorted(_PARAMS)})")
        where = f"layer {idx} ({op})"
        if not isinstance(params, dict):
            self.fail(f"{where}: params must be an object, got {type(params).__name__}")
        allowed, optional = _PARAMS[op], _OPTIONAL.get(op, {})
        unknown = sorted(set(params) - set(allowed) - set(optional))
        if unknown:
            self.fail(f"{where}: unknown params {unknown}")
        out = {}
        for name, choices in allowed.items():
            if name not in params:
                self.fail(f"{where}: missing param {name!r}")
            v = params[name]
            if name == "output":
                out[name] = self.word(where, name, v, choices)
                continue
            if not _is_int(v):
                self.fail(f"{where}: param {name}={v!r} must be an integer")
            v = int(v)
            if choices is None and not 1 <= v <= MAX_CHANNELS:
                self.fail(f"{where}: param {name}={v} out of range 1..{MAX_CHANNELS}")
            if choices is not None and v not in choices:
                self.fail(f"{where}: param {name}={v} must be one of {list(choices)}")
            out[name] = v
        for name, (choices, _default) in optional.items():  # absent ones stay absent (see _OPTIONAL)
            if name in params:
                v = params[name]
                out[name] = self.band(where, v) if choices == _BAND else self.word(where, name, v, choices)
        return out

    def band_rule(self, idx: int, layer: Layer) -> None:
        """An rbconv has a band exactly when its input is ternary."""
        if layer.op != "rbconv":
            return
        where = f"layer {idx} ({layer.op})"
        ternary = param(layer, "input") == "ternary"
        if ternary and "band" not in layer.params:
            self.fail(f"{where}: missing param 'band' (input='ternary' needs the half-width of its zero band)")
        if not ternary and "band" in layer.params:
            self.fail(f"{where}: param band is only allowed with input='ternary' (input is 'bits')")

    def word(self, where: str, name: str, v, choices) -> str:
        if not isinstance(v, str) or v not in choices:
            self.fail(f"{where}: param {name}={v!r} must be one of {list(choices)}")
        return v

    def band(self, where: str, v) -> float:
        # The runtime computes r ± float32(band): the band must be a positive, finite float32.
        ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        if ok:
            with np.errstate(over="ignore"):
                try:
                    b = np.float32(v)
                except OverflowError:
                    b = np.float32(np.inf)
            ok = bool(np.isfinite(b) and b > 0)
        if not ok:
            self.fail(f"{where}: param band={v!r} must be a finite number > 0 (as a float32)")
        return float(v)

    def tensors(self, idx: int, layer: Layer) -> dict:
        op, params, tensors = layer.op, layer.params, layer.tensors
        where = f"layer {idx} ({op})"
        if not isinstance(tensors, dict):
            self.fail(f"{where}: tensors must be a dict, got {type(tensors).__name__}")
        spec = _tensor_specs(layer)
        missing = sorted(set(spec) - set(tensors))
        extra = sorted(set(tensors) - set(spec))
        if missing:
            self.fail(f"{where}: missing tensors {missing}")
        if extra:
            self.fail(f"{where}: unexpected tensors {extra}")
        out = {}
        for name, (dt, shape) in spec.items():
            t = tensors[name]
            if not isinstance(t, np.ndarray):
                self.fail(f"{where}: tensor {name} must be a numpy array, got {type(t).__name__}")
            if t.dtype.newbyteorder("=") != _DTYPES[dt].newbyteorder("="):
                self.fail(f"{where}: tensor {name} has dtype {t.dtype}, expected {dt}")
            if tuple(t.shape) != shape:
                self.fail(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
            if dt == "float32" and not np.all(np.isfinite(t)):
                self.fail(f"{where}: tensor {name} holds non-finite values")
            if name == "flip" and not np.all((t == 0) | (t == 1)):
                self.fail(f"{where}: tensor flip holds values other than 0 and 1")
            out[name] = np.ascontiguousarray(t, dtype=_DTYPES[dt].newbyteorder("="))
        if op in ("bconv", "rbconv"):
            tail = params["in_ch"] % WORD_BITS
            if tail:
                junk = out["weight"][..., -1] >> np.uint64(tail)
                if np.any(junk):
                    self.fail(
                        f"{where}: weight has bits set past in_ch={params['in_ch']} "
                        "(bits past the last channel must be 0)"
                    )
        return out

    def model(self, m: Model) -> None:
        for name in ("input_width", "input_height"):
            v = getattr(m, name)
            if not _is_int(v) or not 1 <= int(v) <= MAX_SIDE:
                self.fail(f"{name}={v!r} must be an integer in 1..{MAX_SIDE}")
        if not _is_int(m.channels) or int(m.channels) not in (1, 3):
            self.fail(f"channels={m.channels!r} must be 1 or 3")
        names = m.class_names
        if not isinstance(names, (tuple, list)) or len(names) == 0:
            self.fail("class_names must be a non-empty list of strings")
        for n in names:
            if not isinstance(n, str) or not n.strip():
                self.fail(f"class name {n!r} is not a non-empty string")
            # Names are drawn (cv2.putText crashes on a lone surrogate, which JSON's \u escapes allow),
            # logged, and made topics: printable UTF-8 only.
            try:
                n.encode("utf-8")
            except UnicodeEncodeError:
                self.fail(f"class name {n!r} is not valid UTF-8 text")
            if any(ord(c) < 32 or ord(c) == 127 for c in n):
                self.fail(f"class name {n!r} holds a control character")
        if len(set(names)) != len(names):
            self.fail(f"class names are not unique: {list(names)}")
        a = m.anchors
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[1] != 2 or a.shape[0] < 1:
            shape = getattr(a, "shape", None)
            self.fail(f"anchors must be an (A, 2) array with A >= 1, got shape {shape}")
        if not np.all(np.isfinite(a)) or not np.all(a > 0):
            self.fail("anchors must be finite and > 0")
        for name in ("score_threshold", "nms_iou"):
            v = getattr(m, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                self.fail(f"{name}={v!r} must be a number in 0..1")
        if not isinstance(m.metadata, dict):
            self.fail("metadata must be a dict")
        layers = m.layers
        if not isinstance(layers, (tuple, list)) or not 1 <= len(layers) <= MAX_LAYERS:
            self.fail(f"layers must be a list of 1..{MAX_LAYERS} layers")
        self.chain(m, layers)
        need = activation_bytes(m)
        if need > MAX_ACTIVATION_BYTES:
            self.fail(
                f"the network's activations need {need / 2**20:.1f} MiB, more than the limit of "
                f"{MAX_ACTIVATION_BYTES // 2**20} MiB (input {m.input_width}x{m.input_height}, "
                f"widest layer {max(param(x, 'out_ch') or 0 for x in layers)} channels): too large for a 512 MB Pi"
            )

    def chain(self, m: Model, layers) -> None:
        h, w, c, kind = int(m.input_height), int(m.input_width), int(m.channels), "image"
        heads = [i for i, layer in enumerate(layers) if getattr(layer, "op", None) == "head"]
        if len(heads) != 1 or heads[0] != len(layers) - 1:
            self.fail(f"the model needs exactly one head and it must be the last layer (heads at {heads})")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                self.fail(f"layer {i} is a {type(layer).__name__}, not a Layer")
            p = self.params(i, layer.op, layer.params)
            checked = Layer(layer.op, p, layer.tensors)
            self.band_rule(i, checked)
            self.tensors(i, checked)
            where = f"layer {i} ({layer.op})"
            if layer.op == "stem":
                if kind != "image":
                    self.fail(f"{where}: a stem must be the first layer")
            elif kind == "image":
                self.fail(f"{where}: the first layer must be a stem")
            if layer.op in ("maxpool2", "bconv") and kind not in ("bits", "ternary"):
                self.fail(f"{where}: input is {kind} but the layer needs packed bits (binary or ternary)")
            if layer.op == "rbconv" and kind != "real":
                self.fail(f"{where}: input is {kind} but the layer needs a real stream (a real-output bconv before it)")
            if layer.op == "head" and kind == "ternary":
                self.fail(
                    f"{where}: input is ternary but the head reads a real stream or binary bits "
                    "(end the binary part with a real-output bconv, or a bits output)"
                )
            if "in_ch" in p and p["in_ch"] != c:
                self.fail(f"{where}: in_ch={p['in_ch']} but the previous layer gives {c} channels")
            if layer.op == "rbconv" and p["out_ch"] != p["in_ch"]:
                self.fail(f"{where}: out_ch={p['out_ch']} must equal in_ch={p['in_ch']} (the shortcut is an identity)")
            if layer.op in ("stem", "bconv", "rbconv"):
                h, w = conv_out(h, p["kernel"], p["stride"]), conv_out(w, p["kernel"], p["stride"])
                c = p["out_ch"]  # the logical channel count: a ternary activation of c channels is 2c bits
                kind = output_kind(checked)
            elif layer.op == "maxpool2":
                h, w = h // 2, w // 2  # keeps the kind: AND of the words is the max of binary or ternary values
            else:
                kind = "head"
                expect = m.num_anchors * (5 + len(m.class_names))
                if p["out_ch"] != expect:
                    self.fail(
                        f"{where}: out_ch={p['out_ch']} but {m.num_anchors} anchors and "
                        f"{len(m.class_names)} classes need A*(5+C)={expect}"
                    )
            if h < 1 or w < 1:
                self.fail(f"{where}: output would be {h}x{w}; the input is too small for this network")


def validate(model: Model, source="<model>") -> None:
    """Raise ModelFormatError if the model is not a consistent xnorcam model."""
    if not isinstance(model, Model):
        raise ModelFormatError(f"{source}: expected a Model, got {type(model).__name__}")
    _Checker(source).model(model)


def activation_bytes(model: Model) -> int:
    """Bytes of every activation buffer app/network.py allocates for ``model`` (a valid chain), plus its input."""
    from app.kernels import BORDER

    def packed(h, w, bits):
        return (h + 2 * BORDER) * (w + 2 * BORDER) * n_words(bits) * 8

    h, w, c = model.input_height, model.input_width, model.channels
    total = h * w * c  # the letterboxed input
    stem = model.layers[0]
    k, s, out = param(stem, "kernel"), param(stem, "stride"), param(stem, "out_ch")
    total += c * s * (h + 2 * (k // 2)) * -(-(w + 2 * (k // 2)) // s) * 4  # the stem's int32 planes
    h, w, c = conv_out(h, k, s), conv_out(w, k, s), out
    bits = (2 if output_kind(stem) == "ternary" else 1) * c
    total += packed(h, w, bits)
    kind = "bits"
    for layer in model.layers[1:-1]:
        if layer.op == "maxpool2":
            h, w = h // 2, w // 2
            total += packed(h, w, bits)
            continue
        k, s, c = param(layer, "kernel"), param(layer, "stride"), param(layer, "out_ch")
        h, w = conv_out(h, k, s), conv_out(w, k, s)
        kind = output_kind(layer)
        if kind in ("bits", "ternary"):
            bits = (2 if kind == "ternary" else 1) * c
            total += packed(h, w, bits)
        else:
            total += h * w * c * 4  # the real stream
            if layer.op == "rbconv":  # its own packed sign of the stream and a scratch stream
                total += packed(h, w, (2 if param(layer, "input") == "ternary" else 1) * c) + h * w * c * 4
    if kind != "real":
        total += h * w * c * 4  # the head's real copy of packed bits
    return total + h * w * param(model.layers[-1], "out_ch") * 4


def grid_size(model: Model) -> tuple[int, int]:
    """(grid_h, grid_w) of the head output."""
    h, w = model.input_height, model.input_width
    for layer in model.layers:
        if layer.op in ("stem", "bconv", "rbconv"):
            k, s = param(layer, "kernel"), param(layer, "stride")
            h, w = conv_out(h, k, s), conv_out(w, k, s)
        elif layer.op == "maxpool2":
            h, w = h // 2, w // 2
    return h, w


# ----------------------------------------------------------------- writer
def _jsonable(value, where: str, source):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"{source}: {where} is not JSON-serialisable: {e}") from None
    return value


def write_model(path, model: Model) -> None:
    """Validate and write ``model`` to ``path`` (atomically, via a temp file)."""
    path = Path(path)
    validate(model, path)
    _jsonable(model.metadata, "metadata", path)
    layers_json, blobs, offset = [], [], 0
    for layer in model.layers:
        names = [*_PARAMS[layer.op], *(k for k in _OPTIONAL.get(layer.op, {}) if k in layer.params)]
        entry = {"op": layer.op, "params": {k: layer.params[k] for k in names}, "tensors": {}}
        for name, (dt, _shape) in _tensor_specs(layer).items():
            arr = np.ascontiguousarray(layer.tensors[name], dtype=_DTYPES[dt])
            raw = arr.tobytes()
            entry["tensors"][name] = {"dtype": dt, "shape": list(arr.shape), "offset": offset, "nbytes": len(raw)}
            pad = (-len(raw)) % ALIGN
            blobs.append(raw + b"\x00" * pad)
            offset += len(raw) + pad
        entry["params"] = {
            k: int(v) if _is_int(v) else float(v) if isinstance(v, (float, np.floating)) else v
            for k, v in entry["params"].items()
        }
        layers_json.append(entry)
    header = {
        "format": "xnorcam-model",
        "input": {"width": int(model.input_width), "height": int(model.input_height), "channels": int(model.channels)},
        "class_names": list(model.class_names),
        "anchors": [[float(a), float(b)] for a, b in np.asarray(model.anchors, dtype=np.float32)],
        "decode": {"score_threshold": float(model.score_threshold), "nms_iou": float(model.nms_iou)},
        "metadata": model.metadata,
        "layers": layers_json,
        "data_size": offset,
    }
    hjson = json.dumps(header, ensure_ascii=False, allow_nan=False, indent=1).encode("utf-8")
    start = _PREFIX.size + len(hjson)
    body = _PREFIX.pack(MAGIC, VERSION, len(hjson)) + hjson + b"\x00" * ((-start) % ALIGN) + b"".join(blobs)
    digest = hashlib.sha256(body).digest()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(body + digest)
    tmp.replace(path)


# ----------------------------------------------------------------- reader
def _read_header(chk: _Checker, raw: bytes) -> tuple[dict, int]:
    if len(raw) < _PREFIX.size:
        chk.fail(f"truncated: {len(raw)} bytes is shorter than the {_PREFIX.size}-byte preamble")
    magic, version, hlen = _PREFIX.unpack_from(raw, 0)
    if magic != MAGIC:
        chk.fail(f"not an xnorcam model file (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        chk.fail(f"unsupported format version {version} (this reader supports version {VERSION})")
    if hlen > MAX_HEADER:
        chk.fail(f"header length {hlen} exceeds the limit of {MAX_HEADER} bytes")
    data_start = _PREFIX.size + hlen
    data_start += (-data_start) % ALIGN
    if len(raw) < _PREFIX.size + hlen:
        chk.fail(f"truncated: the header needs {_PREFIX.size + hlen} bytes, the file has {len(raw)}")
    text = raw[_PREFIX.size : _PREFIX.size + hlen]
    deep = json_too_deep(text)
    if deep:  # json.loads recurses once per level: refuse before it would exhaust the stack
        chk.fail(f"header is {deep}")
    try:
        header = json.loads(text.decode("utf-8"))
    except RecursionError:
        chk.fail("header is JSON nested too deeply to read")
    except (UnicodeDecodeError, ValueError) as e:
        if len(raw) >= _DIGEST and hashlib.sha256(raw[:-_DIGEST]).digest() != raw[-_DIGEST:]:
            chk.fail(f"checksum mismatch (corrupted file; header unreadable: {e})")
        chk.fail(f"header is not valid UTF-8 JSON: {e}")
    if not isinstance(header, dict):
        chk.fail("header JSON is not an object")
    size = header.get("data_size")
    if not _is_int(size) or size < 0:
        chk.fail(f"header data_size={size!r} is not a non-negative integer")
    expected = data_start + size + _DIGEST
    if len(raw) < expected:
        chk.fail(f"truncated: expected {expected} bytes, the file has {len(raw)}")
    if len(raw) > expected:
        chk.fail(f"{len(raw) - expected} unexpected trailing bytes after the checksum")
    if hashlib.sha256(raw[:-_DIGEST]).digest() != raw[-_DIGEST:]:
        chk.fail("checksum mismatch: the file is corrupted (sha256 of its contents differs from the stored one)")
    return header, data_start


def _get(chk: _Checker, obj, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        chk.fail(f"{where}: missing key {key!r}")
    v = obj[key]
    if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        chk.fail(f"{where}: {key!r} must be {names}, got {type(v).__name__}")
    return v


def _read_tensor(chk: _Checker, raw: bytes, data_start: int, size: int, desc, where: str) -> np.ndarray:
    dt = _get(chk, desc, "dtype", str, where)
    if dt not in _DTYPES:
        chk.fail(f"{where}: unknown dtype {dt!r}")
    shape = _get(chk, desc, "shape", list, where)
    if not all(_is_int(s) and 0 <= s <= 1 << 30 for s in shape):
        chk.fail(f"{where}: bad shape {shape}")
    off = _get(chk, desc, "offset", int, where)
    nbytes = _get(chk, desc, "nbytes", int, where)
    itemsize = _DTYPES[dt].itemsize
    count = math.prod(shape)
    if nbytes != count * itemsize:
        chk.fail(f"{where}: nbytes={nbytes} but shape {shape} of {dt} needs {count * itemsize}")
    if off < 0 or off % ALIGN or off + nbytes > size:
        chk.fail(f"{where}: data range [{off}, {off + nbytes}) is misaligned or outside the data section ({size} bytes)")
    arr = np.frombuffer(raw, dtype=_DTYPES[dt], count=count, offset=data_start + off).reshape(shape)
    return arr.astype(_DTYPES[dt].newbyteorder("="), copy=True)


def read_model(path) -> Model:
    """Load and fully validate a model file; any problem is a ModelFormatError."""
    chk = _Checker(path)
    try:
        st = Path(path).stat()
        if not stat.S_ISREG(st.st_mode):  # /dev/zero would fill memory, a FIFO block forever
            chk.fail("not a regular file (a device, FIFO or directory cannot be a model file)")
        with open(path, "rb") as fh:
            # The magic and the header's length first: a large file that is not a model is never read whole.
            head = fh.read(_PREFIX.size)
            if len(head) == _PREFIX.size:
                magic, version, hlen = _PREFIX.unpack(head)
                if magic != MAGIC:
                    chk.fail(f"not an xnorcam model file (magic {magic!r}, expected {MAGIC!r})")
            if st.st_size > MAX_FILE_BYTES:
                chk.fail(f"{st.st_size} bytes is larger than a model file may be ({MAX_FILE_BYTES // 2**20} MiB)")
            raw = head + fh.read(MAX_FILE_BYTES + 1 - len(head))
            if len(raw) > MAX_FILE_BYTES:  # it grew while being read
                chk.fail(f"larger than a model file may be ({MAX_FILE_BYTES // 2**20} MiB)")
    except OSError as e:
        from app.sandbox import hint

        chk.fail(f"cannot read the model file: {e.strerror or e}{hint(str(path), e.errno, writing=False)}")
    header, data_start = _read_header(chk, raw)
    size = header["data_size"]
    if header.get("format") != "xnorcam-model":
        chk.fail(f"header format={header.get('format')!r}, expected 'xnorcam-model'")
    inp = _get(chk, header, "input", dict, "header")
    names = _get(chk, header, "class_names", list, "header")
    anchors = _get(chk, header, "anchors", list, "header")
    dec = header.get("decode", {})
    if not isinstance(dec, dict):
        chk.fail("header: 'decode' must be an object")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        chk.fail("header: 'metadata' must be an object")
    if not all(isinstance(a, list) and len(a) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a) for a in anchors):
        chk.fail("header: anchors must be a list of [width, height] number pairs")
    if any(abs(v) > 1e38 for a in anchors for v in a):  # a huge JSON int would overflow the float32 conversion
        chk.fail("header: anchors must be finite and > 0 (an anchor is too large for float32)")
    layers = []
    for i, entry in enumerate(_get(chk, header, "layers", list, "header")):
        where = f"layer {i}"
        op = _get(chk, entry, "op", str, where)
        params = _get(chk, entry, "params", dict, where)
        tdesc = _get(chk, entry, "tensors", dict, where)
        tensors = {
            name: _read_tensor(chk, raw, data_start, size, d, f"{where} ({op}) tensor {name}") for name, d in tdesc.items()
        }
        layers.append(Layer(op=op, params=dict(params), tensors=tensors))
    model = Model(
        input_width=_get(chk, inp, "width", int, "header input"),
        input_height=_get(chk, inp, "height", int, "header input"),
        channels=_get(chk, inp, "channels", int, "header input"),
        class_names=tuple(names),
        anchors=np.array(anchors, dtype=np.float32).reshape(-1, 2) if anchors else np.zeros((0, 2), np.float32),
        layers=tuple(layers),
        metadata=metadata,
        score_threshold=dec.get("score_threshold", DEFAULT_SCORE_THRESHOLD),
        nms_iou=dec.get("nms_iou", DEFAULT_NMS_IOU),
    )
    chk.model(model)
    return model
