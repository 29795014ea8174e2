"""Model file: round trip, and every kind of bad file is one ModelFormatError naming the file and the problem."""

import dataclasses
import hashlib
import json
import re
import struct

import numpy as np
import pytest

from app import modelfile
from app.modelfile import Layer, ModelFormatError, read_model, write_model


def _same(a, b):
    assert (a.input_width, a.input_height, a.channels, a.class_names) == (b.input_width, b.input_height, b.channels, b.class_names)
    np.testing.assert_array_equal(a.anchors, b.anchors)
    assert a.metadata == b.metadata and (a.score_threshold, a.nms_iou) == (b.score_threshold, b.nms_iou)
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.op == lb.op and la.params == lb.params and la.tensors.keys() == lb.tensors.keys()
        for k in la.tensors:
            assert la.tensors[k].dtype == lb.tensors[k].dtype
            np.testing.assert_array_equal(la.tensors[k], lb.tensors[k])


def test_roundtrip(rand_model, rand_model_file):
    _same(rand_model, read_model(rand_model_file))


def test_roundtrip_unicode_names_and_metadata(rand_model, tmp_path):
    m = dataclasses.replace(rand_model, class_names=("persönlich",), metadata={"name": "é", "epochs": 3},
                            score_threshold=0.3, nms_iou=0.5)
    write_model(tmp_path / "u.xnc", m)
    _same(m, read_model(tmp_path / "u.xnc"))


def _split(raw):
    magic, version, hlen = struct.unpack_from("<8sII", raw)
    header = json.loads(raw[16:16 + hlen])
    start = 16 + hlen
    start += (-start) % 64
    return version, header, raw[start:-32]


def _join(version, header, data):
    h = json.dumps(header).encode()
    start = 16 + len(h)
    body = struct.pack("<8sII", modelfile.MAGIC, version, len(h)) + h + b"\0" * ((-start) % 64) + data
    return body + hashlib.sha256(body).digest()


def _expect(path, *fragments):
    with pytest.raises(ModelFormatError) as e:
        read_model(path)
    msg = str(e.value)
    assert str(path) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("cut", [0, 5, 15, 16, 100, 1000, -33, -1])
def test_truncated(rand_model_file, tmp_path, cut):
    raw = rand_model_file.read_bytes()
    p = tmp_path / "t.xnc"
    p.write_bytes(raw[:cut] if cut >= 0 else raw[:cut])
    _expect(p, "truncated" if cut not in (-1,) else "")


@pytest.mark.parametrize("where", [20, 3000, -40, -5])
def test_corrupted_byte(rand_model_file, tmp_path, where):
    raw = bytearray(rand_model_file.read_bytes())
    raw[where] ^= 0x10
    p = tmp_path / "c.xnc"
    p.write_bytes(bytes(raw))
    msg = _expect(p)
    assert "checksum" in msg or "header" in msg


def test_wrong_magic_and_version_and_missing(rand_model_file, tmp_path):
    raw = rand_model_file.read_bytes()
    p = tmp_path / "v.xnc"
    p.write_bytes(b"GARBAGE!" + raw[8:])
    _expect(p, "not an xnorcam model")
    version, header, data = _split(raw)
    p.write_bytes(_join(2, header, data))
    _expect(p, "version 2")
    _expect(tmp_path / "nope.xnc", "cannot read")
    p.write_bytes(raw + b"x")
    _expect(p, "trailing")


def _mutate(rand_model_file, tmp_path, fn):
    version, header, data = _split(rand_model_file.read_bytes())
    data = bytearray(data)
    fn(header, data)
    p = tmp_path / "m.xnc"
    p.write_bytes(_join(version, header, bytes(data)))
    return p


def _tensor_bytes(header, data, layer, name):
    d = header["layers"][layer]["tensors"][name]
    return d["offset"], d["nbytes"]


def _set_float(header, data, layer, name, value):
    off, _ = _tensor_bytes(header, data, layer, name)
    data[off:off + 4] = np.float32(value).tobytes()


def _set_byte(header, data, layer, name, value):
    off, _ = _tensor_bytes(header, data, layer, name)
    data[off] = value


