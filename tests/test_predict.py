"""preprocess.py and predict.py: photos into MNIST format, the errors, and the command line."""

import io
import json
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

import predict
from capslab.baseline import BaselineCNN, BaselineConfig
from capslab.checkpoint import load_model, save_checkpoint
from capslab.errors import UserError, exit_on_user_error
from capslab.inference import PERTURBATIONS, classify, perturbed_reconstructions
from capslab.preprocess import open_image, preprocess
from capslab.settings import settings_to_dict
from CapsNet import CapsNet, CapsNetConfig
from samples import make_samples

from conftest import REPO, png_header_only, run_in_process

SAMPLES = sorted(path for path in (REPO / "samples").iterdir() if path.suffix in {".jpg", ".png"})
PHOTO_DIGITS = range(10)  # the first ten MNIST test digits (classes 7 2 1 0 4 1 4 9 5 9)


def photograph(digit28: np.ndarray, seed: int) -> bytes:
    """An MNIST digit as a phone photo: dark ink on grey paper, 10x larger, off-centre on an
    800x600 page, blurred (sigma 3 px), noisy (std 10 of 255), JPEG quality 60."""
    rng = np.random.default_rng(seed)
    ink = Image.fromarray(digit28).resize((280, 280), Image.BICUBIC)
    page = Image.new("L", (800, 600), 225)
    page.paste(
        Image.new("L", ink.size, 40), (int(rng.integers(20, 500)), int(rng.integers(20, 300))), ink
    )
    page = page.filter(ImageFilter.GaussianBlur(3))
    pixels = np.asarray(page, dtype=np.float32) + rng.normal(0, 10, (600, 800))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=60)
    return out.getvalue()


