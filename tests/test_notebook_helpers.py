"""What inference.ipynb's cells call (capslab/notebook.py, notebook_multimnist.py,
inference.to_png): figures that fit the notebook, the upload button, the canvas's output, the
capsule sliders, Figure 4 and the two-digit MultiMNIST pair that follow the latest digit.
Widgets are driven from Python, as the browser's messages set them."""

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
from capslab.checkpoint import load_capsnet, save_checkpoint
from capslab.data import to_model_input
from capslab.errors import UserError
from capslab.inference import (
    classify,
    decode_capsule,
    evidence_map,
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
from capslab.notebook_multimnist import (
    TwoDigits,
    classify_pair,
    gray_png,
    load_pair_model,
    pair_image,
    two_colour_png,
)
from capslab.preprocess import preprocess
from capslab.settings import settings_to_dict
from CapsNet import CapsNet, CapsNetConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted(path for path in (REPO / "samples").iterdir() if path.suffix in {".jpg", ".png"})


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_capsnet(tiny_checkpoint, torch.device("cpu"))[0]


def save_tiny_pair_checkpoint(path: Path) -> Path:
    """An untrained, narrow 36x36 CapsNet in tests/conftest.py's tiny-checkpoint layout, its
    digit-capsule and decoder weights scaled up: untrained capsules are ~1e-4 long, so the
    decoder would draw the same grey for every class and the two colours could not be told apart.
    """
    torch.manual_seed(0)
    config = CapsNetConfig(
        image_size=36, conv1_channels=16, primary_channels=4, decoder_hidden=(16, 32)
    )
    model = CapsNet(config)
    with torch.no_grad():
        model.digit_caps.W.mul_(1000)  # capsule lengths near 1
        model.decoder.layers[0].weight.mul_(30)  # each class's slot a different drawing
        model.decoder.layers[4].weight.mul_(10)  # in high contrast
    state = {"model": model.state_dict(), "config": settings_to_dict(config)}
    save_checkpoint({**state, "dataset": "multimnist", "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def tiny_pair_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_pair_checkpoint(tmp_path_factory.mktemp("tiny_pair") / "tiny_pair.pt")


@pytest.fixture(scope="module")
def pair_model(tiny_pair_checkpoint):
    return load_capsnet(tiny_pair_checkpoint, torch.device("cpu"))[0]


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


@pytest.mark.slow
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
    assert viewer.latest["name"] == "upload.png"
    expected = figure_png(perturbation_figure(tiny_model, viewer.latest))
    assert bytes(grid.image.value) == bytes(expected)  # Figure 4 of the upload
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


# "Two digits at once": MultiMNIST


def test_the_pair_centres_the_first_digit_and_moves_the_second():
    first, second = preprocess(SAMPLES[0]), preprocess(SAMPLES[8])
    as_uint8 = (second * 255).round().to(torch.uint8)
    nothing = torch.zeros(28, 28)
    alone = pair_image(first, nothing, 0, 0)  # (36, 36)
    assert alone.shape == (36, 36) and alone.dtype == torch.uint8
    assert torch.equal(alone[4:32, 4:32], (first * 255).round().to(torch.uint8))
    assert alone.sum() == alone[4:32, 4:32].sum()  # nothing else on the canvas
    moved = pair_image(nothing, second, -3, 4)  # 3 px up, 4 px right
    assert torch.equal(moved[1:29, 8:36], as_uint8)
    both = pair_image(first, second, 0, 0).int()
    added = (first * 255).round().int() + as_uint8.int()  # added, then clipped at 255
    assert torch.equal(both[4:32, 4:32], added.clamp(max=255))


def test_the_pair_is_the_two_longest_capsules_each_drawn_from_its_own(pair_model):
    image36 = pair_image(preprocess(SAMPLES[0]), preprocess(SAMPLES[8]), 1, -2)
    pair = classify_pair(pair_model, image36)
    lengths, _, _ = pair_model(to_model_input(image36, "cpu"))  # (1, 10)
    top = lengths[0].topk(2)
    assert (
        pair["class_indices"] == top.indices.tolist() and pair["lengths"][0] >= pair["lengths"][1]
    )
    assert pair["labels"] == [str(index) for index in pair["class_indices"]]
    # As the model draws a MultiMNIST pair for its training loss: target (B, 2).
    _, drawn, _ = pair_model(to_model_input(image36, "cpu"), top.indices[None])  # (1, 2, 1, 36, 36)
    torch.testing.assert_close(pair["reconstructions"], drawn[0, :, 0])
    assert (pair["reconstructions"][0] - pair["reconstructions"][1]).abs().max() > 0.5


def test_the_reconstructions_are_red_and_green():
    images = torch.rand(2, 36, 36)
    rgb = np.asarray(Image.open(io.BytesIO(two_colour_png(images, scale=5))).convert("RGB"))
    assert rgb.shape == (180, 180, 3)
    for channel in (0, 1):  # red the first, green the second
        expected = (images[channel] * 255).round().numpy()
        assert np.abs(rgb[::5, ::5, channel] - expected).max() <= 0.5
    assert not rgb[..., 2].any()  # no blue: black where neither draws
    assert torch.equal(
        png_pixels(gray_png(torch.full((36, 36), 200, dtype=torch.uint8)))[::5, ::5],
        torch.full((36, 36), 200.0),
    )


def test_two_digits_follow_the_latest_digit_the_sample_and_the_sliders(pair_model, tiny_model):
    viewer = DigitViewer(tiny_model)
    viewer.show_samples(SAMPLES[:1])
    two_digits = TwoDigits(pair_model, SAMPLES, second=SAMPLES[8].name)
    viewer.follow(two_digits.show)
    first, second, third, fifth = (preprocess(SAMPLES[k]) for k in (0, 8, 3, 5))

    def shows(first, second, dy, dx) -> None:
        image36 = pair_image(first, second, dy, dx)
        assert two_digits.input.value == gray_png(image36)
        pair = classify_pair(pair_model, image36)
        assert two_digits.reconstruction.value == two_colour_png(pair["reconstructions"])
        assert f"{dx:+d} px right, {dy:+d} px down" in two_digits.caption.value
        for colour, label in zip(("#e00000", "#00b000"), pair["labels"]):
            assert f'<b style="color:{colour}">{label}</b>' in two_digits.caption.value

    assert [(s.min, s.max, s.value) for s in two_digits.offsets] == [(-4, 4, 0)] * 2
    shows(first, second, 0, 0)
    assert two_digits.caption.value.startswith(f"{SAMPLES[0].name} + {SAMPLES[8].name} moved")
    two_digits.offsets[1].value = 3  # right
    shows(first, second, 0, 3)
    two_digits.offsets[0].value = -2  # up
    shows(first, second, -2, 3)
    two_digits.second.value = SAMPLES[3].name
    shows(first, third, -2, 3)
    viewer.show("<upload>.png", SAMPLES[5].read_bytes())  # a new latest digit
    shows(fifth, third, -2, 3)
    assert two_digits.caption.value.startswith("&lt;upload&gt;.png + ")  # the name as text
    for image in (two_digits.input, two_digits.reconstruction):
        assert image.layout.width == image.layout.height == "180px"  # 36 px at 5x, square


def test_without_a_multimnist_model_the_section_says_how_to_train_one(tmp_path, capsys):
    assert load_pair_model(tmp_path / "absent.pt", torch.device("cpu")) is None
    (sentence,) = capsys.readouterr().out.splitlines()
    assert sentence.startswith("The MultiMNIST model is not there yet")
    assert "python train.py --dataset multimnist" in sentence
    assert "results/grids/multimnist.json" in sentence
    assert "CAPSNET_MULTIMNIST_CHECKPOINT" in sentence


def test_the_section_loads_a_36x36_model_and_refuses_a_28x28_one(
    tiny_pair_checkpoint, tiny_checkpoint, capsys
):
    model = load_pair_model(tiny_pair_checkpoint, torch.device("cpu"))
    assert model.config.image_size == 36 and not model.training
    assert capsys.readouterr().out == f"MultiMNIST checkpoint {tiny_pair_checkpoint}\n"
    with pytest.raises(UserError, match="takes 28x28 images.*36x36"):
        load_pair_model(tiny_checkpoint, torch.device("cpu"))
