"""What inference.ipynb's cells call (capslab/notebook.py, inference.to_png): figures that fit
the notebook, the upload button, the canvas's output, the capsule sliders and Figure 4 that
follow the latest digit. Widgets are driven from Python, as the browser's messages set them."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.text import Text
from PIL import Image

from capslab.canvas import DrawingCanvas
from capslab.checkpoint import load_capsnet
from capslab.inference import (
    classify,
    decode_capsule,
    evidence_map,
    perturbed_reconstructions,
    to_png,
)
from capslab.notebook import (
    DPI,
    FIGURE_WIDTH,
    MIN_FONT_PT,
    SLIDER_RANGE,
    CapsuleSliders,
    DigitViewer,
    PerturbationGrid,
    drawing_box,
    figure_png,
    more_samples,
    perturbation_figure,
    prediction_figure,
    upload_box,
)
from capslab.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted(path for path in (REPO / "samples").iterdir() if path.suffix in {".jpg", ".png"})


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_capsnet(tiny_checkpoint, torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def first_result(tiny_model) -> dict:
    image28 = preprocess(SAMPLES[0])
    return {"name": SAMPLES[0].name, "image28": image28, **classify(tiny_model, image28)}


def png_pixels(png: bytes) -> torch.Tensor:
    """PNG bytes -> (H, W) grey levels 0..255 as floats."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32))


def assert_fits_the_notebook(figure) -> None:
    """At most FIGURE_WIDTH px wide, and every piece of text at least MIN_FONT_PT."""
    width, _ = Image.open(io.BytesIO(figure_png(figure))).size
    assert width <= FIGURE_WIDTH
    texts = [text for text in figure.findobj(Text) if text.get_visible() and text.get_text()]
    small = {text.get_text(): text.get_fontsize() for text in texts}
    small = {text: size for text, size in small.items() if size < MIN_FONT_PT}
    assert not small, small
    assert MIN_FONT_PT * DPI / 72 >= 13  # px, before any scaling down by the browser


def test_to_png_shows_each_pixel_as_a_square():
    image = torch.rand(28, 28)
    pixels = png_pixels(to_png(image, scale=5))  # (140, 140)
    assert pixels.shape == (140, 140)
    assert (pixels[::5, ::5] - image * 255).abs().max() <= 0.5
    assert torch.equal(pixels[4::5, 4::5], pixels[::5, ::5])  # 5x5 squares


def test_predict_py_needs_neither_anywidget_nor_ipywidgets():
    blocked = "import sys; sys.modules.update(anywidget=None, ipywidgets=None); import predict"
    subprocess.run([sys.executable, "-c", blocked], cwd=REPO, check=True)


def test_prediction_figure_fits_and_keys_its_evidence_map(tiny_model, first_result):
    evidence = evidence_map(tiny_model, first_result["image28"])
    figure = prediction_figure(
        SAMPLES[0],
        first_result["image28"],
        first_result,
        evidence,
        tiny_model.config,
    )
    assert_fits_the_notebook(figure)
    key = figure.axes[-1]  # the colour bar, beside the evidence map
    assert [label.get_text() for label in key.get_yticklabels()] == ["against", "0", "for"]


def test_figure_4_fits_the_notebook(tiny_model, first_result):
    assert_fits_the_notebook(perturbation_figure(tiny_model, first_result))


def test_the_sliders_offset_the_capsule_and_redraw_it(tiny_model, first_result):
    sliders = CapsuleSliders(tiny_model)
    sliders.show(first_result)
    capsule, winner = first_result["capsule"], first_result["class_index"]
    assert all(slider.value == 0 for slider in sliders.sliders)
    assert {(slider.min, slider.max) for slider in sliders.sliders} == {
        (-SLIDER_RANGE, SLIDER_RANGE)
    }
    assert sliders.digit.value == to_png(first_result["image28"])  # the digit, beside ...
    assert sliders.reconstruction.value == to_png(decode_capsule(tiny_model, capsule, winner))
    sliders.sliders[3].value = 0.25
    moved = decode_capsule(tiny_model, capsule + 0.25 * torch.eye(16)[3], winner)
    assert sliders.reconstruction.value == to_png(moved)
    sliders.reset()
    assert sliders.reconstruction.value == to_png(first_result["reconstruction"])
    assert sliders.caption.value.startswith(f"{SAMPLES[0].name}, capsule {first_result['label']}")
    for image in (sliders.digit, sliders.reconstruction):  # held square in their flex box
        assert image.layout.width == image.layout.height and image.layout.object_fit == "contain"


def test_the_sliders_and_figure_4_follow_the_latest_digit(tiny_model, capsys):
    viewer = DigitViewer(tiny_model)
    viewer.show_samples(SAMPLES[:2])
    sliders, grid = CapsuleSliders(tiny_model), PerturbationGrid(tiny_model)
    viewer.follow(sliders.show)
    viewer.follow(grid.show)
    assert sliders.caption.value.startswith(SAMPLES[0].name)  # the first sample, at once
    first_grid = bytes(grid.image.value)
    assert first_grid.startswith(b"\x89PNG")
    viewer.show_samples(SAMPLES[2:3])  # more samples leave the latest digit alone
    assert sliders.caption.value.startswith(SAMPLES[0].name)
    viewer.show("upload.png", SAMPLES[2].read_bytes())
    assert sliders.caption.value.startswith("upload.png")
    assert bytes(grid.image.value) != first_grid
    expected = perturbed_reconstructions(
        tiny_model, viewer.latest["capsule"], viewer.latest["class_index"]
    )
    assert expected.shape[:2] == (16, 11)
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if ": predicted" in line] == [
        SAMPLES[0].name,
        SAMPLES[1].name,
        SAMPLES[2].name,
        "upload.png",
    ]


def uploaded(path: Path) -> dict:
    """One file as ipywidgets 8's FileUpload holds it."""
    content = path.read_bytes()
    return {
        "name": path.name,
        "type": "image/jpeg",
        "size": len(content),
        "content": memoryview(content),
        "last_modified": 1_700_000_000_000,  # ms since the epoch, as the browser sends it
    }


def test_uploading_the_same_file_again_shows_it_again():
    shown = []
    box = upload_box(lambda name, content: shown.append((name, content)))
    upload = box.children[0]
    for _ in range(2):
        upload.set_state({"value": [uploaded(SAMPLES[0])]})  # the same file both times
        assert upload.value == ()  # emptied once handled
    assert shown == [(SAMPLES[0].name, SAMPLES[0].read_bytes())] * 2


def test_each_stroke_is_shown_and_clear_shows_nothing():
    canvas, shown = DrawingCanvas(), []
    drawing_box(canvas, lambda name, png: shown.append((name, png)))
    canvas.set_state({"png": memoryview(b"stroke")})  # as the browser sends it
    canvas.set_state({"png": memoryview(b"")})  # Clear
    assert shown == [("drawing", b"stroke")]


def test_more_samples_shows_the_rest_once():
    shown = []
    box = more_samples(SAMPLES[4:], shown.extend)
    button = box.children[0]
    assert button.description == f"Show the other {len(SAMPLES) - 4} samples"
    button.click()
    assert shown == SAMPLES[4:] and button.disabled
