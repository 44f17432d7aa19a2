"""Make the bundled sample images: handwritten digits as they come from a phone or a scanner.

    python -m samples.make_samples --data-dir ../shared/data

Ten samples are MNIST *test* digits (never trained on), one per class, each the first test
image of its class. Each is turned into a "photo": scaled up, drawn as dark ink on off-white
paper (or chalk on a board), with uneven lighting, paper grain, noise, a slight rotation and
a random place on a larger page. Each is saved in a different way that predict.py must
handle: JPEG, PNG with alpha, 16-bit PNG, palette PNG, EXIF-rotated JPEG. Two more digits are
drawn with a thin pen from jittered polylines, so they are not MNIST at all.
The output is deterministic: every sample has its own seed.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from capslab.data import DATA_DIR, load_split

HERE = Path(__file__).parent
PAPER = (236, 232, 220)  # off-white
BLUE_INK = (30, 40, 110)
PENCIL = (95, 95, 100)
# name -> (digit, page (width, height), digit height px, rotation degrees, how it is saved)
MNIST_SAMPLES = {
    "0_phone_photo.jpg": (0, (1200, 900), 420, -6, "jpeg"),
    "1_transparent_ink.png": (1, (500, 500), 300, 4, "rgba"),
    "2_scan_16bit.png": (2, (700, 900), 380, 2, "16bit"),
    "3_palette.png": (3, (640, 480), 260, -3, "palette"),
    "4_exif_rotated.jpg": (4, (800, 600), 330, 5, "exif"),
    "5_pencil_shadow.jpg": (5, (900, 700), 360, -4, "pencil"),
    "6_small_in_big_page.jpg": (6, (2000, 1500), 260, 8, "jpeg"),
    "7_blue_ballpoint.jpg": (7, (640, 800), 400, -2, "jpeg"),
    "8_dark_table.jpg": (8, (900, 700), 330, 3, "table"),
    "9_chalkboard.jpg": (9, (600, 500), 320, -5, "chalk"),
}
# name -> strokes, each a polyline in [0, 1] coordinates of the digit's box (x right, y down)
DRAWN_SAMPLES = {
    "7_thin_pen_drawn.jpg": [
        [(0.1, 0.08), (0.9, 0.06), (0.62, 0.45), (0.42, 0.95)],
        [(0.35, 0.5), (0.8, 0.48)],
    ],
    "4_thin_pen_drawn.jpg": [[(0.55, 0.05), (0.12, 0.62), (0.9, 0.62)], [(0.7, 0.3), (0.68, 0.97)]],
}


def lighting(size: tuple[int, int], strength: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 1) brightness factor: a linear shadow across the page in a random direction."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = x * np.cos(angle) + y * np.sin(angle)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    return (1.0 - strength * ramp)[..., None]


def page(size: tuple[int, int], colour, shadow: float, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float page: a colour, a shadow and paper grain (blurred noise)."""
    width, height = size
    grain = Image.fromarray(rng.normal(128, 40, (height, width)).clip(0, 255).astype(np.uint8))
    grain = (
        np.asarray(grain.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)[..., None] - 128
    )
    return (np.array(colour, dtype=np.float32) + 0.15 * grain) * lighting(size, shadow, rng)


def mnist_ink(digit28: np.ndarray, height: int, angle: float) -> Image.Image:
    """MNIST digit (28, 28) uint8 -> ink coverage as an 'L' image, scaled and rotated."""
    ink = Image.fromarray(digit28).resize((height, height), Image.BICUBIC)
    return ink.rotate(angle, resample=Image.BICUBIC, expand=True)


def drawn_ink(strokes, height: int, rng: np.random.Generator) -> Image.Image:
    """Polylines with jittered, densified points and a thin pen -> ink coverage 'L' image."""
    scale = 4  # draw large, then shrink: anti-aliased edges
    side = height * scale
    ink = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(ink)
    for stroke in strokes:
        points = np.concatenate(
            [np.linspace(a, b, 12, endpoint=False) for a, b in zip(stroke, stroke[1:])]
            + [[stroke[-1]]]
        )
        points = points + rng.normal(0, 0.006, points.shape)  # a hand's tremor
        draw.line(
            [tuple(p) for p in (points * side * 0.9 + side * 0.05)],
            fill=255,
            width=3 * scale,
            joint="curve",
        )
    return ink.resize((height, height), Image.LANCZOS)


def place(
    base: np.ndarray, ink: Image.Image, colour, rng: np.random.Generator, strength: float = 1.0
) -> np.ndarray:
    """Lay the ink on the page at a random off-centre place: pixel = page (1 - a) + ink a."""
    height, width = base.shape[:2]
    top = int(rng.integers(0, height - ink.height))
    left = int(rng.integers(0, width - ink.width))
    alpha = np.zeros((height, width, 1), dtype=np.float32)
    alpha[top : top + ink.height, left : left + ink.width, 0] = (
        np.asarray(ink, dtype=np.float32) / 255 * strength
    )
    return base * (1 - alpha) + np.array(colour, dtype=np.float32) * alpha


