"""Any photo or scan of one handwritten digit -> the 28x28 input MNIST would have made of it.

`preprocess` redoes to any photo what LeCun et al. did to the NIST scans to make MNIST: white
ink on black, the digit's longer side scaled to 20 px with anti-aliasing, then placed in a
28x28 field so that its centre of mass is at the centre. predict.py and inference.ipynb both
use it, so they feed the model the same pixels.

It expects one digit per image, covering less than half of it. Ruled lines that cross the
digit join it; a stroke touching the image edge is dropped when the rest of the digit does
not touch it (crop with a margin, or tightly all round).

Large images are decoded reduced: a JPEG at 1/2 to 1/8 scale, anything else averaged down by a
whole factor as soon as it is decoded, so memory holds the decoded file and little more.
"""

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from capslab.errors import UserError, first_line
from capslab.imagefolder import deep_gray, is_deep

MAX_SIDE = 1000  # work at most at this size: a 20 px digit needs no 4000 px photo
REDUCE_BAND = 64  # rows of the reduced image made at a time from a large one
AVERAGEABLE_MODES = {"L", "LA", "RGB", "RGBA", "I", "F"}  # Image.reduce averages these right
MNIST_SIDE = 28  # the model's input field
MNIST_BOX = 20  # MNIST scaled each digit's longer side to 20 px ...
MNIST_CENTRE = 14.0  # ... and shifted it by whole pixels to put its centre of mass here
MIN_CONTRAST = 0.1  # ink must stand out by 10% of full scale ...
NOISE_MARGIN = 8.0  # ... and by 8 noise standard deviations, else the image is blank
INK_LEVEL = 0.5  # a pixel is ink where it reaches half the contrast
FAINT_LEVEL = 0.2  # ... and faint ink connected to it belongs to the digit too
MIN_PART = 0.1  # ink components under 10% of the largest are specks (a 5's top bar is ~20%)
MIN_DIGIT_AREA = 1e-4  # the largest component must cover 0.01% of the image, else it is a speck
THIN_STROKE = 1.5  # MNIST's strokes are 1.6 to 3.9 px wide at 20 px (5th to 95th percentile) ...
MNIST_STROKE = 2.2  # ... so thinner pens, which fade away when shrunk, are thickened to this


def source_name(source) -> str:
    """How errors name the image: its path, else "the input" (bytes, file objects, images)."""
    return str(source) if isinstance(source, (str, Path)) else "the input"


