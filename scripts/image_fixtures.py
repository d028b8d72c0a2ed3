"""Fixtures for the image decoder's test, written with Pillow, independently of layerwise.

    python scripts/image_fixtures.py OUT_DIR

Writes a smooth 333x250 RGB image as `photo.png` (lossless) and `photo.jpg` (quality 92),
and what torchvision's PIL path makes of them, as raw uint8 planes (channels x 24 x 24):

- `whole.u8`: the PNG resized to 24x24 with PIL's bilinear filter (torchvision's
  `Resize((24, 24))`);
- `centre.u8`: the centre square that stays when the shorter side is resized to
  round(24 * 256 / 224) = 27 and 24x24 are kept, resized in one pass from its fractional
  window (PIL's `resize(box=...)`). torchvision's `Resize(27)` + `CenterCrop(24)` rounds
  the resized width (35 for 35.96) and the crop's offsets to whole pixels: its result is
  up to half an output pixel off this one, and 3% narrower;
- `jpeg.u8`: the JPEG decoded by PIL (libjpeg), resized to 24x24 as `whole.u8` is.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def planes(img):
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)).tobytes()


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    w, h = 333, 250
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([
        128 + 100 * np.sin(x / 37.0) * np.cos(y / 53.0),
        128 + 90 * np.sin((x + 2 * y) / 61.0),
        40 + 200 * x / w,
    ], axis=2).clip(0, 255).astype(np.uint8)
    photo = Image.fromarray(rgb, "RGB")
    photo.save(out / "photo.png")
    photo.save(out / "photo.jpg", quality=92)
    (out / "whole.u8").write_bytes(planes(photo.resize((24, 24), Image.BILINEAR)))
    side = round(24 * 256 / 224)
    shown = 24 * min(w, h) / side  # the kept square's side, in source pixels
    left, top = (w - shown) / 2, (h - shown) / 2
    centre = photo.resize((24, 24), Image.BILINEAR, box=(left, top, left + shown, top + shown))
    (out / "centre.u8").write_bytes(planes(centre))
    jpeg = Image.open(out / "photo.jpg")
    (out / "jpeg.u8").write_bytes(planes(jpeg.resize((24, 24), Image.BILINEAR)))


if __name__ == "__main__":
    main()