def aligned_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation, best over shifts of up to 1 px: MNIST rounded its centring to
    whole pixels, so a faithful re-centring may land one pixel away."""

    def correlation(x, y):
        x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
        return float(x @ y / np.sqrt((x @ x) * (y @ y)))

    return max(
        correlation(np.roll(a, (dy, dx), axis=(0, 1)), b) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )


def png_bytes(image: Image.Image, **save_args) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **save_args)
    return out.getvalue()


def drawn_seven(size=(300, 400), ink=0, paper=255, mode="L") -> Image.Image:
    """A thick dark 7 on light paper, in the middle of the page."""
    image = Image.new(mode, size, paper)
    width, height = size
    ImageDraw.Draw(image).line(
        [(0.3 * width, 0.3 * height), (0.7 * width, 0.3 * height), (0.45 * width, 0.7 * height)],
        fill=ink,
        width=max(1, min(size) // 12),
    )
    return image


def assert_mnist_format(image28: torch.Tensor) -> None:
    assert image28.shape == (28, 28) and image28.dtype == torch.float32
    assert image28.min() >= 0 and image28.max() <= 1 and image28.max() > 0.5
    rows, cols = torch.nonzero(image28 > 0, as_tuple=True)
    assert (
        max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 22
    )  # the 20 px box, plus blur


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """predict.py in its own process, as a user runs it (4 s, mostly importing torch): for the
    test of the process itself. The others run its main here (conftest.run_in_process)."""
    return subprocess.run(
        [sys.executable, str(REPO / "predict.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """predict.py's main in this process, as `python predict.py` runs it.

    Returns (exit status, stdout, stderr)."""
    try:
        exit_on_user_error(lambda: predict.main(list(args)))
        status = 0
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# Preprocessing real digits


def test_clean_mnist_digit_is_left_as_it_is(mnist_test):
    """An MNIST image is already in MNIST format, so preprocessing must reproduce it."""
    for index in PHOTO_DIGITS:
        digit = mnist_test.images[index].numpy()
        assert (
            aligned_correlation(
                preprocess(png_bytes(Image.fromarray(digit))).numpy(), digit / 255.0
            )
            > 0.99
        )


def test_photo_of_mnist_digit_comes_back_as_the_digit(mnist_test):
    """Measured over the first 300 test digits: mean 0.958, 5th percentile 0.915; these ten
    range from 0.915 to 0.988 (mean 0.969)."""
    scores = []
    for index in PHOTO_DIGITS:
        digit = mnist_test.images[index].numpy()
        processed = preprocess(photograph(digit, seed=index))
        assert_mnist_format(processed)
        scores.append(aligned_correlation(processed.numpy(), digit / 255.0))
    assert min(scores) > 0.85 and np.mean(scores) > 0.93, scores


def test_photo_of_mnist_digit_keeps_its_prediction(mnist_test, trained_checkpoint):
    model, _ = load_model(trained_checkpoint, torch.device("cpu"))
    for index in PHOTO_DIGITS:
        digit = mnist_test.images[index].numpy()
        original = classify(model, torch.from_numpy(digit / np.float32(255)))
        photo = classify(model, preprocess(photograph(digit, seed=index)))
        assert photo["class_index"] == original["class_index"] == int(mnist_test.labels[index]), (
            index
        )


# Odd images


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: drawn_seven(mode="RGB", ink=(20, 30, 120), paper=(240, 235, 220)), id="rgb"
        ),
        pytest.param(
            lambda: drawn_seven(mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0)),
            id="rgba-transparent-black",
        ),
        pytest.param(lambda: drawn_seven(mode="LA", ink=(0, 255), paper=(0, 0)), id="la"),
        pytest.param(lambda: drawn_seven(mode="I;16", ink=3000, paper=60000), id="16-bit"),
        pytest.param(lambda: drawn_seven(mode="I", ink=1000, paper=50000), id="32-bit-int"),
        pytest.param(lambda: drawn_seven(mode="RGB", ink=(0, 0, 0)).quantize(4), id="palette"),
        pytest.param(lambda: drawn_seven(mode="1", ink=0, paper=1), id="bilevel"),
        pytest.param(
            lambda: drawn_seven(mode="CMYK", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0)), id="cmyk"
        ),
        pytest.param(
            lambda: drawn_seven(mode="RGB", ink=(20, 30, 120), paper=(240, 235, 220)).convert(
                "LAB"
            ),
            id="cielab",
        ),
        pytest.param(lambda: drawn_seven(size=(4000, 3000)), id="huge-4000x3000"),
        pytest.param(lambda: drawn_seven(size=(12, 9)), id="tiny-12x9"),
        pytest.param(lambda: drawn_seven(ink=255, paper=0), id="white-on-black"),
    ],
)
def test_odd_images_become_mnist_format(make):
    image = make()
    assert_mnist_format(preprocess(image))
    file_format = "TIFF" if image.mode in {"I", "CMYK", "LAB"} else "PNG"  # which PNG cannot hold
    out = io.BytesIO()
    image.save(out, file_format)
    assert_mnist_format(preprocess(out.getvalue()))


def test_palette_with_transparent_colour():
    image = drawn_seven(mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0)).convert("P")
    image.info["transparency"] = image.getpixel((0, 0))
    assert_mnist_format(preprocess(png_bytes(image, transparency=image.getpixel((0, 0)))))


def test_exif_orientation_is_applied():
    """A horizontal bar stored sideways with EXIF 'rotate 90 clockwise' must come out horizontal."""
    upright = Image.new("L", (400, 300), 255)
    ImageDraw.Draw(upright).rectangle((100, 140, 300, 160), fill=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    upright.rotate(90, expand=True).save(out, "JPEG", exif=exif)
    bar = preprocess(out.getvalue())
    rows, cols = torch.nonzero(bar > 0.5, as_tuple=True)
    assert cols.max() - cols.min() >= 18 and rows.max() - rows.min() <= 5


def test_specks_and_paper_edges_are_ignored():
    """Dust, and a dark table along the edges, do not move the digit's box."""
    clean = preprocess(drawn_seven(size=(600, 600)))
    page = np.asarray(drawn_seven(size=(600, 600)), dtype=np.uint8).copy()
    page[:, :40] = 60  # the table at the left edge
    page[500:503, 500:503] = 0  # dust
    page[60:62, 80:83] = 0
    assert aligned_correlation(preprocess(Image.fromarray(page)).numpy(), clean.numpy()) > 0.98


# Large images

HUGE_SIDE = 13000  # 169 million pixels: over Pillow's 89 M warning, under its 179 M refusal
MEASURE_PREPROCESS = """
import json, resource, sys, warnings
from PIL import Image
from capslab.preprocess import preprocess
warnings.simplefilter("error", Image.DecompressionBombWarning)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images = [preprocess(path).tolist() for path in sys.argv[1:]]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"images": images, "peak_above_imports_mb": (peak - before) / 1024}))
"""


