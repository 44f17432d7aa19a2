"""--dataset folder: a folder of your own images trains, scores and predicts as MNIST does.
Folders are made here, of a few small PNGs; 20-px images (a 2x2 grid of primary capsules) and
SMALL_MODEL's narrow layers keep the model small, so a run takes about a second."""

import json

import colour_mnist
import export_imagefolder
import numpy as np
import pytest
import torch
from PIL import Image

import hubconf
from capslab.checkpoint import load_checkpoint
from capslab.data import DEBIAN_FASHION_DIR, Split, load_split, random_shift, to_model_input
from capslab.imagefolder import FileSplit, FolderOptions, load_folder, read_image
from capslab.training import TrainConfig

from conftest import (
    SMALL_MODEL,
    SMALL_SCHEDULE,
    assert_one_line_error,
    png_header_only,
    run_in_process,
)

SIDE = 20  # the smallest side worth a test: primary capsules on a 2x2 grid
RUN = [
    *SMALL_SCHEDULE,
    *SMALL_MODEL,
    "--dataset",
    "folder",
    "--image-size",
    SIDE,
    "--val-size",
    "8",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--quiet",
]


def write_image(path, side: int, colour: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if colour else (side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def make_folder(root, classes=("cat", "dog", "eel"), per_class=(12, 4), colour=False, side=24):
    """root/{train,test}/<class>/k.png: per_class[0] training and per_class[1] test images."""
    for part, count in zip(("train", "test"), per_class):
        for label, name in enumerate(classes):
            for k in range(count):
                write_image(
                    root / part / name / f"{k}.png",
                    side,
                    colour,
                    1000 * label + 100 * (part == "test") + k,
                )
    return root


def train_folder(root, folder, *extra, check=True):
    return run_in_process(
        "train.py", "--data-dir", root, "--checkpoint-dir", folder, *RUN, *extra, check=check
    )


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A colour folder trained for one epoch: (data root, checkpoint folder)."""
    root = make_folder(tmp_path_factory.mktemp("colour"), colour=True)
    folder = tmp_path_factory.mktemp("colour_run")
    train_folder(root, folder)
    return root, folder


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("colour, channels", [(False, 1), (True, 3)])
def test_a_folder_loads_resized_with_its_channels_and_sorted_class_names(
    tmp_path, colour, channels
):
    root = make_folder(tmp_path, classes=("b", "a", "c"), colour=colour, side=30)
    options = FolderOptions(SIDE, channels, ("a", "b", "c"))
    train, test = load_folder(root, options, log=lambda line: None)
    shape = (SIDE, SIDE) if channels == 1 else (3, SIDE, SIDE)
    assert train.images.shape == (36, *shape) and test.images.shape == (12, *shape)
    assert train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12  # sorted: a, b, c
    assert to_model_input(train.images[:5], "cpu").shape == (5, channels, SIDE, SIDE)
    assert sorted(test.labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert test.labels[:6].unique().numel() > 1  # shuffled: --test-subset takes a mix of classes


def test_channels_are_detected_and_a_mix_is_converted_to_rgb_with_a_note(tmp_path):
    root = make_folder(tmp_path)
    write_image(root / "train" / "cat" / "colour.png", 24, colour=True, seed=1)
    out = train_folder(root, tmp_path / "run", "--dry-run").stdout
    assert "48 grayscale images converted to RGB (1 of 49 are colour)" in out
    assert "3x20x20" in out


def test_channels_1_forces_grayscale(tmp_path):
    root = make_folder(tmp_path, colour=True)
    out = train_folder(root, tmp_path / "run", "--channels", "1").stdout
    assert "48 colour images converted to grayscale" in out
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["in_channels"] == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_image_reads_as_its_8_bit_copy_not_clipped(tmp_path, channels):
    gray = np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint16)
    Image.fromarray(gray.astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(gray * 257).save(tmp_path / "16.png")  # 0..65535, I;16
    eight, sixteen = (read_image(tmp_path / f"{n}.png", 24, channels) for n in (8, 16))
    assert torch.equal(sixteen, eight)


def test_the_same_images_through_the_folder_and_the_fashion_mnist_path_are_identical(tmp_path):
    if not DEBIAN_FASHION_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed in {DEBIAN_FASHION_DIR}")
    export_imagefolder.export("fashion-mnist", "unused", tmp_path, limit=60)
    fashion = load_split("fashion-mnist", "unused", train=True)
    names = tuple(sorted(p.name for p in (tmp_path / "train").iterdir()))
    assert names[3] == "3-Dress" and names[0] == "0-T-shirt-top"  # sorted = Fashion's labels
    train, _ = load_folder(tmp_path, FolderOptions(28, 1, names), log=lambda line: None)
    # ImageFolder order: by class, then by file name (the IDX index).
    order = sorted(range(60), key=lambda i: (int(fashion.labels[i]), i))
    assert torch.equal(train.images, fashion.images[order])
    assert torch.equal(train.labels, fashion.labels[order])


@pytest.mark.parametrize("background", ["colour", "black"])
def test_colour_mnist_paints_each_digit_in_its_ink_on_its_background(background):
    generator = torch.Generator().manual_seed(0)
    ink, paper = colour_mnist.colour_pairs(500, generator, background)  # (500, 3) each
    assert ((ink - paper).norm(dim=1) >= colour_mnist.MIN_DISTANCE).all()
    assert (paper == 0).all() == (background == "black")
    digits = torch.zeros(500, 4, 4, dtype=torch.uint8)
    digits[:, 1:3, 1:3] = 255  # full ink in the middle, none at the border
    images = colour_mnist.paint(digits, ink, paper)  # (500, 3, 4, 4)
    assert images.shape == (500, 3, 4, 4) and images.dtype == torch.uint8
    assert torch.equal(images[:, :, 0, 0], (paper * 255).round().to(torch.uint8))
    assert torch.equal(images[:, :, 1, 1], (ink * 255).round().to(torch.uint8))


def test_colour_mnist_writes_a_colour_image_folder(tmp_path, data_dir):
    out = tmp_path / "colour"
    colour_mnist.main([str(out), "--data-dir", str(data_dir), "--train", "100", "--test", "100"])
    classes = tuple(sorted(folder.name for folder in (out / "train").iterdir()))
    assert set(classes) <= set("0123456789")
    options = FolderOptions(28, 3, classes)
    train, test = load_folder(out, options, log=lambda line: None)
    assert train.images.shape == test.images.shape == (100, 3, 28, 28)
    # Colours, not grey copies: in each image some pixel's red, green and blue differ.
    grey = (train.images[:, 0] == train.images[:, 1]) & (train.images[:, 1] == train.images[:, 2])
    assert not grey.flatten(1).all(dim=1).any()


@pytest.mark.parametrize(
    "script, flags, fragment",
    [
        ("colour_mnist.py", ["--train", "0"], "--train must be between 1 and 60000, got 0"),
        ("colour_mnist.py", ["--test", "99999"], "--test must be between 1 and 10000, got 99999"),
        ("colour_mnist.py", ["--seed", str(10**23)], "--seed must be in 0 .. 2**32 - 1"),
        ("export_imagefolder.py", ["--limit", "-1"], "--limit must be at least 1, got -1"),
        # A split without some class, which train.py would refuse:
        ("colour_mnist.py", ["--train", "20", "--test", "5"], "--train 20 draws no 1, 2, so"),
        ("export_imagefolder.py", ["--limit", "40"], "--limit 40 leaves test/ without 8-8"),
    ],
)
def test_the_tools_refuse_counts_they_cannot_write_and_leave_nothing(
    tmp_path, data_dir, script, flags, fragment
):
    dataset = ["mnist"] if script == "export_imagefolder.py" else []
    out = tmp_path / "out"
    result = run_in_process(
        f"tools/{script}", *dataset, out, "--data-dir", data_dir, *flags, check=False
    )
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_the_folder_loading_tool_reads_the_same_pixels_into_memory_and_streamed(tmp_path):
    root = make_folder(tmp_path / "images")
    records = [
        json.loads(
            run_in_process(
                "tools/folder_loading.py", root, loading, "--workers", 1, "--batch-size", 8
            ).stdout
        )
        for loading in ("memory", "stream")
    ]
    assert [r["images"] for r in records] == [36, 36]  # 3 classes x 12 training images
    assert records[0]["checksum"] == records[1]["checksum"] > 0
    missing = run_in_process("tools/folder_loading.py", tmp_path / "absent", "memory", check=False)
    assert_one_line_error(missing, "absent/train is not a folder")
    for flags, fragment in [
        (("--batch-size", 0), "--batch-size must be at least 1, got 0"),
        (("--workers", -1), "--workers must be at least 0, got -1"),
        (("--image-size", 300), "--image-size must be at most 256, got 300"),
    ]:
        bad = run_in_process("tools/folder_loading.py", root, "memory", *flags, check=False)
        assert_one_line_error(bad, fragment)


@pytest.mark.parametrize("script", ["colour_mnist.py", "export_imagefolder.py"])
def test_the_tools_refuse_an_output_that_is_a_file_or_under_one(tmp_path, data_dir, script):
    dataset = ["mnist"] if script == "export_imagefolder.py" else []
    (tmp_path / "a-file").write_text("kept")
    for out, fragment in ((tmp_path / "a-file", "is a file, not a folder"),
                          (tmp_path / "a-file" / "out", "cannot be created")):  # fmt: skip
        result = run_in_process(
            f"tools/{script}", *dataset, out, "--data-dir", data_dir, check=False
        )
        assert_one_line_error(result, fragment)
    assert (tmp_path / "a-file").read_text() == "kept"


# --- streaming -------------------------------------------------------------------------------


def test_streamed_batches_equal_the_in_memory_ones(tmp_path):
    root = make_folder(tmp_path, colour=True)
    names = ("cat", "dog", "eel")
    memory, _ = load_folder(root, FolderOptions(SIDE, 3, names, "memory"), log=lambda line: None)
    disk, _ = load_folder(root, FolderOptions(SIDE, 3, names, "stream"), log=lambda line: None)
    assert isinstance(disk, FileSplit) and isinstance(memory, Split)
    order = torch.randperm(36, generator=torch.Generator().manual_seed(0))
    from capslab.data import batches

    for (a, y_a), (b, y_b) in zip(batches(memory, 8, order), batches(disk, 8, order), strict=True):
        assert torch.equal(a, b) and torch.equal(y_a, y_b)
    assert torch.equal(disk.images[3], memory.images[3])
    assert torch.equal(disk.subset(torch.tensor([5, 1])).images[:], memory.images[[5, 1]])


@pytest.mark.slow
def test_a_run_streamed_from_disk_equals_the_in_memory_run(tmp_path):
    root = make_folder(tmp_path)
    out = train_folder(root, tmp_path / "memory", "--folder-loading", "memory").stdout
    assert "held in memory" in out
    out = train_folder(root, tmp_path / "disk", "--folder-loading", "stream", "--workers", 1).stdout
    assert "streamed from disk by 1 DataLoader workers" in out
    memory, disk = (load_checkpoint(tmp_path / name / "last.pt") for name in ("memory", "disk"))
    for name, weight in memory["model"].items():
        assert torch.equal(weight, disk["model"][name]), name
    assert memory["metrics"][0]["val_acc"] == disk["metrics"][0]["val_acc"]


def test_a_colour_shift_moves_every_channel_as_the_grayscale_shift_would():
    images = torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8)
    colour = random_shift(images, 2, torch.Generator().manual_seed(3))
    for c in range(3):
        gray = random_shift(images[:, c], 2, torch.Generator().manual_seed(3))
        assert torch.equal(colour[:, c], gray)


def test_the_shift_scales_with_the_image_side():
    assert TrainConfig(dataset="folder", image_size=64).shift == 5  # round(2 * 64 / 28)
    assert TrainConfig(dataset="folder", image_size=28).shift == 2
    assert TrainConfig(dataset="multimnist").shift == 2  # the built-in datasets: as given


# --- bad data: one line naming the file or folder -------------------------------------------


def test_an_empty_class_folder_is_refused(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "fox").mkdir()
    (root / "test" / "fox").mkdir()
    result = train_folder(root, tmp_path / "run", check=False)
    assert_one_line_error(result, str(root / "train" / "fox"), "holds no images")


def test_a_file_that_is_not_an_image_is_skipped_and_counted_by_its_suffix(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("not a picture")
    out = train_folder(root, tmp_path / "run", "--dry-run").stdout
    assert "skipped 1 file without an image suffix" in out


def test_a_file_named_as_an_image_that_is_none_is_refused(tmp_path):
    root = make_folder(tmp_path)
    (root / "test" / "dog" / "broken.png").write_bytes(b"not a png")
    result = train_folder(root, tmp_path / "run", check=False)
    assert_one_line_error(result, str(root / "test" / "dog" / "broken.png"), "not an image")


def test_train_and_test_with_different_classes_are_refused(tmp_path):
    root = make_folder(tmp_path)
    (root / "test" / "eel").rename(root / "test" / "emu")
    result = train_folder(root, tmp_path / "run", check=False)
    assert_one_line_error(result, "different classes", "only in train/: eel", "only in test/: emu")


def test_a_single_class_is_refused(tmp_path):
    root = make_folder(tmp_path, classes=("cat",))
    result = train_folder(root, tmp_path / "run", check=False)
    assert_one_line_error(result, str(root / "train"), "at least 2")


def test_an_image_smaller_than_the_receptive_field_is_refused(tmp_path):
    root = make_folder(tmp_path)
    write_image(root / "train" / "dog" / "tiny.png", 12, colour=False, seed=0)
    result = train_folder(root, tmp_path / "run", check=False)
    assert_one_line_error(result, str(root / "train" / "dog" / "tiny.png"), "12x12", "17x17")


def test_an_image_too_large_to_decode_safely_is_refused(tmp_path):
    root = make_folder(tmp_path)
    bomb = root / "train" / "dog" / "bomb.png"
    bomb.write_bytes(png_header_only(20000, 20000))  # claims 400 M pixels
    result = train_folder(root, tmp_path / "run", check=False)
    assert_one_line_error(result, str(bomb), "too large to decode safely")


@pytest.mark.parametrize("size", [0, 16, 257])
def test_an_image_size_the_model_cannot_take_is_refused(tmp_path, size):
    root = make_folder(tmp_path)
    result = train_folder(root, tmp_path / "run", "--image-size", size, check=False)
    assert_one_line_error(result, "--image-size must be between 17 and 256")


def test_a_missing_folder_is_refused(tmp_path):
    result = train_folder(tmp_path / "nowhere", tmp_path / "run", check=False)
    assert_one_line_error(result, str(tmp_path / "nowhere" / "train"), "is not a folder")


def test_image_size_and_channels_3_are_for_folders_only(tmp_path):
    result = run_in_process("train.py", "--image-size", "32", "--dry-run", check=False)
    assert_one_line_error(result, "--image-size must be 28 for mnist")
    result = run_in_process("train.py", "--channels", "3", "--dry-run", check=False)
    assert_one_line_error(result, "--channels")


# --- the checkpoint's class names through evaluate, predict and hub --------------------------


def test_the_checkpoint_keeps_the_class_names_and_the_settings_that_ran(folder_run):
    _, folder = folder_run
    checkpoint = load_checkpoint(folder / "last.pt")
    assert checkpoint["class_names"] == ["cat", "dog", "eel"]
    assert checkpoint["config"]["in_channels"] == 3 and checkpoint["config"]["image_size"] == SIDE
    assert checkpoint["config"]["num_classes"] == 3
    assert checkpoint["train_config"]["channels"] == 3


def test_evaluate_names_the_classes_in_its_report_and_figures(folder_run, tmp_path):
    root, folder = folder_run
    flags = ["--checkpoint", folder / "best.pt", "--data-dir", root]
    result = json.loads(run_in_process("evaluate.py", *flags, "--json").stdout)
    assert list(result["per_class_accuracy"]) == ["cat", "dog", "eel"]
    assert result["total"] == 12 and len(result["confusion_matrix"]) == 3
    text = run_in_process("evaluate.py", *flags, "--figures", tmp_path).stdout
    assert "0 cat, 1 dog, 2 eel" in text
    assert (tmp_path / "reconstructions.png").is_file()


def test_evaluate_refuses_a_folder_model_on_mnist_and_affine_on_its_size(folder_run, data_dir):
    root, folder = folder_run
    on_mnist = run_in_process(
        "evaluate.py", "--checkpoint", folder / "best.pt", "--dataset", "mnist",
        "--data-dir", data_dir, check=False,
    )  # fmt: skip
    assert_one_line_error(on_mnist, "was trained on folder: --dataset folder scores a model")
    affine = run_in_process(
        "evaluate.py", "--checkpoint", folder / "best.pt", "--data-dir", root, "--affine",
        check=False,
    )  # fmt: skip
    assert_one_line_error(affine, "--affine transforms 28x28 images")


def test_evaluate_refuses_a_test_folder_with_other_classes(folder_run, tmp_path):
    _, folder = folder_run
    other = make_folder(tmp_path, classes=("ant", "bee"))
    result = run_in_process(
        "evaluate.py", "--checkpoint", folder / "best.pt", "--data-dir", other, check=False
    )
    assert_one_line_error(result, str(other / "test"), "ant, bee", "cat, dog, eel")


def test_predict_prints_the_class_names(folder_run, tmp_path):
    root, folder = folder_run
    image = root / "test" / "dog" / "0.png"
    result = run_in_process(
        "predict.py", image, "--checkpoint", folder / "best.pt", "--json", "--show", tmp_path
    )
    (record,) = json.loads(result.stdout)
    assert record["prediction"] in ("cat", "dog", "eel")
    assert list(record["capsule_lengths"]) == ["cat", "dog", "eel"]
    assert Image.open(tmp_path / "0_reconstruction.png").mode == "RGB"


def test_hub_loads_an_exported_folder_model_with_its_class_names(folder_run, tmp_path):
    _, folder = folder_run
    run_in_process("export.py", folder / "best.pt", tmp_path / "exported.pt")
    model = hubconf.capsnet(checkpoint=tmp_path / "exported.pt")
    assert model.class_names == ["cat", "dog", "eel"]
    lengths, reconstructions, _ = model(torch.rand(2, 3, SIDE, SIDE))
    assert lengths.shape == (2, 3) and reconstructions.shape == (2, 3, SIDE, SIDE)


def test_a_sweep_checks_a_folder_grid_against_its_own_data_dir(tmp_path):
    """The grid's flags are checked with the --data-dir the sweep trains with (a folder there
    holds the classes), not train.py's default data/."""
    make_folder(tmp_path / "images")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "fold", "flags": ["--dataset", "folder"]}]))
    listed = run_in_process("sweep.py", grid, "--list", "--data-dir", tmp_path / "images")
    assert listed.stdout == "[fold] to do\n"
    elsewhere = tmp_path / "elsewhere"
    refused = run_in_process("sweep.py", grid, "--list", "--data-dir", elsewhere, check=False)
    assert_one_line_error(refused, "run 1 ('fold'): 'flags':", str(elsewhere / "train"))
