#!/usr/bin/env python3
"""Draws the app icon and the four tray icons (serving, paused, error, offline).

Run once after changing the artwork, then `npx tauri icon icons/icon.png -o icons` (from ui/)
for the bundle sizes. The PNGs are committed, so builds need neither Python nor Pillow.
"""
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "icons"
INK = (18, 24, 38, 255)
COLOURS = {
    "serving": (34, 197, 94, 255),
    "paused": (245, 158, 11, 255),
    "error": (239, 68, 68, 255),
    "offline": (148, 163, 184, 255),
}


def mark(size: int, accent, background=True) -> Image.Image:
    """Three stacked shards (layers) joined by a link: the swarm serving a model layer by layer."""
    scale = 4
    s = size * scale
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    if background:
        d.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 5, fill=INK)
    pad = s * (0.2 if background else 0.06)
    width = s - 2 * pad
    bar = width / 4.2
    gap = (width - 3 * bar) / 2
    for i in range(3):
        top = pad + i * (bar + gap)
        left = pad + (i % 2) * width * 0.12
        right = left + width * 0.88
        colour = accent if i == 1 else (226, 232, 240, 255)
        d.rounded_rectangle((left, top, right, top + bar), radius=bar / 2.5, fill=colour)
    img = img.resize((size, size), Image.LANCZOS)
    return img


def main() -> None:
    OUT.mkdir(exist_ok=True)
    mark(1024, COLOURS["serving"]).save(OUT / "icon.png")
    for state, colour in COLOURS.items():
        tray = mark(64, colour)
        tray.save(OUT / f"tray-{state}.png")


if __name__ == "__main__":
    main()