@pytest.fixture(scope="module")
def huge_sevens(tmp_path_factory) -> list[Path]:
    """A 7 on a 13000x13000 page, as a 1-bit PNG (75 KB) and as a JPEG (2 MB)."""
    folder = tmp_path_factory.mktemp("huge")
    seven = drawn_seven(size=(HUGE_SIDE, HUGE_SIDE), mode="1", ink=0, paper=1)
    seven.save(folder / "seven.png")
    seven.convert("L").save(folder / "seven.jpg", quality=50)
    return [folder / "seven.png", folder / "seven.jpg"]


@pytest.mark.slow
def test_huge_images_are_decoded_reduced_in_bounded_memory(huge_sevens):
    """Decoded whole and turned into floats, such an image took 2.7 GB and printed Pillow's
    DecompressionBombWarning. Reduced as it is decoded, the PNG needs its 169 MB of pixels
    and little more, the JPEG less (it decodes at 1/8 scale), and no warning comes out."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_PREPROCESS, *map(str, huge_sevens)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["peak_above_imports_mb"] < 400
    small = preprocess(drawn_seven(size=(1300, 1300), mode="1", ink=0, paper=1)).numpy()
    for image in measured["images"]:
        assert aligned_correlation(np.array(image), small) > 0.95


def test_cli_reads_a_huge_image_quietly_and_refuses_a_bomb(huge_sevens, tmp_path, tiny_checkpoint):
    bomb = write(tmp_path / "bomb.png", png_header_only(20000, 20000))  # 400 M pixels
    result = run_in_process(
        "predict.py", huge_sevens[0], bomb, "--checkpoint", tiny_checkpoint, check=False
    )
    assert result.returncode == 2
    assert result.stderr == "error: 1 of 2 images could not be classified\n"  # and no warning
    _, huge, refused = result.stdout.splitlines()
    assert re.fullmatch(rf"{re.escape(str(huge_sevens[0]))}: \d  confidence .*", huge)
    assert refused.startswith(f"{bomb}: error: is too large to decode safely (Image size")


@pytest.mark.parametrize(
    "make, averaged_as",
    [
        (lambda: drawn_seven(size=(2345, 2101), mode="1", ink=0, paper=1), "L"),
        (lambda: drawn_seven(size=(2345, 2101), mode="I;16", ink=3000, paper=60000), "I"),
        (lambda: transparent_palette_seven(size=(2345, 2101)), "RGBA"),
        (
            lambda: drawn_seven(size=(2345, 2101), mode="RGBA", ink=(0, 0, 0, 255), paper=(0,) * 4),
            "RGBA",
        ),
    ],
    ids=["bilevel", "16-bit", "palette-transparent", "rgba"],
)
def test_large_images_are_averaged_down_seamlessly(make, averaged_as):
    """Reduced a band of rows at a time: the same pixels as the whole image converted to a
    mode whose pixels can be averaged, then reduced (2345x2101 -> 1173x1051)."""
    image = make()
    opened = open_image(png_bytes(image, **image.info))
    expected = image.convert(averaged_as).reduce(2)
    assert opened.mode == averaged_as and opened.size == (1173, 1051)
    assert np.array_equal(np.asarray(opened), np.asarray(expected))
    assert_mnist_format(preprocess(image))


def transparent_palette_seven(size) -> Image.Image:
    image = drawn_seven(size, mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0)).convert("P")
    image.info["transparency"] = image.getpixel((0, 0))
    return image


# Errors


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda tmp: tmp, "is a directory"),
        (lambda tmp: tmp / "missing.png", "does not exist"),
        (lambda tmp: Path("/dev/null"), "is not a regular file"),
        (lambda tmp: write(tmp / "empty.png", b""), "is empty"),
        (lambda tmp: write(tmp / "notes.png", b"this is not a picture\n"), "not a readable image"),
        (
            lambda tmp: write(tmp / "cut.png", png_bytes(drawn_seven())[:300]),
            "not a readable image",
        ),
        (lambda tmp: write(tmp / "bomb.png", png_header_only(20000, 20000)), "too large"),
        (
            lambda tmp: write(tmp / "white.png", png_bytes(Image.new("L", (300, 200), 255))),
            "holds no digit:",
        ),
        (lambda tmp: write(tmp / "noise.png", png_bytes(noisy_paper())), "holds no digit:"),
        (lambda tmp: write(tmp / "dust.png", png_bytes(dust())), "holds no digit:"),
    ],
    ids=[
        "directory",
        "missing",
        "device",
        "empty",
        "text",
        "truncated",
        "decompression-bomb",
        "blank",
        "blank-noisy-paper",
        "specks",
    ],
)
def test_bad_input_is_a_one_line_error_in_its_place(
    tmp_path, capsys, tiny_checkpoint, make_input, message
):
    """Each preprocessing error names the file; the CLI prints it where the file's result
    would be, still classifies the others, and exits with 2."""
    path = make_input(tmp_path)
    with pytest.raises(UserError, match=message) as error:
        preprocess(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    files = [str(SAMPLES[0]), str(path), str(SAMPLES[1])]
    status, out, err = run_main(capsys, *files, "--checkpoint", str(tiny_checkpoint))
    assert status == 2 and err == "error: 1 of 3 images could not be classified\n"
    _, first, failed, last = out.splitlines()  # after the header line
    assert failed.startswith(f"{path}: error: ") and re.search(message, failed)
    assert failed.count(str(path)) == 1  # named once, first
    assert first.startswith(f"{SAMPLES[0]}: ") and last.startswith(f"{SAMPLES[1]}: ")


@pytest.mark.slow
def test_cli_process_reports_every_file_without_traceback(tmp_path, tiny_checkpoint):
    result = run_cli(str(SAMPLES[0]), str(tmp_path), "--checkpoint", str(tiny_checkpoint))
    assert result.returncode == 2
    header, good, bad = result.stdout.splitlines()
    assert header.startswith("checkpoint ") and good.startswith(f"{SAMPLES[0]}: ")
    assert bad == f"{tmp_path}: error: is a directory, not an image"
    assert result.stderr == "error: 1 of 2 images could not be classified\n"


def test_cli_json_has_an_entry_for_every_file(tmp_path, tiny_checkpoint):
    blank = write(tmp_path / "blank.png", png_bytes(Image.new("L", (300, 200), 255)))
    files = [str(SAMPLES[0]), str(tmp_path / "missing.png"), str(blank), str(SAMPLES[1])]
    result = run_in_process(
        "predict.py", *files, "--checkpoint", tiny_checkpoint, "--json", check=False
    )
    assert result.returncode == 2
    assert result.stderr == "error: 2 of 4 images could not be classified\n"
    records = json.loads(result.stdout)
    assert result.stdout == json.dumps(records, indent=2) + "\n"  # as one json.dumps prints it
    assert [record["file"] for record in records] == files
    assert records[1] == {"file": files[1], "error": f"{files[1]} does not exist"}
    assert records[2] == {
        "file": files[2],
        "error": f"{blank} holds no digit: the image is blank "
        "(nothing stands out from the background)",
    }
    for record in records[0], records[3]:
        assert set(record) == {"file", "prediction", "class_index", "confidence", "capsule_lengths"}


@pytest.mark.parametrize("flags", [["--json"], []], ids=["json", "text"])
def test_each_file_is_printed_before_the_next_is_read(
    monkeypatch, tiny_checkpoint, tmp_path, flags
):
    """Streaming: the model loads once, first; then each file is read, classified and its
    result flushed to stdout before the next file is opened, a failed one too."""
    events = []
    monkeypatch.setattr(sys, "stdout", FlushLog(events))
    for name in "load_capsnet", "preprocess":
        monkeypatch.setattr(predict, name, partial(logged, events, name, getattr(predict, name)))
    files = [str(SAMPLES[0]), str(tmp_path / "missing.png"), str(SAMPLES[1])]
    with pytest.raises(UserError, match="1 of 3"):
        predict.main([*files, "--checkpoint", str(tiny_checkpoint), *flags])
    assert [event for event in events if event.startswith("load_capsnet")] == [events[0]]
    for name in files:
        after_read = events[events.index(f"preprocess {name}") + 1]
        assert after_read.startswith("flushed ") and name in after_read, events
    flushed = [event.removeprefix("flushed ") for event in events if event.startswith("flushed ")]
    printed = "".join(flushed)
    if flags:
        assert len(json.loads(printed)) == len(files)  # valid JSON, written a piece at a time
    else:
        assert len(printed.splitlines()) == 1 + len(files)  # the header, a line per file


class FlushLog(io.StringIO):
    """stdout that logs "flushed TEXT" for each flush, TEXT being all written since the last."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def flush(self):
        self.events.append(f"flushed {self.getvalue()}")
        self.seek(0)
        self.truncate()


