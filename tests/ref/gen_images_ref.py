#!/usr/bin/env python3
"""Writes tests/ref/images/transforms.json: the outputs torch, torchvision and Pillow give for
the image transforms of src/data/images.c, on one fixed 28 x 28 grey image, and (optionally)
checksums of the Fashion-MNIST files.

For: the golden tests of tests/test_images.c (bilinear and area resizing, down-then-up
sampling, Gaussian blur, JPEG round trips, ImageNet preprocessing). Not for: the idx reader's
malformed-file cases, which the C test writes itself.

Usage (torch, torchvision, numpy, Pillow; scripts/setup-reference.sh builds such a Python):
  python tests/ref/gen_images_ref.py --out tests/ref/images [--fashion DIR]
Pillow must be linked to the same libjpeg as levi (Debian's libjpeg62-turbo) for the JPEG
outputs to match bit for bit; the script records Pillow's libjpeg version.
"""
import argparse
import gzip
import hashlib
import io
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, features


def test_image():
    """A garment-like blob with edges and texture, as 0..255 bytes (deterministic)."""
    y, x = np.mgrid[0:28, 0:28].astype(np.float64)
    blob = np.exp(-(((x - 14) / 8) ** 2 + ((y - 13) / 10) ** 2))
    stripes = 0.25 * (np.sin(x * 1.3) * np.cos(y * 0.7))
    rng = np.random.default_rng(7)
    img = np.clip(blob + stripes * blob + 0.05 * rng.standard_normal((28, 28)), 0, 1)
    img[3:6, 4:24] = 1.0  # a hard edge
    return np.round(img * 255).astype(np.uint8)


def f32list(t):
    return [float(v) for v in t.reshape(-1).tolist()]


def jpeg_round_trip(u8, quality):
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fashion", help="folder with the Fashion-MNIST idx .gz files")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    u8 = test_image()
    x = torch.from_numpy(u8.astype(np.float32) / 255.0)[None, None]  # [1, 1, 28, 28]
    ref = {"image_u8": [int(v) for v in u8.reshape(-1)], "h": 28, "w": 28}

    def bil(t, oh, ow):
        return F.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False)

    ref["bilinear_61x45"] = f32list(bil(x, 61, 45))
    ref["bilinear_13x9"] = f32list(bil(x, 13, 9))
    ref["area_7x7"] = f32list(F.interpolate(x, size=(7, 7), mode="area"))
    ref["area_14x4"] = f32list(F.interpolate(x, size=(14, 4), mode="area"))
    ref["down_up_4"] = f32list(bil(F.interpolate(x, size=(7, 7), mode="area"), 28, 28).clamp(0, 1))
    ref["down_up_2"] = f32list(bil(F.interpolate(x, size=(14, 14), mode="area"), 28, 28).clamp(0, 1))
    for s in (0.8, 1.5):
        k = 2 * math.ceil(3 * s) + 1
        ref["blur_%g" % s] = f32list(TF.gaussian_blur(x[0], [k, k], [s, s]).clamp(0, 1))
    for q in (10, 50, 95):
        ref["jpeg_%d" % q] = [int(v) for v in jpeg_round_trip(u8, q).reshape(-1)]
    ref["pillow_libjpeg"] = str(features.version("jpg"))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    prep = (bil(x, 32, 32)[0].repeat(3, 1, 1) - mean) / std
    ref["prep_32_imagenet"] = f32list(prep)

    if a.fashion:
        fm = {}
        for split, n in (("train", 60000), ("t10k", 10000)):
            with gzip.open(os.path.join(a.fashion, "%s-images-idx3-ubyte.gz" % split)) as f:
                img = f.read()[16:]
            with gzip.open(os.path.join(a.fashion, "%s-labels-idx1-ubyte.gz" % split)) as f:
                lab = f.read()[8:]
            assert len(img) == n * 784 and len(lab) == n
            fm[split] = {"n": n, "pixels_sha256": hashlib.sha256(img).hexdigest(),
                         "labels_sha256": hashlib.sha256(lab).hexdigest(),
                         "first_labels": list(lab[:10]),
                         "class_counts": np.bincount(np.frombuffer(lab, np.uint8), minlength=10).tolist()}
        ref["fashion_mnist"] = fm

    with open(os.path.join(a.out, "transforms.json"), "w") as f:
        json.dump(ref, f)
        f.write("\n")


if __name__ == "__main__":
    main()
