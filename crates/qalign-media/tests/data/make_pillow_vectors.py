"""Regenerates the Pillow reference vectors in this folder (run with Pillow 10.2.0, which bundles
libjpeg-turbo 3.0.1, the versions the official fixtures were made with):

    python3 make_pillow_vectors.py

Writes small input files under inputs/ and pillow_vectors.json with, for each input,
the SHA-256 of `Image.open(f).convert("RGB")` bytes (and with EXIF orientation applied), and
for the resize inputs the SHA-256 of `img.resize((w, h), filter)` for several sizes/filters.
Inputs are synthetic (seeded noise, gradients, shapes), so the folder stays small.
"""

import hashlib
import io
import json
import os
import struct
import zlib

import numpy as np
import PIL
from PIL import Image, ImageOps, features

HERE = os.path.dirname(os.path.abspath(__file__))
INPUTS = os.path.join(HERE, "inputs")
rng = np.random.default_rng(20240611)


def sha(img):
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


def photo_like(w, h):
    """Smooth gradients plus noise and a few hard edges: exercises IDCT, upsampling, ringing."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 11.0)
    g = 255 * x / max(w - 1, 1)
    b = 255 * ((x // 9 + y // 5) % 2)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def raw_png(w, h, color_type, bit_depth, rows):
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + r for r in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def with_exif_orientation(img, orientation, **save_args):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, exif=exif.tobytes(), **save_args)
    return buf.getvalue()


def main():
    os.makedirs(INPUTS, exist_ok=True)
    files = {}

    def save_bytes(name, data):
        with open(os.path.join(INPUTS, name), "wb") as f:
            f.write(data)
        files[name] = None

    def save(name, img, **kw):
        buf = io.BytesIO()
        img.save(buf, **kw)
        save_bytes(name, buf.getvalue())

    base = Image.fromarray(photo_like(61, 43))
    # JPEG variants: chroma subsampling 4:2:0 / 4:2:2 / 4:4:4, odd sizes, progressive,
    # grayscale, CMYK (Adobe, inverted), restart markers.
    save("q420_61x43.jpg", base, format="JPEG", quality=85, subsampling=2)
    save("q422_61x43.jpg", base, format="JPEG", quality=90, subsampling=1)
    save("q444_61x43.jpg", base, format="JPEG", quality=75, subsampling=0)
    save("progressive_61x43.jpg", base, format="JPEG", quality=80, progressive=True)
    save("gray_61x43.jpg", base.convert("L"), format="JPEG", quality=80)
    save("cmyk_61x43.jpg", base.convert("CMYK"), format="JPEG", quality=90)
    save("restart_61x43.jpg", base, format="JPEG", quality=70, restart_marker_blocks=1)
    save_bytes("exif6_61x43.jpg", with_exif_orientation(base, 6, format="JPEG", quality=85))
    save_bytes("exif3_61x43.png", with_exif_orientation(base, 3, format="PNG"))

    # PNG modes.
    save("palette_trns_40x30.png", base.resize((40, 30)).convert("P", palette=Image.ADAPTIVE, colors=16),
         format="PNG", transparency=3)
    save("la_40x30.png", Image.merge("LA", [base.convert("L").resize((40, 30)), Image.linear_gradient("L").resize((40, 30))]),
         format="PNG")
    save("bilevel_40x30.png", base.convert("1").resize((40, 30)), format="PNG")
    vals = rng.integers(0, 65536, size=(7, 9 * 3), dtype=np.uint16)
    vals[0, :6] = [0, 255, 256, 32767, 32768, 65535]
    save_bytes("rgb16_9x7.png", raw_png(9, 7, 2, 16, [r.astype(">u2").tobytes() for r in vals]))
    vals4 = rng.integers(0, 65536, size=(7, 9 * 4), dtype=np.uint16)
    save_bytes("rgba16_9x7.png", raw_png(9, 7, 6, 16, [r.astype(">u2").tobytes() for r in vals4]))
    g16 = rng.integers(0, 1024, size=(7, 9), dtype=np.uint16)
    g16[0, :4] = [0, 255, 256, 65535]
    save_bytes("gray16_9x7.png", raw_png(9, 7, 0, 16, [r.astype(">u2").tobytes() for r in g16]))
    la16 = rng.integers(0, 65536, size=(7, 9 * 2), dtype=np.uint16)
    save_bytes("graya16_9x7.png", raw_png(9, 7, 4, 16, [r.astype(">u2").tobytes() for r in la16]))

    # Other containers.
    save("rgb_33x21.bmp", base.resize((33, 21)), format="BMP")
    save("rgb_33x21.tiff", base.resize((33, 21)), format="TIFF")
    save("rgba_33x21.tiff", base.resize((33, 21)).convert("RGBA"), format="TIFF")
    save("lossless_33x21.webp", base.resize((33, 21)), format="WEBP", lossless=True)
    save("lossy_33x21.webp", base.resize((33, 21)), format="WEBP", quality=80)
    save("lossy_alpha_33x21.webp", base.resize((33, 21)).convert("RGBA"), format="WEBP", quality=80)

    # GIF: first frame only, transparency ignored by convert("RGB").
    pal = base.resize((30, 20)).convert("P", palette=Image.ADAPTIVE, colors=8)
    frames = [pal, pal.transpose(Image.FLIP_LEFT_RIGHT)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], transparency=2, duration=100)
    save_bytes("anim_30x20.gif", buf.getvalue())

    # GIF whose first frame covers only part of the logical screen (Pillow grows/fills the
    # canvas): a Pillow-written frame with the screen and frame offset patched.
    small_rng = np.random.default_rng(7)
    small = Image.fromarray(small_rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    small = small.convert("P", palette=Image.ADAPTIVE, colors=8)
    for label, extra in (("opaque", {}), ("transparent", {"transparency": 2})):
        buf = io.BytesIO()
        small.save(buf, format="GIF", **extra)
        data = bytearray(buf.getvalue())
        data[6:10] = struct.pack("<HH", 30, 20)
        descriptor = data.index(0x2C, 13)
        data[descriptor + 1 : descriptor + 5] = struct.pack("<HH", 5, 4)
        save_bytes(f"partial_{label}_30x20.gif", bytes(data))

    # Resize inputs (PNG, lossless) and targets: downscale, upscale, one dimension only, tiny.
    resize_inputs = {
        "resize_noise_37x23.png": Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8)),
        "resize_photo_61x43.png": base,
        "resize_edges_50x50.png": Image.fromarray(
            (np.indices((50, 50)).sum(axis=0) % 7 == 0).astype(np.uint8)[..., None].repeat(3, -1) * 255
        ),
    }
    sizes = [(17, 29), (100, 9), (37, 50), (80, 23), (1, 1), (61, 43), (50, 50), (13, 200), (448, 448), (23, 37)]
    filters = {"lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
    resize = {}
    for name, img in resize_inputs.items():
        img.save(os.path.join(INPUTS, name))
        files[name] = None
        entries = []
        for w, h in sizes:
            for fname, code in filters.items():
                out = img.resize((w, h), resample=code)
                entries.append({"width": w, "height": h, "filter": code, "sha256": sha(out)})
        resize[name] = entries

    decode = {}
    for name in sorted(files):
        with Image.open(os.path.join(INPUTS, name)) as im:
            mode = im.mode
            rgb = im.convert("RGB")
            transposed = ImageOps.exif_transpose(im).convert("RGB")
        decode[name] = {
            "mode": mode,
            "size_wh": list(rgb.size),
            "rgb_sha256": sha(rgb),
            "oriented_size_wh": list(transposed.size),
            "oriented_rgb_sha256": sha(transposed),
        }

    manifest = {
        "pillow_version": PIL.__version__,
        "libjpeg_turbo_version": features.version("libjpeg_turbo"),
        "webp_version": features.version("webp"),
        "decode": decode,
        "resize": resize,
    }
    with open(os.path.join(HERE, "pillow_vectors.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
