#!/usr/bin/env python3
"""Writes the fixtures of tests/test_ptfile.c: small torch.save files in both formats, hostile
pickles, and the values torch.load gives for them.

For: regenerating tests/ref/ptfile/ (all files tiny) and, given the EfficientNet-Lite0
checkpoint, a reference of its 296 tensors (names, shapes, dtypes, SHA-256 of the contiguous
little-endian bytes, a few sums). Not for: anything the C test needs at run time beyond these
files; the test never runs Python.

Usage (torch needed; scripts/setup-reference.sh builds such a Python):
  python tests/ref/gen_ptfile_ref.py --out tests/ref/ptfile [--effnet PATH.pth]
"""
import argparse
import collections
import hashlib
import io
import json
import os
import pickle
import zipfile

import torch


def mixed_state():
    """One object with everything the reader must handle."""
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict()
    sd["f32"] = torch.randn(2, 3, generator=g)
    sd["f16"] = torch.randn(4, generator=g).half()
    sd["bf16"] = torch.randn(2, 2, generator=g).bfloat16()
    sd["f64"] = torch.randn(3, generator=g).double()
    sd["i64"] = torch.tensor([-5, 0, (1 << 40) + 3], dtype=torch.int64)
    sd["i32"] = torch.tensor([7, -8], dtype=torch.int32)
    sd["u8"] = torch.tensor([0, 255, 3], dtype=torch.uint8)
    sd["num_batches_tracked"] = torch.tensor(12345)  # int64 scalar
    sd["scalar_f32"] = torch.tensor(2.5)
    base = torch.arange(12, dtype=torch.float32) * 0.5 - 1.0
    sd["shared.a"] = base[2:6]  # offset 2
    sd["shared.b"] = base.view(3, 4)[1]  # offset 4, same storage
    sd["shared.t"] = base.view(3, 4).t()  # transposed: copied contiguous
    sd["shared.col"] = base.view(3, 4)[:, 1]  # strided column, offset 1
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=g))
    sd["empty"] = torch.zeros(0, 4)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    torch.nn.init.normal_(net[1].running_mean, generator=g)
    sd["net"] = net.state_dict()  # OrderedDict with _metadata (BUILD)
    return {
        "state_dict": sd,
        "epoch": 3,
        "note": "skipped",
        "history": [torch.ones(2)],  # lists are skipped
        "meta": {"inner": {"deep": torch.full((2, 1), 4.0)}},
        "opt": {0: torch.tensor([1.5, -2.5])},  # int keys become "0"
    }


def flatten(obj, prefix, out):
    for k, v in obj.items():
        name = prefix + str(k)
        if isinstance(v, torch.Tensor):
            out.append((name, v))
        elif isinstance(v, dict):
            flatten(v, name + ".", out)


DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F32",  # rounded to F32 at load
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


def describe(t, with_values):
    t = t.detach()
    d = {"dtype": DTYPES[t.dtype], "shape": list(t.shape)}
    if t.dtype == torch.float64:
        t = t.float()
    if with_values:
        if t.dtype in (torch.int64, torch.int32, torch.uint8):
            d["values"] = [str(int(x)) for x in t.reshape(-1).tolist()]
        else:
            d["values"] = [float(x) for x in t.float().reshape(-1).tolist()]
    d["sha256"] = hashlib.sha256(t.contiguous().numpy().tobytes()
                                 if t.dtype != torch.bfloat16 else
                                 t.contiguous().view(torch.int16).numpy().tobytes()).hexdigest()
    return d


def reference(obj, with_values):
    out = []
    flatten(obj, "", out)
    return [dict(name=n, **describe(t, with_values)) for n, t in out]


class Evil:
    """Pickles to GLOBAL posix.system + REDUCE: what a hostile checkpoint looks like."""

    def __reduce__(self):
        return (os.system, ("echo levi-ptfile-test-this-must-never-run",))


def legacy_header():
    b = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, b, protocol=2)
    pickle.dump(1001, b, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, b, protocol=2)
    return b.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--effnet", help="efficientnet-lite0-*.pth (legacy format)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    obj = mixed_state()
    torch.save(obj, os.path.join(a.out, "mixed_zip.torch"))
    torch.save(obj, os.path.join(a.out, "mixed_legacy.torch"), _use_new_zipfile_serialization=False)
    small = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
             "n": torch.tensor(1), "h": torch.ones(2, dtype=torch.float16)}
    torch.save(small, os.path.join(a.out, "small_zip.torch"))
    torch.save(small, os.path.join(a.out, "small_legacy.torch"), _use_new_zipfile_serialization=False)

    # The same archive with deflated entries: torch never writes these; the reader refuses.
    with zipfile.ZipFile(os.path.join(a.out, "small_zip.torch")) as zin, \
         zipfile.ZipFile(os.path.join(a.out, "deflated_zip.torch"), "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))

    evil = pickle.dumps(Evil(), protocol=2)
    assert b"posix\nsystem" in evil or b"nt\nsystem" in evil
    with open(os.path.join(a.out, "evil_legacy.torch"), "wb") as f:
        f.write(legacy_header() + evil)
    with open(os.path.join(a.out, "evil_magic.torch"), "wb") as f:
        f.write(evil)  # hostile from the first pickle on
    with zipfile.ZipFile(os.path.join(a.out, "evil_zip.torch"), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/byteorder", "little")

    for name in ("mixed_zip.torch", "mixed_legacy.torch"):  # both formats load to the same values
        back = torch.load(os.path.join(a.out, name), weights_only=True)
        assert reference(back, True) == reference(obj, True), name

    ref = {"mixed": reference(obj, True), "small": reference(small, True)}
    with open(os.path.join(a.out, "expected.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")

    if a.effnet:
        sd = torch.load(a.effnet, map_location="cpu", weights_only=True)
        tensors = reference(sd, False)
        sums = {}
        for n in ("_conv_stem.weight", "_bn0.running_var", "_blocks.15._project_conv.weight",
                  "_fc.weight", "_fc.bias"):
            t = sd[n].double()
            sums[n] = {"sum": float(t.sum()), "abs_sum": float(t.abs().sum()),
                       "first": [float(x) for x in sd[n].reshape(-1)[:4].tolist()]}
        with open(os.path.join(a.out, "effnet_lite0.json"), "w") as f:
            json.dump({"count": len(tensors), "tensors": tensors, "sums": sums}, f, indent=0)
            f.write("\n")


if __name__ == "__main__":
    main()