def logged(events: list, name: str, function, first, *rest):
    events.append(f"{name} {first}")
    return function(first, *rest)


def test_empty_bytes_are_an_error():
    with pytest.raises(UserError, match="is empty"):
        preprocess(b"")


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def noisy_paper() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.normal(200, 12, (400, 500)).clip(0, 255).astype(np.uint8))


def dust() -> Image.Image:
    page = Image.new("L", (1000, 800), 255)
    page.paste(0, (500, 400, 503, 403))
    return page


# The model helpers and the command line


def test_classify_and_figure_4_shapes(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint, torch.device("cpu"))
    result = classify(model, preprocess(drawn_seven()))
    assert len(result["lengths"]) == 10 and result["confidence"] == max(result["lengths"])
    assert result["label"] == str(result["class_index"]) and result["capsule"].shape == (16,)
    assert result["reconstruction"].shape == (28, 28)
    grid = perturbed_reconstructions(model, result["capsule"], result["class_index"])
    assert grid.shape == (16, len(PERTURBATIONS), 28, 28)
    # The zero column decodes the capsule itself: the plain reconstruction.
    torch.testing.assert_close(
        grid[:, PERTURBATIONS.index(0.0)], result["reconstruction"].expand(16, 28, 28)
    )


def test_cli_json_and_show(tiny_checkpoint, tmp_path, capsys):
    status, out, err = run_main(
        capsys,
        str(SAMPLES[0]),
        str(SAMPLES[1]),
        "--checkpoint",
        str(tiny_checkpoint),
        "--json",
        "--show",
        str(tmp_path),
    )
    assert status == 0, err
    records = json.loads(out)
    assert [record["file"] for record in records] == [str(SAMPLES[0]), str(SAMPLES[1])]
    assert set(records[0]) == {"file", "prediction", "class_index", "confidence", "capsule_lengths"}
    for sample in SAMPLES[:2]:
        for kind in ("input", "reconstruction"):
            assert Image.open(tmp_path / f"{sample.stem}_{kind}.png").size == (28, 28)


