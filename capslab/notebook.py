"""What inference.ipynb shows, so that each of its cells is a few lines: the prediction figure
with its evidence map and colour key, the upload button, the canvas's output, the capsule
sliders beside the digit and its reconstruction, and the paper's Figure 4 grid. The sliders
and the grid follow the latest digit shown (`DigitViewer.follow`).

Figures are drawn FIGURE_WIDTH px wide at DPI, with no text under MIN_FONT_PT (10 pt is 14 px
at 100 dpi), so JupyterLab shows them at their own size and the text stays legible even when
a narrow window scales them down. The drawing canvas, which needs anywidget, is in canvas.py.
"""

from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import torch
from IPython.display import Image, display
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from capslab.data import CLASS_NAMES
from capslab.errors import UserError
from capslab.inference import (
    PERTURBATIONS,
    classify,
    decode_capsule,
    dimension_effects,
    evidence_map,
    grid_extent,
    perturbed_reconstructions,
    receptive_field,
    to_png,
)
from capslab.preprocess import open_image, preprocess, to_gray
from CapsNet import CapsNetConfig

DPI = 100
FIGURE_WIDTH = 900  # px: fits JupyterLab's output area beside a sidebar on a 1280 px screen
MIN_FONT_PT = 10
SLIDER_RANGE = 0.5  # each slider adds -0.5..+0.5 to its dimension of the capsule
IMAGE_SIDE = "140px"  # the sliders' digit and reconstruction: 28 px at 5x, square


