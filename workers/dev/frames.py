"""Synthetic camera frames: a bright bird-shaped blob of known area on a darker, noisy floor.

Used by the simulator, the inference benchmark and the tests (which compare
the model's weight with the law applied to the known area).
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Frame:
    data: bytes
    area_px: int        # bird pixels as drawn (before JPEG)
    width: int
    height: int

    @property
    def area_fraction(self) -> float:
        return self.area_px / (self.width * self.height)


def bird_frame(width: int = 640, height: int = 480, *, scale: float = 1.0, seed: int = 0,
               fmt: str = "JPEG", quality: int = 90) -> Frame:
    """A top view of a bird: body ellipse, head circle, tail wedge; `scale` grows it."""
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    rx, ry = 0.17 * width * scale, 0.15 * height * scale
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    hr = 0.35 * ry
    draw.ellipse((cx + rx - hr, cy - hr - 0.3 * ry, cx + rx + hr, cy + hr - 0.3 * ry), fill=255)
    draw.polygon([(cx - rx + 2, cy - 0.4 * ry), (cx - rx - 0.4 * ry, cy), (cx - rx + 2, cy + 0.4 * ry)],
                 fill=255)
    bird = np.asarray(mask) > 0
    floor = rng.integers(35, 85, size=(height, width, 3), dtype=np.uint8)
    feathers = rng.integers(205, 245, size=(height, width, 3), dtype=np.uint8)
    pixels = np.where(bird[..., None], feathers, floor)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return Frame(out.getvalue(), int(bird.sum()), width, height)