CASES = {
    "head not last": (lambda h, d: h["layers"].insert(7, h["layers"].pop(8)), "exactly one head"),
    "two heads": (lambda h, d: h["layers"].append(h["layers"][8]), "exactly one head"),
    "wrong head out_ch": (lambda h, d: h.update(class_names=["a", "b"]), "A*(5+C)"),
    "flip 2": (lambda h, d: _set_byte(h, d, 0, "flip", 2), "flip"),
    "nan scale": (lambda h, d: _set_float(h, d, 7, "scale", np.nan), "non-finite"),
    "inf head": (lambda h, d: _set_float(h, d, 8, "weight", np.inf), "non-finite"),
    "negative anchor": (lambda h, d: h["anchors"][0].__setitem__(0, -3.0), "anchors"),
    "no anchors": (lambda h, d: h.update(anchors=[]), "anchors"),
    "duplicate classes": (lambda h, d: h.update(class_names=["p", "p"]), "unique"),
    "empty class name": (lambda h, d: h.update(class_names=[""]), "class name"),
    "no classes": (lambda h, d: h.update(class_names=[]), "class_names"),
    "in_ch chain": (lambda h, d: h["layers"][2]["params"].update(in_ch=16), "in_ch"),
    "bad dtype": (lambda h, d: h["layers"][0]["tensors"]["threshold"].update(dtype="float32"), "dtype"),
    "bad shape": (lambda h, d: h["layers"][0]["tensors"]["threshold"].update(shape=[4, 8]), "shape"),
    "offset outside": (lambda h, d: h["layers"][0]["tensors"]["flip"].update(offset=10**9), "outside"),
    "missing tensor": (lambda h, d: h["layers"][0]["tensors"].pop("flip"), "missing tensors"),
    "unknown op": (lambda h, d: h["layers"][1].update(op="avgpool"), "unknown op"),
    "bad kernel": (lambda h, d: h["layers"][2]["params"].update(kernel=5), "kernel"),
    "bool param": (lambda h, d: h["layers"][2]["params"].update(stride=True), "stride"),
    "unknown param": (lambda h, d: h["layers"][2]["params"].update(dilation=2), "unknown params"),
    "huge input": (lambda h, d: h["input"].update(width=100000), "input_width"),
    "tiny input": (lambda h, d: h["input"].update(width=4), "too small"),
    "channels 2": (lambda h, d: h["input"].update(channels=2), "channels"),
    "stem not first": (lambda h, d: h["layers"].insert(0, h["layers"].pop(1)), "stem"),
    "bad iou": (lambda h, d: h["decode"].update(nms_iou=3), "nms_iou"),
    "layers not list": (lambda h, d: h.update(layers={}), "layers"),
    "wrong format": (lambda h, d: h.update(format="onnx"), "format"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_inconsistent_files(rand_model_file, tmp_path, name):
    fn, fragment = CASES[name]
    _expect(_mutate(rand_model_file, tmp_path, fn), fragment)


def test_header_not_json(rand_model_file, tmp_path):
    version, header, data = _split(rand_model_file.read_bytes())
    h = b"{not json"
    body = struct.pack("<8sII", modelfile.MAGIC, version, len(h)) + h
    p = tmp_path / "j.xnc"
    p.write_bytes(body + hashlib.sha256(body).digest())
    _expect(p, "JSON")


def test_padding_bits_in_weights_rejected(rand_model, tmp_path):
    # layer 2 has in_ch=32: bit 40 of a weight word is past the last channel
    layers = list(rand_model.layers)
    w = layers[2].tensors["weight"].copy()
    w[0, 0, 0, 0] |= np.uint64(1 << 40)
    layers[2] = Layer("bconv", layers[2].params, {**layers[2].tensors, "weight": w})
    bad = dataclasses.replace(rand_model, layers=tuple(layers))
    with pytest.raises(ModelFormatError, match="past in_ch"):
        write_model(tmp_path / "w.xnc", bad)


def test_writer_validates(rand_model, tmp_path):
    bad = dataclasses.replace(rand_model, anchors=np.zeros((3, 2), np.float32))
    with pytest.raises(ModelFormatError, match="anchors"):
        write_model(tmp_path / "a.xnc", bad)
    assert not (tmp_path / "a.xnc").exists()
    with pytest.raises(ModelFormatError, match="metadata"):
        write_model(tmp_path / "b.xnc", dataclasses.replace(rand_model, metadata={"x": object()}))


def test_tensors_are_aligned(rand_model_file):
    version, header, data = _split(rand_model_file.read_bytes())
    raw = rand_model_file.read_bytes()
    hlen = struct.unpack_from("<I", raw, 12)[0]
    assert (16 + hlen + (-(16 + hlen)) % 64) % 64 == 0
    for layer in header["layers"]:
        for d in layer["tensors"].values():
            assert d["offset"] % 64 == 0


def _rbconv(ch, out_ch=None, stride=1, seed=0):
    rng = np.random.default_rng(seed)
    o = out_ch or ch
    w = rng.integers(0, 2**63, size=(o, 3, 3, (ch + 63) // 64), dtype=np.uint64)
    return Layer(
        "rbconv",
        {"kernel": 3, "stride": stride, "in_ch": ch, "out_ch": o},
        {"weight": w, "scale": rng.normal(size=o).astype(np.float32), "bias": np.zeros(o, np.float32)},
    )


def _insert(model, at, layer):
    layers = list(model.layers)
    layers.insert(at, layer)
    return dataclasses.replace(model, layers=tuple(layers))


def test_rbconv_round_trips_and_keeps_the_grid(rand_model, tmp_path):
    real_at = next(i for i, la in enumerate(rand_model.layers) if modelfile.output_kind(la) == "real")
    ch = rand_model.layers[real_at].params["out_ch"]
    m = _insert(_insert(rand_model, real_at + 1, _rbconv(ch)), real_at + 2, _rbconv(ch, seed=1))
    write_model(tmp_path / "r.xnc", m)
    back = read_model(tmp_path / "r.xnc")
    _same(m, back)
    assert [la.op for la in back.layers][-3:] == ["rbconv", "rbconv", "head"]
    assert modelfile.grid_size(back) == modelfile.grid_size(rand_model)


def test_rbconv_needs_a_real_stream_of_its_own_width_at_stride_1(rand_model, tmp_path):
    real_at = next(i for i, la in enumerate(rand_model.layers) if modelfile.output_kind(la) == "real")
    ch = rand_model.layers[real_at].params["out_ch"]
    bits_ch = rand_model.layers[real_at - 1].params["out_ch"]
    cases = [
        (_insert(rand_model, real_at, _rbconv(bits_ch)), "needs a real stream"),
        (_insert(rand_model, real_at + 1, _rbconv(ch, out_ch=ch // 2)), "must equal in_ch"),
        (_insert(rand_model, real_at + 1, _rbconv(ch, stride=2)), "stride=2 must be one of [1]"),
    ]
    for k, (bad, needle) in enumerate(cases):
        with pytest.raises(ModelFormatError, match=re.escape(needle)):
            write_model(tmp_path / f"b{k}.xnc", bad)


# ---------------------------------------------------------------- ternary activations (app/bits.py)
def _ternary_model():
    """A small random model with every kind of ternary layer: stem, bits bconv and rbconv input."""
    from app.randmodel import random_model

    return random_model(seed=2, width=48, height=40, widths=(8, 16, 70, 24, 24), blocks=2, ternary=(0, 4, 9))


def test_ternary_layers_round_trip(tmp_path):
    m = _ternary_model()
    ops = [(la.op, la.params.get("output"), la.params.get("input")) for la in m.layers]
    assert ops[0] == ("stem", "ternary", None) and ops[4] == ("bconv", "ternary", None)
    assert ops[8] == ("rbconv", None, None) and ops[9] == ("rbconv", None, "ternary")
    assert m.layers[0].tensors["threshold"].shape == (2, 8) and m.layers[4].tensors["flip"].shape == (2, 70)
    write_model(tmp_path / "t.xnc", m)
    back = read_model(tmp_path / "t.xnc")
    _same(m, back)
    assert back.layers[9].params == {"kernel": 3, "stride": 1, "in_ch": 24, "out_ch": 24, "input": "ternary", "band": 0.5}
    assert isinstance(back.layers[9].params["band"], float)
    assert "input" not in back.layers[8].params and "band" not in back.layers[8].params
    assert modelfile.param(back.layers[0], "output") == "ternary"
    assert modelfile.param(back.layers[8], "input") == "bits" and modelfile.param(back.layers[9], "input") == "ternary"


def test_a_float32_band_is_written_as_a_number(tmp_path):
    m = _ternary_model()
    layers = list(m.layers)
    layers[9] = Layer("rbconv", {**layers[9].params, "band": np.float32(0.1)}, layers[9].tensors)
    write_model(tmp_path / "b.xnc", dataclasses.replace(m, layers=tuple(layers)))
    band = read_model(tmp_path / "b.xnc").layers[9].params["band"]
    assert type(band) is float and np.float32(band) == np.float32(0.1)


def test_files_without_the_optional_params_read_as_before(rand_model, rand_model_file):
    _version, header, _data = _split(rand_model_file.read_bytes())
    assert [sorted(la["params"]) for la in header["layers"]][:3] == [
        ["in_ch", "kernel", "out_ch", "stride"], [], ["in_ch", "kernel", "out_ch", "output", "stride"]]
    back = read_model(rand_model_file)
    assert back.layers[0].params == {"kernel": 3, "stride": 2, "in_ch": 1, "out_ch": 32}
    assert modelfile.param(back.layers[0], "output") == "bits"
    assert [la.params for la in back.layers] == [la.params for la in rand_model.layers]


def _with_layer(model, at, **changes):
    layers = list(model.layers)
    la = layers[at]
    layers[at] = Layer(la.op, changes.pop("params", la.params), {**la.tensors, **changes})
    return dataclasses.replace(model, layers=tuple(layers))


def _refused(model, tmp_path, *fragments):
    path = tmp_path / "bad.xnc"
    with pytest.raises(ModelFormatError) as e:
        write_model(path, model)
    assert not path.exists()
    for f in (str(path), *fragments):
        assert f in str(e.value), str(e.value)


def test_ternary_outputs_need_a_rule_per_plane(tmp_path):
    m = _ternary_model()
    _refused(_with_layer(m, 0, threshold=m.layers[0].tensors["threshold"][0].copy()), tmp_path,
             "layer 0 (stem): tensor threshold has shape (8,), expected (2, 8)")
    _refused(_with_layer(m, 4, flip=m.layers[4].tensors["flip"][1].copy()), tmp_path,
             "layer 4 (bconv): tensor flip has shape (70,), expected (2, 70)")
    flip = m.layers[4].tensors["flip"].copy()
    flip[1, 3] = 2
    _refused(_with_layer(m, 4, flip=flip), tmp_path, "layer 4 (bconv): tensor flip holds values other than 0 and 1")
    # a binary output with the ternary (2, C) rule is just as wrong
    bits_model = _with_layer(m, 0, params={k: v for k, v in m.layers[0].params.items() if k != "output"})
    _refused(bits_model, tmp_path, "layer 0 (stem): tensor threshold has shape (2, 8), expected (8,)")


@pytest.mark.parametrize("op_at, params, needle", [
    (0, {"output": "real"}, "layer 0 (stem): param output='real' must be one of ['bits', 'ternary']"),
    (4, {"output": "trits"}, "layer 4 (bconv): param output='trits' must be one of ['bits', 'real', 'ternary']"),
    (9, {"input": "real"}, "layer 9 (rbconv): param input='real' must be one of ['bits', 'ternary']"),
    (9, {"input": 1}, "layer 9 (rbconv): param input=1 must be one of ['bits', 'ternary']"),
    (9, {"band": None}, "layer 9 (rbconv): missing param 'band'"),
    (9, {"input": None}, "layer 9 (rbconv): param band is only allowed with input='ternary'"),
    (9, {"input": "bits"}, "layer 9 (rbconv): param band is only allowed with input='ternary'"),
    (9, {"band": 0.0}, "layer 9 (rbconv): param band=0.0 must be a finite number > 0"),
    (9, {"band": -0.5}, "layer 9 (rbconv): param band=-0.5 must be a finite number > 0"),
    (9, {"band": float("inf")}, "layer 9 (rbconv): param band=inf must be a finite number > 0"),
    (9, {"band": float("nan")}, "layer 9 (rbconv): param band=nan must be a finite number > 0"),
    (9, {"band": 1e39}, "param band=1e+39 must be a finite number > 0 (as a float32)"),
    (9, {"band": 1e-50}, "param band=1e-50 must be a finite number > 0 (as a float32)"),
    (9, {"band": True}, "layer 9 (rbconv): param band=True must be a finite number > 0"),
    (9, {"band": "0.5"}, "layer 9 (rbconv): param band='0.5' must be a finite number > 0"),
    (8, {"band": 0.5}, "layer 8 (rbconv): param band is only allowed with input='ternary'"),
    (4, {"input": "ternary"}, "layer 4 (bconv): unknown params ['input']"),
    (1, {"output": "ternary"}, "layer 1 (maxpool2): unknown params ['output']"),
])
def test_bad_ternary_params_are_refused_naming_the_layer(tmp_path, op_at, params, needle):
    m = _ternary_model()
    p = {**m.layers[op_at].params, **params}
    p = {k: v for k, v in p.items() if v is not None}
    _refused(_with_layer(m, op_at, params=p), tmp_path, needle)


def test_a_non_finite_band_in_a_file_is_refused(tmp_path):
    # json reads NaN and Infinity; the writer never writes them, a hand-made file can
    src = tmp_path / "t.xnc"
    write_model(src, _ternary_model())
    for band in (float("nan"), float("inf")):
        path = _mutate(src, tmp_path, lambda h, d, b=band: h["layers"][9]["params"].update(band=b))
        _expect(path, "layer 9 (rbconv): param band=", "must be a finite number > 0")


def test_a_default_may_also_be_written_out(rand_model_file, tmp_path):
    # adding the default explicitly is allowed and means the same
    path = _mutate(rand_model_file, tmp_path, lambda h, d: h["layers"][0]["params"].update(output="bits"))
    assert read_model(path).layers[0].params["output"] == "bits"


def test_the_head_does_not_read_a_ternary_activation(tmp_path):
    m = _ternary_model()
    stem = m.layers[0]
    hw = np.zeros((m.layers[-1].params["out_ch"], 8), np.float32)
    head = Layer("head", {"in_ch": 8, "out_ch": hw.shape[0]}, {"weight": hw, "bias": m.layers[-1].tensors["bias"]})
    _refused(dataclasses.replace(m, layers=(stem, head)), tmp_path,
             "layer 1 (head): input is ternary but the head reads a real stream or binary bits")
    _refused(dataclasses.replace(m, layers=(stem, m.layers[1], head)), tmp_path, "layer 2 (head): input is ternary")
    # a binary stem straight into the head is fine (the head reads ±1)
    bits_stem = Layer("stem", {k: v for k, v in stem.params.items() if k != "output"},
                      {**stem.tensors, "threshold": stem.tensors["threshold"][0], "flip": stem.tensors["flip"][0]})
    write_model(tmp_path / "ok.xnc", dataclasses.replace(m, layers=(bits_stem, head)))


def test_maxpool_and_bconv_read_ternary_but_rbconv_does_not(tmp_path):
    m = _ternary_model()
    assert [la.op for la in m.layers[:3]] == ["stem", "maxpool2", "bconv"]  # pool and bconv on a ternary stem
    rb = m.layers[8]
    layers = list(m.layers)
    layers.insert(5, Layer("rbconv", {**rb.params, "in_ch": 70, "out_ch": 70},
                           {"weight": np.zeros((70, 3, 3, 2), np.uint64), "scale": np.ones(70, np.float32),
                            "bias": np.zeros(70, np.float32)}))
    _refused(dataclasses.replace(m, layers=tuple(layers)), tmp_path,
             "layer 5 (rbconv): input is ternary but the layer needs a real stream")


def test_output_kind_reads_the_defaults(rand_model):
    m = _ternary_model()
    assert [modelfile.output_kind(la) for la in m.layers] == [
        "ternary", None, "bits", None, "ternary", None, "bits", "real", "real", "real", None]
    assert "output" not in rand_model.layers[0].params and modelfile.output_kind(rand_model.layers[0]) == "bits"


def test_check_input_names_what_the_model_takes(rand_model):
    x = np.zeros((192, 192, 1), np.uint8)
    assert modelfile.check_input(rand_model, x) is x
    for bad in (np.zeros((192, 192), np.uint8), np.zeros((191, 192, 1), np.uint8), np.zeros((192, 192, 1), np.int16),
                [[0]]):
        with pytest.raises(ValueError, match=r"expected a letterboxed uint8 input of shape \(192, 192, 1\)"):
            modelfile.check_input(rand_model, bad)