def camera(pixels: np.ndarray, blur: float, noise: float, rng: np.random.Generator) -> Image.Image:
    """Focus blur and sensor noise -> an RGB image."""
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(blur)
    )
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, pixels.shape)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def on_dark_table(paper: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shrink the sheet and lay it, slightly turned, on a dark wooden table filling the frame."""
    height, width = paper.shape[:2]
    sheet = Image.fromarray(paper.clip(0, 255).astype(np.uint8)).resize(
        (int(width * 0.8), int(height * 0.8))
    )
    mask = Image.new("L", sheet.size, 255).rotate(-3, expand=True)
    sheet = sheet.rotate(-3, expand=True)
    table = page((width, height), (70, 50, 38), 0.3, rng)
    table = Image.fromarray(table.clip(0, 255).astype(np.uint8))
    table.paste(sheet, ((width - sheet.width) // 2 + 25, (height - sheet.height) // 2 - 10), mask)
    return np.asarray(table, dtype=np.float32)


def make_mnist_sample(digit28: np.ndarray, spec, rng: np.random.Generator) -> Image.Image:
    """One MNIST digit -> a photo in the style `spec` names (see MNIST_SAMPLES)."""
    _, size, height, angle, style = spec
    ink = mnist_ink(digit28, height, angle)
    if (
        style == "rgba"
    ):  # a drawing app's export: the digit only in alpha, transparent black around it
        alpha = place(np.zeros((size[1], size[0], 1), dtype=np.float32), ink, (255,), rng)
        rgba = np.concatenate([np.broadcast_to(BLUE_INK, (*alpha.shape[:2], 3)), alpha], axis=2)
        rgba[alpha[..., 0] == 0, :3] = 0
        return Image.fromarray(rgba.astype(np.uint8), "RGBA")
    if style == "chalk":  # light ink on a dark board: the opposite polarity
        board = page(size, (45, 60, 50), 0.25, rng)
        chalk = Image.fromarray(
            (np.asarray(ink) * rng.uniform(0.6, 1.0, ink.size[::-1])).astype(np.uint8)
        )
        return camera(place(board, chalk, (225, 228, 220), rng), 1.2, 5, rng)
    colour, strength = (PENCIL, 0.6) if style == "pencil" else (BLUE_INK, 1.0)
    pixels = place(
        page(size, PAPER, 0.45 if style == "pencil" else 0.25, rng), ink, colour, rng, strength
    )
    if style == "table":
        pixels = on_dark_table(pixels, rng)
    return camera(pixels, 1.5, 6, rng)


def save(image: Image.Image, path: Path, style: str) -> None:
    """Save in the format the style is about."""
    if style == "16bit":  # a scanner's 16-bit grayscale
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255
        Image.fromarray((gray * 65535).astype(np.uint16)).save(path)
    elif style == "palette":
        image.quantize(colors=8).save(path)
    elif (
        style == "exif"
    ):  # pixels stored sideways, EXIF orientation 6 says "turn 90 degrees clockwise"
        exif = Image.Exif()
        exif[0x0112] = 6
        image.rotate(90, expand=True).save(path, quality=85, exif=exif)
    elif path.suffix == ".jpg":
        image.save(path, quality=80)
    else:
        image.save(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Make the sample photos in samples/.")
    parser.add_argument(
        "--data-dir", default=DATA_DIR, help=f"MNIST root, as for train.py (default: {DATA_DIR})"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=HERE, help=f"where to write the images (default: {HERE})"
    )
    args = parser.parse_args(argv)

    test = load_split("mnist", args.data_dir, train=False)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for seed, (name, spec) in enumerate(MNIST_SAMPLES.items()):
        index = int((test.labels == spec[0]).nonzero()[0])  # the first test image of the class
        image = make_mnist_sample(test.images[index].numpy(), spec, np.random.default_rng(seed))
        save(image, args.out_dir / name, spec[-1])
        print(f"{name}  MNIST test index {index}")
    for seed, (name, strokes) in enumerate(DRAWN_SAMPLES.items(), start=len(MNIST_SAMPLES)):
        rng = np.random.default_rng(seed)
        pixels = place(
            page((600, 600), PAPER, 0.2, rng), drawn_ink(strokes, 320, rng), BLUE_INK, rng
        )
        save(camera(pixels, 0.8, 4, rng), args.out_dir / name, "jpeg")
        print(f"{name}  drawn")


if __name__ == "__main__":
    main()