def test_cli_show_gives_inputs_of_the_same_name_their_own_files(tiny_checkpoint, tmp_path):
    """a/digit, b/digit and c/DIGIT: the later ones get -2 and -3, in the order given."""
    inputs = []
    for folder, name, sample in zip("abc", ["digit", "digit", "DIGIT"], SAMPLES):
        (tmp_path / folder).mkdir()
        inputs.append(write(tmp_path / folder / f"{name}{sample.suffix}", sample.read_bytes()))
    out = tmp_path / "out"
    result = run_in_process(
        "predict.py", *inputs, "--checkpoint", tiny_checkpoint, "--show", out, check=False
    )
    assert result.returncode == 0, result.stderr
    stems = ["digit", "digit-2", "DIGIT-3"]
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"{stem}_{kind}.png" for stem in stems for kind in ("input", "reconstruction")
    )
    for path, stem in zip(inputs, stems):
        expected = (preprocess(path) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}_input.png")), expected), stem


def test_cli_missing_checkpoint_is_a_one_line_error(tmp_path, capsys):
    status, _, err = run_main(capsys, str(SAMPLES[0]), "--checkpoint", str(tmp_path / "none.pt"))
    assert status == 2 and re.fullmatch(r"error: checkpoint .* does not exist\n", err)
    status, _, err = run_main(capsys, str(SAMPLES[0]), "--checkpoint", str(tmp_path))
    assert (
        status == 2 and err == f"error: checkpoint {tmp_path} is a folder, not a checkpoint file\n"
    )


def test_cli_refuses_a_pairs_model_in_one_line(tmp_path, capsys):
    """A MultiMNIST model takes 36x36 pairs; predict.py makes 28x28 single digits."""
    path = tmp_path / "pairs.pt"
    config = CapsNetConfig(image_size=36, conv1_channels=8, primary_channels=2)
    save_checkpoint(
        {"model": CapsNet(config).state_dict(), "config": settings_to_dict(config),
         "dataset": "multimnist"},
        path,
    )  # fmt: skip
    status, out, err = run_main(capsys, str(SAMPLES[0]), "--checkpoint", str(path))
    assert status == 2 and out == ""
    assert err.startswith(f"error: {path} reads pairs of overlapping digits on 36x36")
    assert err.count("\n") == 1


