"""inference.ipynb's "Two digits at once" section: the latest digit and a second one overlaid
on MultiMNIST's 36x36 canvas, as the paper's section 6 pairs them, and the MultiMNIST CapsNet's
two longest capsules, each drawn by the decoder from its own capsule in its own colour.

The first digit is centred; the second is moved by the sliders' (dy, dx), up to MAX_SHIFT px
each way as each MultiMNIST digit is, and the two are combined by `multimnist.overlay` (add,
then clip). The model loads from checkpoints/capsnet_multimnist.pt or the notebook's path;
until one is trained, `load_pair_model` says so in one sentence and the section shows nothing.
"""

import html
import io
from pathlib import Path

import ipywidgets as widgets
import torch
from PIL import Image

from capslab.checkpoint import has_trained_decoder, load_capsnet
from capslab.data import CLASS_NAMES, to_model_input
from capslab.errors import UserError
from capslab.multimnist import CANVAS, MAX_SHIFT, overlay, place
from capslab.notebook import captioned, square_image
from capslab.preprocess import preprocess
from CapsNet import CapsNet

PAIR_SIDE = "180px"  # the 36x36 canvas at 5x, square
COLOURS = ("#e00000", "#00b000")  # red: the longer capsule; green: the other (as drawn)
NOT_THERE_YET = (
    "The MultiMNIST model is not there yet ({path} does not exist): train one with "
    "python sweep.py results/grids/multimnist.json (or python train.py --dataset multimnist "
    "...), then export it with python export.py runs/sweep/RUN/best.pt "
    "checkpoints/capsnet_multimnist.pt, or set CAPSNET_MULTIMNIST_CHECKPOINT to a checkpoint."
)


def load_pair_model(path: str | Path, device: torch.device) -> CapsNet | None:
    """The MultiMNIST CapsNet at `path` in eval mode; None, after printing one sentence on how
    to make one, when there is no such file. A 28x28 model or one without a trained decoder is
    refused with a UserError."""
    if not Path(path).is_file():
        print(NOT_THERE_YET.format(path=path))
        return None
    model, checkpoint = load_capsnet(path, device)
    side = model.config.image_size
    if side != CANVAS:
        raise UserError(
            f"{path} takes {side}x{side} images; this section needs a CapsNet trained on "
            f"MultiMNIST's {CANVAS}x{CANVAS} pairs (train.py --dataset multimnist)"
        )
    if not has_trained_decoder(checkpoint):
        raise UserError(f"{path} was trained without the reconstruction loss: it draws nothing")
    print(f"MultiMNIST checkpoint {path}")
    return model


def pair_image(first28: torch.Tensor, second28: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Two (28, 28) digits in [0, 1] -> the (36, 36) uint8 canvas: the first centred, the
    second moved dy px down and dx px right, added and clipped as MultiMNIST's pairs are."""
    digits = (torch.stack([first28, second28]).clamp(0, 1) * 255).round().to(torch.uint8)
    placed = place(digits, torch.tensor([[0, 0], [dy, dx]]))  # (2, 36, 36)
    return overlay(placed[:1], placed[1:])[0]  # (36, 36)


@torch.no_grad()
def classify_pair(model: CapsNet, image36: torch.Tensor, class_names=CLASS_NAMES["multimnist"]):
    """(36, 36) canvas -> the two longest capsules, the longer first: their class indices,
    labels, lengths, and the decoder's drawing of each from its own capsule, (2, 36, 36)."""
    device = next(model.parameters()).device
    lengths, _, v = model(to_model_input(image36, device), reconstruct=False)  # (1, J), (1, J, 16)
    top = lengths[0].topk(2)  # the paper's answer for a pair: the two longest capsules
    drawn = [model.decoder(v, index.view(1))[0, 0] for index in top.indices]  # 2 x (36, 36)
    return {
        "class_indices": top.indices.tolist(),
        "labels": [class_names[index] for index in top.indices.tolist()],
        "lengths": top.values.float().cpu().tolist(),
        "reconstructions": torch.stack(drawn).float().cpu(),  # (2, 36, 36)
    }


def two_colour_png(images: torch.Tensor, scale: int = 5) -> bytes:
    """(2, H, W) in [0, 1] -> PNG bytes on black: the first image red, the second green, the
    two yellow where they overlap; each pixel a scale x scale square."""
    red, green = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # (H, W) each
    rgb = torch.stack([red, green, torch.zeros_like(red)], dim=-1).numpy()  # (H, W, 3)
    height, width = red.shape
    picture = Image.fromarray(rgb).resize((width * scale, height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def gray_png(image: torch.Tensor, scale: int = 5) -> bytes:
    """(H, W) uint8 -> PNG bytes, white on black, each pixel a scale x scale square."""
    picture = Image.fromarray(image.numpy())
    picture = picture.resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class TwoDigits:
    """The latest digit and a sample from a list, overlaid with the sliders' offset, beside the
    MultiMNIST model's two reconstructions; redrawn whenever the digit, sample or offset changes.
    """

    def __init__(self, model: CapsNet, samples: list[Path], second: str | None = None):
        self.model = model
        self.samples = {path.name: path for path in samples}
        self.digits: dict[str, torch.Tensor] = {}  # each sample preprocessed once
        self.first: dict | None = None
        self.second = widgets.Dropdown(
            options=list(self.samples), value=second or samples[0].name, description="second"
        )
        self.offsets = [  # (dy, dx) of the second digit
            widgets.IntSlider(0, min=-MAX_SHIFT, max=MAX_SHIFT, description=f"{axis} px")
            for axis in ("down", "right")
        ]
        self.input = square_image("pair-input", PAIR_SIDE)
        self.reconstruction = square_image("pair-reconstruction", PAIR_SIDE)
        self.caption = widgets.HTML().add_class("pair-caption")
        for control in (self.second, *self.offsets):
            control.observe(self.redraw, names="value")
        controls = widgets.VBox([self.second, *self.offsets]).add_class("pair-controls")
        images = [captioned(self.input, "input"), captioned(self.reconstruction, "reconstructions")]
        self.widget = widgets.VBox([widgets.HBox([controls, *images]), self.caption])

    def digit(self, name: str) -> torch.Tensor:
        if name not in self.digits:
            self.digits[name] = preprocess(self.samples[name])
        return self.digits[name]

    def show(self, result: dict) -> None:
        """Make `result` (a DigitViewer result: name, image28) the first digit of the pair."""
        self.first = result
        self.redraw()

    def redraw(self, _=None) -> None:
        if self.first is None:
            return
        dy, dx = (slider.value for slider in self.offsets)
        image36 = pair_image(self.first["image28"], self.digit(self.second.value), dy, dx)
        pair = classify_pair(self.model, image36)
        self.input.value = gray_png(image36)
        self.reconstruction.value = two_colour_png(pair["reconstructions"])
        found = " and ".join(
            f'<b style="color:{colour}">{label}</b> (length {length:.2f})'
            for colour, label, length in zip(COLOURS, pair["labels"], pair["lengths"])
        )
        first = html.escape(self.first["name"])  # an upload's file name
        self.caption.value = (
            f"{first} + {self.second.value} moved {dx:+d} px right, {dy:+d} px down: "
            f"the two longest capsules are {found}"
        )