def open_image(source) -> Image.Image:
    """Path, bytes, file object or PIL image -> decoded, upright PIL image whose longer side is
    under 2 MAX_SIDE (see `reduced`), or a UserError naming the file."""
    name = source_name(source)
    if isinstance(source, Image.Image):
        return reduced(lightness_if_lab(ImageOps.exif_transpose(source)))  # a copy
    if isinstance(source, (str, Path)):
        check_file(Path(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UserError(f"{name} is empty (0 bytes), not an image")
        source = io.BytesIO(source)
    try:
        return reduced(lightness_if_lab(decode(source)))
    except Image.DecompressionBombError as error:
        raise UserError(f"{name} is too large to decode safely ({first_line(error)})") from error
    except UnidentifiedImageError as error:
        raise UserError(f"{name} is not a readable image (not a format Pillow knows)") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{name} is not a readable image ({first_line(error)})") from error


def decode(file) -> Image.Image:
    """Path or file object -> decoded, upright PIL image; a JPEG at 1/2 to 1/8 scale if large.

    Pillow warns of a decompression bomb above 89 million pixels, and refuses above twice that.
    Below the refusal, the size is safe here (a JPEG decodes reduced, `reduced` averages the
    rest down at once), so the warning is silenced rather than printed.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(file)
        image.draft(image.mode, (MAX_SIDE, MAX_SIDE))  # JPEG only: decode at 1/2 to 1/8 scale
        image.load()  # decode now, so truncated files fail here
    ImageOps.exif_transpose(image, in_place=True)  # phones store "rotate 90" in EXIF, not pixels
    return image


def lightness_if_lab(image: Image.Image) -> Image.Image:
    """A CIELAB image (TIFF can hold one) as its lightness L*: Pillow converts LAB to nothing."""
    return image.getchannel("L") if image.mode == "LAB" else image


def reduced(image: Image.Image) -> Image.Image:
    """A decoded image of 2 MAX_SIDE or more -> averaged down by a whole factor, its longer
    side still at least MAX_SIDE for `shrink` to finish; smaller images as they are.

    A band of rows at a time is converted to a mode whose pixels can be averaged (see
    `averageable_mode`) and reduced, so no full-size copy is made.
    """
    factor = max(image.size) // MAX_SIDE
    if factor < 2:
        return image
    mode = averageable_mode(image)
    width, height = image.size
    small = Image.new(mode, (-(-width // factor), -(-height // factor)))  # sides rounded up
    band = REDUCE_BAND * factor
    for top in range(0, height, band):
        rows = image.crop((0, top, width, min(height, top + band)))
        small.paste(rows.convert(mode).reduce(factor), (0, top // factor))
    return small


def averageable_mode(image: Image.Image) -> str:
    """The image's mode where averaging its pixels means something, else the mode `to_gray`
    would convert it to: bilevel and palette images become gray (RGBA where transparent),
    16-bit ones 32-bit."""
    if image.mode in AVERAGEABLE_MODES:
        return image.mode
    if image.mode.startswith("I"):  # I;16 and its byte orders, which Image.reduce refuses
        return "I"
    return "RGBA" if image.has_transparency_data else "L"


def check_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an image")
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes), not an image")


def to_gray(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W) float32 in [0, 1], 0 black; transparent areas become white paper."""
    if is_deep(image.mode):  # 16-bit, 32-bit and float
        return deep_gray(image)
    if image.has_transparency_data:  # RGBA, LA, PA, or a palette with a transparent colour
        paper = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def resize(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float -> (height, width) float, anti-aliased (PIL filters cover the whole source)."""
    height, width = size
    image = Image.fromarray(values.astype(np.float32))
    shrinking = height * width < values.size
    return np.asarray(image.resize((width, height), Image.BOX if shrinking else Image.BILINEAR))


def shrink(gray: np.ndarray) -> np.ndarray:
    """Downscale so the longer side is at most MAX_SIDE: everything after this is per pixel."""
    scale = MAX_SIDE / max(gray.shape)
    if scale >= 1:
        return gray
    return resize(
        gray, (max(1, round(gray.shape[0] * scale)), max(1, round(gray.shape[1] * scale)))
    )


def ink_map(gray: np.ndarray) -> np.ndarray:
    """(H, W) gray -> (H, W) ink in [0, 1], 0 on the paper. UserError when no ink stands out."""
    noise = 0.0  # a tiny image is a clean digital one, with 1 px strokes a median would erase
    if min(gray.shape) >= 64:  # photo noise and paper grain
        smooth = ndimage.median_filter(gray, size=3)
        noise = 1.4826 * np.median(np.abs(gray - smooth))  # robust std of pixel-to-pixel noise
        gray = smooth
    plane = fit_plane(gray)  # (H, W): a shadow falling across the page
    dark_ink = is_dark_ink(gray - plane)
    ink = top_hat(gray, plane, dark_ink)
    contrast = ink.max()
    if contrast < max(MIN_CONTRAST, NOISE_MARGIN * noise):
        raise UserError("the image is blank (nothing stands out from the background)")
    return np.clip(ink / contrast, 0, 1)


def top_hat(gray: np.ndarray, plane: np.ndarray, dark_ink: bool) -> np.ndarray:
    """(H, W) gray and its fitted plane -> (H, W) ink, positive, the paper at ~0 even under
    shadows and gradients.

    The plane takes out a shadow falling across the page. The opening of what is left is
    that image with every bright structure narrower than the window removed: subtracting it
    keeps the strokes and cancels uneven lighting and paper edges.
    """
    ink_up = 1.0 - gray if dark_ink else gray  # (H, W), ink brighter than the paper
    plane = 1.0 - plane if dark_ink else plane  # the plane of 1 - gray is 1 - the plane of gray
    window = max(15, max(gray.shape) // 2)  # wider than any stroke, even in a tightly cropped photo
    background = plane + ndimage.grey_opening(ink_up - plane, size=window)  # (H, W), the paper
    ink = ink_up - background
    if dark_ink:  # a shadow dims paper and ink alike: measure ink against the paper's brightness
        ink /= np.maximum(1.0 - background, 0.1)
    # The opening follows the noise's troughs: put the paper back at 0. Its lower quartile,
    # as ink may cover up to half of a tightly cropped photo.
    return ink - np.percentile(ink, 25)


def fit_plane(gray: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W): the least-squares plane a + b row + c col, fitted on a 200 px grid."""
    step = max(1, max(gray.shape) // 200)
    rows = np.arange(gray.shape[0])[:, None] / max(gray.shape)  # (H, 1)
    cols = np.arange(gray.shape[1])[None, :] / max(gray.shape)  # (1, W)
    ones = np.ones_like(gray[::step, ::step])
    design = np.stack([ones, ones * rows[::step], ones * cols[:, ::step]], axis=-1).reshape(
        -1, 3
    )  # (N, 3)
    offset, slope_rows, slope_cols = np.linalg.lstsq(
        design, gray[::step, ::step].ravel(), rcond=None
    )[0]
    return offset + slope_rows * rows + slope_cols * cols


def is_dark_ink(flat: np.ndarray) -> bool:
    """Polarity of (H, W) gray minus its fitted plane. Most pixels are paper, so the ink is the
    tail that reaches furthest from the median.
    """
    middle = np.median(flat)
    return middle - flat.min() > flat.max() - middle


def digit_mask(ink: np.ndarray) -> np.ndarray:
    """(H, W) ink -> (H, W) bool: the ink components that make up the digit, without specks.

    Components touching the image border (paper edges, a table, a finger) are dropped when a
    component of a digit's size lies inside; in a tightly cropped photo all of them touch it.
    The mask then grows into the faint ink connected to it, so thin stroke ends stay.
    """
    labels, count = ndimage.label(ink >= INK_LEVEL, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)  # (count + 1,), 0 is the paper
    min_area = max(2, MIN_DIGIT_AREA * ink.size)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = np.setdiff1d(np.arange(1, count + 1), border)
    candidates = (
        inside if len(inside) and areas[inside].max() >= min_area else np.arange(1, count + 1)
    )
    largest = areas[candidates].max(initial=0)
    if largest < min_area:
        raise UserError("the image holds only specks of ink")
    strong = np.isin(labels, candidates[areas[candidates] >= MIN_PART * largest])
    faint, _ = ndimage.label(ink >= FAINT_LEVEL, structure=np.ones((3, 3)))
    return np.isin(faint, np.unique(faint[strong]))


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in px: a stroke of width w and length L has area wL and outline 2L."""
    outline = mask & ~ndimage.binary_erosion(mask)
    return 2.0 * mask.sum() / max(1, outline.sum())


def crop_digit(ink: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The digit's ink alone, cropped to its bounding box, a thin pen's strokes thickened."""
    rows, cols = np.nonzero(mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    crop = np.where(mask, ink, 0.0)[box]
    px_per_mnist = max(crop.shape) / MNIST_BOX  # working pixels per pixel of the 20 px box
    width = stroke_width(crop >= INK_LEVEL) / px_per_mnist  # at the 20 px scale
    grow = int(round((MNIST_STROKE - width) * px_per_mnist))
    if width < THIN_STROKE and grow >= 2:
        crop = np.pad(crop, grow)  # room for the strokes to grow outwards
        crop = ndimage.grey_dilation(crop, footprint=disk(grow))
    return crop


def disk(diameter: int) -> np.ndarray:
    radius = (diameter - 1) / 2
    y, x = np.ogrid[:diameter, :diameter]
    return (y - radius) ** 2 + (x - radius) ** 2 <= radius**2 + 0.5


def to_mnist(crop: np.ndarray) -> np.ndarray:
    """Cropped digit (h, w) -> (28, 28): longer side 20 px, centre of mass at (14, 14)."""
    scale = MNIST_BOX / max(crop.shape)
    height, width = (max(1, round(side * scale)) for side in crop.shape)
    digit = np.clip(resize(crop, (height, width)), 0, 1)
    com_row, com_col = ndimage.center_of_mass(digit)
    # Whole-pixel shifts as MNIST did, clamped so the digit stays inside the field.
    top = int(np.clip(round(MNIST_CENTRE - com_row), 0, MNIST_SIDE - height))
    left = int(np.clip(round(MNIST_CENTRE - com_col), 0, MNIST_SIDE - width))
    field = np.zeros((MNIST_SIDE, MNIST_SIDE), dtype=np.float32)
    field[top : top + height, left : left + width] = digit
    return field


def preprocess(source) -> torch.Tensor:
    """A photo or scan of one handwritten digit -> (28, 28) float tensor in [0, 1], MNIST style.

    `source` is a path, bytes, a file object or a PIL image. Raises UserError (one line, which
    names the file) for anything that is not a readable image or holds no digit: it never
    returns a guess.
    """
    gray = shrink(to_gray(open_image(source)))  # (H, W), H and W <= MAX_SIDE
    try:
        ink = ink_map(gray)  # (H, W), white ink on black
        mask = digit_mask(ink)  # (H, W)
    except UserError as error:
        raise UserError(f"{source_name(source)} holds no digit: {error}") from error
    return torch.from_numpy(to_mnist(crop_digit(ink, mask)))  # (28, 28)