def test_cli_show_into_a_file_is_an_error(capsys):
    status, out, err = run_main(capsys, str(SAMPLES[0]), "--show", str(REPO / "predict.py"))
    assert (
        status == 2
        and out == ""
        and err == f"error: --show {REPO / 'predict.py'} is a file, not a folder\n"
    )


def test_cli_show_folder_that_cannot_be_made_is_an_error_before_any_file(
    tmp_path, capsys, tiny_checkpoint
):
    folder = write(tmp_path / "a-file", b"") / "out"
    status, out, err = run_main(
        capsys, str(SAMPLES[0]), "--checkpoint", str(tiny_checkpoint), "--show", str(folder)
    )
    assert status == 2 and out == ""
    assert err == f"error: --show {folder} cannot be created (Not a directory)\n"


def test_cli_show_folder_that_takes_no_files_is_an_error_before_any_file(
    unwritable_folder, capsys, tiny_checkpoint
):
    status, out, err = run_main(
        capsys,
        str(SAMPLES[0]),
        "--checkpoint",
        str(tiny_checkpoint),
        "--show",
        str(unwritable_folder),
    )
    assert status == 2 and out == ""
    assert (
        err.startswith(f"error: --show {unwritable_folder} cannot be written (")
        and err.count("\n") == 1
    )


def test_cli_refuses_a_model_without_capsules(tmp_path, capsys):
    path = tmp_path / "cnn.pt"
    save_checkpoint(
        {
            "model": BaselineCNN(BaselineConfig()).state_dict(),
            "model_kind": "cnn",
            "config": settings_to_dict(BaselineConfig()),
        },
        path,
    )
    status, _, err = run_main(capsys, str(SAMPLES[0]), "--checkpoint", str(path))
    assert (
        status == 2
        and err == f"error: {path} holds a 'cnn' model; this needs a CapsNet checkpoint\n"
    )


def test_cli_predicts_the_bundled_samples(trained_checkpoint):
    result = run_in_process("predict.py", *SAMPLES, "--checkpoint", trained_checkpoint)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()[1:]  # after the header line
    assert len(lines) == len(SAMPLES)
    for sample, line in zip(SAMPLES, lines):
        match = re.fullmatch(
            r"(.+): (\d)  confidence ([01]\.\d{3}) \(length of the winning capsule\)", line
        )
        assert match and match[1] == str(sample), line
        assert match[2] == sample.name[0], line  # file names start with the true digit


def test_the_background_plane_is_fitted_once(monkeypatch):
    from capslab import preprocess as module

    calls = []
    fit_plane = module.fit_plane
    monkeypatch.setattr(
        module, "fit_plane", lambda gray: calls.append(gray.shape) or fit_plane(gray)
    )
    preprocess(drawn_seven())
    assert len(calls) == 1


def test_every_caller_gets_the_same_model_input(mnist_test):
    """A uint8 batch, a float batch and one float (28, 28) image become the same float input."""
    from capslab.data import to_model_input

    digits = mnist_test.images[:3]  # (3, 28, 28) uint8
    from_uint8 = to_model_input(digits, "cpu")
    assert from_uint8.shape == (3, 1, 28, 28) and from_uint8.dtype == torch.float32
    assert from_uint8.max() == 1 and from_uint8.min() == 0
    torch.testing.assert_close(to_model_input(digits.float() / 255, "cpu"), from_uint8)
    torch.testing.assert_close(to_model_input(digits[0].float() / 255, "cpu"), from_uint8[:1])


@pytest.mark.slow
def test_the_samples_are_made_again_from_mnist_as_committed(data_dir, tmp_path):
    """samples/make_samples.py still runs and gives the committed images: the same files, and
    the same pixels (a JPEG within rounding, as another libjpeg may encode it)."""
    make_samples.main(["--data-dir", str(data_dir), "--out-dir", str(tmp_path)])
    made = sorted(path for path in tmp_path.iterdir() if path.suffix in {".jpg", ".png"})
    assert [path.name for path in made] == [path.name for path in SAMPLES]
    for again, committed in zip(made, SAMPLES):
        pixels = [np.asarray(Image.open(path), dtype=np.float64) for path in (again, committed)]
        assert pixels[0].shape == pixels[1].shape, committed.name
        tolerance = 0 if committed.suffix == ".png" else 1.0  # mean absolute difference, 0-255
        assert np.abs(pixels[0] - pixels[1]).mean() <= tolerance, committed.name