def figure_png(figure: Figure) -> bytes:
    """Render the figure now, before anything is printed: in an upload callback (ipykernel 7,
    JupyterLab 4.6), a figure drawn after a print into the Output widget came out blank."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def original_for_display(source) -> np.ndarray:
    """The upright photo as matplotlib can draw it (16-bit scans as grey levels)."""
    image = open_image(source)
    if image.mode.startswith(("I", "F")):
        return to_gray(image)
    return np.asarray(image.convert("RGBA"))


def draw_evidence(figure: Figure, axis, config: CapsNetConfig, image28, evidence) -> None:
    """The (6, 6) agreement map over the input, each cell at the centre of its receptive field,
    with a colour key; dashed: the 17x17 pixels the strongest cell sees."""
    low, high = grid_extent(config)
    limit = float(evidence.abs().max()) or 1.0  # colours scaled to this image's strongest cell
    axis.imshow(image28.numpy(), cmap="gray", vmin=0, vmax=1)
    opacity = 0.25 + 0.65 * evidence.abs().numpy() / limit  # (6, 6): the input shows through
    key = ScalarMappable(Normalize(-limit, limit), "RdBu_r")  # white at 0
    axis.imshow(
        evidence.numpy(), cmap=key.cmap, norm=key.norm, alpha=opacity, extent=(low, high, high, low)
    )
    top, left, side = receptive_field(config, *divmod(int(evidence.argmax()), len(evidence)))
    axis.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False, ls="--", ec="gold"))
    axis.set(xlim=(-0.5, 27.5), ylim=(27.5, -0.5))
    bar = figure.colorbar(key, ax=axis, ticks=[-limit, 0, limit], fraction=0.08, pad=0.04)
    bar.ax.set_yticklabels(["against", "0", "for"], fontsize=MIN_FONT_PT)


def prediction_figure(
    source, image28, result: dict, evidence, config, class_names=CLASS_NAMES["mnist"]
) -> Figure:
    """One row: the photo, the 28x28 model input, the capsule lengths (titled with the
    prediction), the reconstruction and the evidence map. The printed line names the image."""
    figure = Figure(figsize=(FIGURE_WIDTH / DPI, 2.1), dpi=DPI, layout="constrained")
    axes = figure.subplots(1, 5, width_ratios=[1, 1, 1.7, 1, 1.25])
    axes[0].imshow(original_for_display(source), cmap="gray", vmin=0, vmax=1)
    axes[1].imshow(image28.numpy(), cmap="gray", vmin=0, vmax=1)
    winner = result["class_index"]
    colours = ["C1" if k == winner else "C0" for k in range(len(result["lengths"]))]
    axes[2].bar(range(len(colours)), result["lengths"], color=colours, tick_label=class_names)
    axes[2].set_ylim(0, 1)
    axes[2].tick_params(labelsize=MIN_FONT_PT)
    axes[3].imshow(result["reconstruction"].numpy(), cmap="gray", vmin=0, vmax=1)
    draw_evidence(figure, axes[4], config, image28, evidence)
    label, confidence = result["label"], result["confidence"]
    titles = ["photo", "model input", f"predicted {label} ({confidence:.2f})", "reconstruction"]
    for axis, title in zip(axes, [*titles, "evidence"]):
        axis.set_title(title, fontsize=MIN_FONT_PT + 1)
        if axis is not axes[2]:
            axis.axis("off")
    return figure


def show_prediction(model, name: str, source, class_names=CLASS_NAMES["mnist"]) -> dict | None:
    """Preprocess, classify and plot one image (a path or the bytes of a file); prints one line,
    or an error line for an image with no digit. Returns the result with name and image28."""
    try:
        image28 = preprocess(source)
    except UserError as error:
        print(f"{name}: error: {error}")
        return None
    result = classify(model, image28, class_names)
    evidence = evidence_map(model, image28)
    figure = prediction_figure(source, image28, result, evidence, model.config, class_names)
    picture = figure_png(figure)
    print(
        f"{name}: predicted {result['label']}  "
        f"(confidence {result['confidence']:.3f} = length of the winning capsule)"
    )
    display(Image(picture))
    return {"name": name, "image28": image28, **result}


class DigitViewer:
    """Shows predictions, and hands the latest digit shown to the cells that follow it."""

    def __init__(self, model, class_names=CLASS_NAMES["mnist"]):
        self.model, self.class_names = model, class_names
        self.latest: dict | None = None
        self.followers: list[Callable[[dict], None]] = []

    def show(self, name: str, source) -> dict | None:
        """Show one image (a path or a file's bytes); it becomes the latest digit."""
        result = show_prediction(self.model, name, source, self.class_names)
        if result:
            self.make_latest(result)
        return result

    def show_samples(self, paths: list[Path]) -> None:
        """Show each; the first becomes the latest digit unless there is one already."""
        for path in paths:
            result = show_prediction(self.model, path.name, path, self.class_names)
            if result and self.latest is None:
                self.make_latest(result)

    def make_latest(self, result: dict) -> None:
        self.latest = result
        for follower in self.followers:
            follower(result)

    def follow(self, callback: Callable[[dict], None]) -> None:
        """Call `callback(result)` for the latest digit now and for each digit shown later."""
        self.followers.append(callback)
        if self.latest:
            callback(self.latest)


def more_samples(paths: list[Path], show_samples: Callable[[list[Path]], None]) -> widgets.VBox:
    """A button that shows the other samples below it, once."""
    button = widgets.Button(description=f"Show the other {len(paths)} samples")
    button.layout.width = "auto"
    output = widgets.Output()

    def on_click(_):
        button.disabled = True
        with output:
            show_samples(paths)

    button.on_click(on_click)
    return widgets.VBox([button, output])


def upload_box(show: Callable[[str, bytes], object]) -> widgets.VBox:
    """An upload button for one or several images, each shown by `show(name, bytes)` below it."""
    upload = widgets.FileUpload(accept="image/*", multiple=True, description="Upload digits")
    output = widgets.Output()

    def on_upload(change):
        """ipywidgets 8: the value is a tuple of dicts with name, type, size, content."""
        if not change["new"]:
            return  # the reset below
        output.clear_output()
        with output:
            for file in change["new"]:
                show(file["name"], bytes(file["content"]))
        # Empty it, or uploading the same file again leaves the value as it was, and traitlets
        # calls no observer for a value that did not change.
        upload.value = ()

    upload.observe(on_upload, names="value")
    return widgets.VBox([upload, output])


def drawing_box(canvas: widgets.DOMWidget, show: Callable[[str, bytes], object]) -> widgets.VBox:
    """The canvas, and below it the prediction for the drawing each time a stroke ends."""
    output = widgets.Output()

    def on_stroke(change):
        """A stroke ended, or Clear emptied the canvas (b"")."""
        output.clear_output(wait=bool(change["new"]))  # swap figures without a flicker
        if change["new"]:
            with output:
                show("drawing", change["new"])

    canvas.observe(on_stroke, names="png")
    return widgets.VBox([canvas, output])


def square_image(css_class: str, side: str = IMAGE_SIDE) -> widgets.Image:
    """A PNG widget held square: in a flex box, an image otherwise stretches to the box."""
    layout = widgets.Layout(width=side, height=side, object_fit="contain", flex="0 0 auto")
    return widgets.Image(format="png", layout=layout).add_class(css_class)


def captioned(image: widgets.Image, caption: str) -> widgets.VBox:
    return widgets.VBox([image, widgets.Label(caption)], layout={"align_items": "center"})


class CapsuleSliders:
    """One slider per dimension of the latest digit's winning capsule, each adding -0.5..+0.5
    to that dimension; the decoder redraws the capsule as it stands beside the digit itself.
    The handle of the dimension that moves the reconstruction most (Figure 4's ±0.25) is orange.
    """

    def __init__(self, model):
        self.model = model
        style = {"description_width": "52px"}  # fits "dim 15"
        self.sliders = [
            widgets.FloatSlider(
                min=-SLIDER_RANGE,
                max=SLIDER_RANGE,
                step=0.01,
                description=f"dim {dim}",
                readout_format="+.2f",
                style=style,
                layout={"width": "330px"},
            )
            for dim in range(model.config.digit_dim)
        ]
        self.digit = square_image("capsule-digit")
        self.reconstruction = square_image("capsule-reconstruction")
        self.caption = widgets.HTML().add_class("capsule-caption")
        reset = widgets.Button(description="Reset")
        reset.on_click(lambda _: self.reset())
        self.result: dict | None = None
        self.holding = False  # while the sliders are set together, redraw once at the end
        for slider in self.sliders:
            slider.observe(self.redraw, names="value")
        images = widgets.HBox(
            [captioned(self.digit, "digit"), captioned(self.reconstruction, "reconstruction")]
        )
        grid = widgets.GridBox(self.sliders, layout={"grid_template_columns": "repeat(2, 330px)"})
        top = widgets.HBox(
            [images, grid.add_class("capsule-sliders")], layout={"align_items": "flex-start"}
        )
        self.widget = widgets.VBox([top, widgets.HBox([reset, self.caption])])

    def capsule(self) -> torch.Tensor:
        """(16,): the winning capsule plus the sliders' offsets."""
        offsets = torch.tensor([slider.value for slider in self.sliders])
        return self.result["capsule"] + offsets

    def redraw(self, _=None) -> None:
        if not self.holding and self.result:
            image = decode_capsule(self.model, self.capsule(), self.result["class_index"])
            self.reconstruction.value = to_png(image)

    def reset(self) -> None:
        self.holding = True
        for slider in self.sliders:
            slider.value = 0.0
        self.holding = False
        self.redraw()

    def show(self, result: dict) -> None:
        """Hold `result`'s winning capsule, every offset at 0."""
        self.result = result
        effects = dimension_effects(self.model, result["capsule"], result["class_index"])  # (16,)
        top = int(effects.argmax())
        for dim, slider in enumerate(self.sliders):
            slider.style.handle_color = "orange" if dim == top else None
        self.digit.value = to_png(result["image28"])
        self.reset()
        self.caption.value = (
            f"{result['name']}, capsule {result['label']}: dimension {top} changes the "
            f"reconstruction most (L2 {effects[top]:.2f} at ±0.25; median {effects.median():.2f})"
        )


def perturbation_figure(model, result: dict) -> Figure:
    """Figure 4 of the paper, turned to fit the width: column d adds each of PERTURBATIONS
    (one per row) to dimension d of the winning capsule; the middle row is the capsule itself."""
    grid = perturbed_reconstructions(model, result["capsule"], result["class_index"])
    dims, steps, height, width = grid.shape  # (16, D, 28, 28)
    mosaic = grid.permute(1, 2, 0, 3).reshape(steps * height, dims * width)  # (D*28, 16*28)
    side = (FIGURE_WIDTH / DPI - 1.0) / dims  # in per 28x28 image, leaving room for labels
    figure = Figure(figsize=(FIGURE_WIDTH / DPI, steps * side + 0.9), dpi=DPI, layout="constrained")
    axis = figure.subplots()
    axis.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1)
    axis.set_xticks(np.arange(dims) * width + width / 2, [str(d) for d in range(dims)])
    axis.set_yticks(np.arange(steps) * height + height / 2, [f"{d:+.2f}" for d in PERTURBATIONS])
    axis.tick_params(labelsize=MIN_FONT_PT, length=0)
    axis.set_xlabel("dimension of the capsule", fontsize=MIN_FONT_PT + 1)
    axis.set_ylabel("added to it", fontsize=MIN_FONT_PT + 1)
    axis.set_title(f"{result['name']}: capsule {result['label']}", fontsize=12)
    return figure


class PerturbationGrid:
    """Figure 4 for the latest digit, redrawn as each new digit is shown."""

    def __init__(self, model):
        self.model = model
        self.image = widgets.Image(format="png", layout={"max_width": "100%", "height": "auto"})
        self.widget = self.image.add_class("figure-4")

    def show(self, result: dict) -> None:
        self.image.value = figure_png(perturbation_figure(self.model, result))
