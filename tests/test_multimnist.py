"""MultiMNIST (the paper's section 6): the pair generator, the two-digit losses, the top-2
measure, and train/evaluate/export/hub end to end on a few hundred pairs."""

import json

import pytest
import torch
import torch.nn.functional as F

import evaluate
import export
import hubconf
import train
from capslab import data
from capslab.checkpoint import load_checkpoint, load_model
from capslab.data import Split, load_run_splits
from capslab.errors import UserError
from capslab.multimnist import (
    CANVAS,
    MAX_SHIFT,
    PairPool,
    PairScores,
    fixed_pairs,
    overlay,
    place,
)
from capslab.scoring import pair_report
from capslab.training import TrainConfig
from CapsNet import CapsNet, CapsNetConfig, capsule_loss, margin_loss, reconstruction_loss

from conftest import (
    CPU,
    REPO,
    SMALL_MODEL,
    SMALL_SCHEDULE,
    assert_one_line_error,
    own_process_state,
    run_in_process,
)


def marked_digits(count: int, classes: int = 10, first_marker: int = 1) -> Split:
    """Synthetic 28x28 'digits': a 20x20 box (MNIST's digit box) filled with the digit's own
    marker value, so every pixel of a pair tells which digits it came from."""
    images = torch.zeros(count, 28, 28, dtype=torch.uint8)
    markers = torch.arange(first_marker, first_marker + count, dtype=torch.uint8)
    images[:, 4:24, 4:24] = markers[:, None, None]
    return Split(images, torch.arange(count) % classes)


def offset_of(digit: torch.Tensor, placed: torch.Tensor) -> tuple[int, int] | None:
    """The (dy, dx) in [-4, 4] with place(digit, (dy, dx)) == placed, or None."""
    for dy in range(-MAX_SHIFT, MAX_SHIFT + 1):
        for dx in range(-MAX_SHIFT, MAX_SHIFT + 1):
            if torch.equal(place(digit[None], torch.tensor([[dy, dx]]))[0], placed):
                return dy, dx
    return None


def test_place_centres_the_digit_and_shifts_it_without_wrapping():
    digit = marked_digits(1).images  # (1, 28, 28)
    centred = place(digit, torch.tensor([[0, 0]]))[0]
    assert centred.shape == (CANVAS, CANVAS)
    assert torch.equal(centred, F.pad(digit[0], (4, 4, 4, 4)))
    moved = place(digit, torch.tensor([[-4, 3]]))[0]  # up 4, right 3
    assert torch.equal(moved, torch.roll(centred, shifts=(-4, 3), dims=(0, 1)))
    assert moved.sum() == centred.sum()  # nothing fell off the canvas


def test_pairs_have_the_papers_shapes_classes_and_shift_range():
    pool = PairPool(marked_digits(60))
    generator = torch.Generator().manual_seed(0)
    pairs = pool.make_pairs(pool.images[:32], pool.labels[:32], generator)
    assert pairs.images.shape == (32, CANVAS, CANVAS) and pairs.images.dtype == torch.uint8
    assert pairs.labels.shape == (32, 2) and pairs.sources.shape == (32, 2, CANVAS, CANVAS)
    assert torch.equal(pairs.labels[:, 0], pool.labels[:32])
    assert (pairs.labels[:, 0] != pairs.labels[:, 1]).all()  # two different classes
    offsets = []
    for k in range(32):
        first = offset_of(pool.images[k], pairs.sources[k, 0])
        marker = pairs.sources[k, 1].max().item()  # the partner's own marker
        partner = pool.images[marker - 1]
        second = offset_of(partner, pairs.sources[k, 1])
        assert first is not None and second is not None  # each a digit moved by at most 4 px
        assert pool.labels[marker - 1] == pairs.labels[k, 1]
        offsets += [first, second]
    # 64 shifts, uniform over 9 values per axis: both ends of each axis are reached.
    assert {dy for dy, _ in offsets} >= {-4, 4} and {dx for _, dx in offsets} >= {-4, 4}


def test_the_same_seed_gives_the_same_pairs_and_another_seed_others():
    digits = marked_digits(50)
    first, again, other = (fixed_pairs(digits, seed) for seed in (3, 3, 4))
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other.images)


def test_overlay_adds_and_clips_so_both_digits_stay_visible():
    pairs = fixed_pairs(marked_digits(40, first_marker=150), seed=0)  # markers 150..189
    a, b = pairs.sources[:, 0].int(), pairs.sources[:, 1].int()
    assert torch.equal(pairs.images.int(), (a + b).clamp(max=255))
    assert (pairs.images >= pairs.sources[:, 0]).all() and (
        pairs.images >= pairs.sources[:, 1]
    ).all()
    assert torch.equal(overlay(pairs.sources[:, 0], pairs.sources[:, 1]), pairs.images)
    # Where the two digits overlap the sum saturates: 255, still ink, not wrapped around.
    overlap = (a > 0) & (b > 0)
    assert overlap.any() and (pairs.images[overlap] == 255).all()


def test_partners_are_uniform_over_the_other_classes():
    pool = PairPool(marked_digits(200))
    labels = torch.zeros(20000, dtype=torch.long)  # all class 0
    partner_classes = pool.labels[pool.partners(labels, torch.Generator().manual_seed(0))]
    counts = torch.bincount(partner_classes, minlength=10)
    assert counts[0] == 0
    assert (counts[1:] - 20000 / 9).abs().max() < 5 * (20000 / 9) ** 0.5  # within 5 sigma


def test_partners_skip_absent_classes_and_never_pick_the_own_class():
    """A pool with classes 1, 4 and 7 only: each class pairs with the other two, evenly."""
    digits = marked_digits(90)
    pool = PairPool(
        digits.subset(torch.nonzero(torch.isin(digits.labels, torch.tensor([1, 4, 7]))).squeeze(1))
    )
    for own in (1, 4, 7):
        labels = torch.full((9000,), own)
        partner_classes = pool.labels[pool.partners(labels, torch.Generator().manual_seed(own))]
        counts = torch.bincount(partner_classes, minlength=10)
        others = [k for k in (1, 4, 7) if k != own]
        assert counts.sum() == counts[others].sum() == 9000  # only the other present classes
        assert (counts[others] - 4500).abs().max() < 5 * 4500**0.5  # within 5 sigma of even


def test_a_pool_of_one_class_is_refused():
    digits = marked_digits(30)
    with pytest.raises(ValueError, match="at least two classes"):
        PairPool(digits.subset(torch.nonzero(digits.labels == 3).squeeze(1)))


def test_test_pairs_are_the_same_whatever_the_runs_seed(monkeypatch):
    train_digits, test_digits = marked_digits(120), marked_digits(60, first_marker=150)
    monkeypatch.setattr(
        data, "load_split", lambda dataset, folder, train: train_digits if train else test_digits
    )
    _, val_0, test_0 = load_run_splits("multimnist", "unused", 40, None, None, seed=0)
    _, val_5, test_5 = load_run_splits("multimnist", "unused", 40, None, None, seed=5)
    assert torch.equal(test_0.images, test_5.images) and torch.equal(test_0.labels, test_5.labels)
    assert not torch.equal(val_0.images, val_5.images)  # validation follows --seed


@pytest.mark.parametrize(
    "flags, fragment",
    [(["--val-size", "1"], "--val-size 1"), (["--train-subset", "1"], "--train-subset 1")],
)
def test_pairs_from_digits_of_one_class_are_refused_in_one_line(
    data_dir, tmp_path, flags, fragment
):
    result = run_in_process(
        "train.py", "--dataset", "multimnist", *flags, "--dry-run", "--data-dir", data_dir,
        "--checkpoint-dir", tmp_path / "run", check=False,
    )  # fmt: skip
    assert_one_line_error(result, fragment, "at least two classes")


def test_validation_and_test_pairs_hold_no_training_digit(monkeypatch):
    """Every pixel of a pair carries its digit's marker: validation pairs may show only
    validation markers, test pairs only test markers."""
    train_digits, test_digits = marked_digits(120), marked_digits(60, first_marker=150)
    monkeypatch.setattr(
        data, "load_split", lambda dataset, folder, train: train_digits if train else test_digits
    )
    train, val, test = load_run_splits("multimnist", "unused", 40, None, 30, seed=5)
    assert isinstance(train, PairPool) and len(train) == 80 and len(val) == 40 and len(test) == 30
    train_markers = set(train.images.unique().tolist()) - {0}
    for pairs, allowed in ((val, set(range(1, 121)) - train_markers), (test, set(range(150, 210)))):
        shown = set(pairs.sources.unique().tolist()) - {0}
        assert shown <= allowed, shown - allowed
    # A training batch only ever pairs training digits.
    batch = train.training_batch(train.images[:50], train.labels[:50], 2, torch.Generator())
    assert set(batch.sources.unique().tolist()) - {0} <= train_markers


def test_two_class_margin_loss_matches_a_hand_computation():
    lengths = torch.tensor([[0.95, 0.5, 0.05, 0.3]])  # classes 0 and 1 present
    target = torch.tensor([[0, 1]])
    present = (0.9 - 0.5) ** 2  # class 0 is above m+, class 1 is 0.4 short of it
    absent = 0.5 * (0.3 - 0.1) ** 2  # class 2 is under m-, class 3 is 0.2 over
    assert margin_loss(lengths, target).item() == pytest.approx(present + absent)
    # One label is the single-digit loss, whichever way it is passed.
    one = torch.tensor([0])
    assert torch.equal(margin_loss(lengths, one), margin_loss(lengths, one[:, None]))


def test_two_digit_reconstruction_loss_compares_each_digit_with_its_own_image():
    drawn = torch.zeros(1, 2, 1, 4, 4)
    drawn[0, 0] = 1.0  # the first reconstruction is all ink, the second empty
    sources = torch.zeros(1, 2, 1, 4, 4)
    sources[0, 0, 0, 0, :2] = 1.0  # the first digit has 2 ink pixels, the second 3
    sources[0, 1, 0, 1, :3] = 1.0
    assert reconstruction_loss(drawn, sources).item() == pytest.approx(14 + 3)
    lengths, labels = torch.full((1, 10), 0.5), torch.tensor([[0, 1]])
    total = capsule_loss(lengths, drawn, sources, labels)
    expected = margin_loss(lengths, labels) + 0.0005 * 17
    assert total.item() == pytest.approx(expected.item())


def test_the_decoder_draws_each_digit_from_its_own_capsule():
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(image_size=CANVAS, conv1_channels=16, primary_channels=4))
    x = torch.rand(3, 1, CANVAS, CANVAS)
    target = torch.tensor([[1, 7], [2, 3], [9, 0]])
    lengths, drawn, v = model(x, target)
    assert lengths.shape == (3, 10) and drawn.shape == (3, 2, 1, CANVAS, CANVAS)
    one_by_one = torch.stack([model.decoder(v, target[:, k]) for k in range(2)], dim=1)
    torch.testing.assert_close(drawn, one_by_one)
    weights = torch.rand_like(drawn)  # the same gradient for v and the decoder either way
    grads = [
        torch.autograd.grad((d * weights).sum(), [v, *model.decoder.parameters()])
        for d in (drawn, one_by_one)
    ]
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)
    assert model.config.num_primary_caps == 4 * 10 * 10  # 36 -> 28 -> 10x10 grid


def test_top2_measure_on_a_made_up_example():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # top two {0, 1}: right
            [0.9, 0.1, 0.8, 0.0],  # {0, 2} for {0, 1}: one digit of two
            [0.1, 0.2, 0.8, 0.9],  # {2, 3} for {1, 0}: none
            [0.8, 0.9, 0.0, 0.1],  # {1, 0} in the other order: right
        ]
    )
    labels = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    scored = PairScores.of(scores, labels)
    assert scored.both_correct.tolist() == [True, False, False, True]
    assert scored.digits_found.tolist() == [2, 1, 0, 2]
    report = pair_report(labels, scores, ["0", "1", "2", "3"])
    assert report["error"] == 50.0 and report["digit_accuracy"] == pytest.approx(62.5)
    assert report["per_class_accuracy"]["0"] == 75.0  # 3 of the 4 zeros found
    assert report["per_class_accuracy"]["1"] == 50.0  # 2 of the 4 ones
    assert report["per_class_accuracy"]["3"] is None  # no pair holds a 3: no score, not 0%


# A narrow CapsNet on 36x36 pairs, trained once for the CLI tests below.
@pytest.fixture(scope="module")
def multimnist_run(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("multimnist")
    argv = [
        "--dataset", "multimnist", "--data-dir", str(data_dir), "--checkpoint-dir", str(folder),
        *SMALL_SCHEDULE, *SMALL_MODEL, "--epochs", "1", "--train-subset", "192", "--val-size", "96",
        "--test-subset", "96", "--batch-size", "32", "--quiet",
    ]  # fmt: skip
    with own_process_state():
        train.main(argv)
    return folder


def test_train_on_pairs_writes_a_36x36_checkpoint_scored_by_the_papers_measure(
    multimnist_run, data_dir
):
    checkpoint = load_checkpoint(multimnist_run / "best.pt")
    assert checkpoint["dataset"] == "multimnist"
    assert checkpoint["config"]["image_size"] == CANVAS
    assert checkpoint["model"]["digit_caps.W"].shape[0] == 8 * 10 * 10  # 8 types on a 10x10 grid
    record = json.loads((multimnist_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train_loss"] > 0 and "wall_seconds" in record and record["machine"]
    # The paper's measure, written plainly: a pair is right when its two longest capsules
    # are its two digits. The run's 96 validation pairs, rebuilt as train.py built them.
    val = load_run_splits("multimnist", data_dir, 96, 192, 96, TrainConfig().seed)[1]
    model, _ = load_model(multimnist_run / "best.pt", CPU)
    with torch.no_grad():
        lengths = model(data.to_model_input(val.images, CPU))[0]  # (96, 10)
    top_two = lengths.topk(2, dim=1).indices.sort(dim=1).values
    right = (top_two == val.labels.sort(dim=1).values).all(dim=1)
    assert record["val_acc"] == pytest.approx(100 * right.float().mean().item())


def test_evaluate_scores_the_fixed_test_pairs_and_draws_figure_5(
    multimnist_run, data_dir, tmp_path, capsys
):
    checkpoint = multimnist_run / "best.pt"
    evaluate.main(
        ["--checkpoint", str(checkpoint), "--dataset", "multimnist", "--data-dir", str(data_dir),
         "--test-subset", "96", "--json", "--figures", str(tmp_path)]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "multimnist" and result["total"] == 96
    assert result["error"] == pytest.approx(100 - result["accuracy"])
    assert result["digit_accuracy"] >= result["accuracy"]
    saved = load_checkpoint(checkpoint)
    assert result["accuracy"] == pytest.approx(saved["metrics"][-1]["test_acc"])
    assert (tmp_path / "multimnist_reconstructions.png").stat().st_size > 0


def test_evaluate_refuses_a_pairs_checkpoint_on_single_digits(multimnist_run, data_dir):
    result = run_in_process(
        "evaluate.py", "--dataset", "mnist", "--checkpoint", multimnist_run / "best.pt",
        "--data-dir", data_dir, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "36x36")


@pytest.mark.parametrize("flag", ["--routing-stats", "--affine"])
def test_evaluate_refuses_single_digit_scores_on_pairs(multimnist_run, data_dir, flag):
    result = run_in_process(
        "evaluate.py", "--dataset", "multimnist", "--checkpoint", multimnist_run / "best.pt",
        "--data-dir", data_dir, "--test-subset", 8, flag, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "score single digits, not multimnist pairs")


def test_exported_pairs_model_loads_through_torch_hub(multimnist_run, tmp_path):
    exported = tmp_path / "pairs.pt"
    export.main([str(multimnist_run / "best.pt"), str(exported)])
    model = torch.hub.load(str(REPO), "capsnet_multimnist", source="local", checkpoint=exported)
    assert not model.training
    lengths, drawn, v = model(torch.rand(2, 1, CANVAS, CANVAS))
    assert lengths.shape == (2, 10) and drawn.shape == (2, 1, CANVAS, CANVAS)
    fresh = hubconf.capsnet_multimnist(pretrained=False)
    assert fresh.config.image_size == CANVAS


def test_a_single_label_model_on_pairs_is_refused_before_any_data_is_read(tmp_path):
    with pytest.raises(UserError, match="--model must be capsnet with --dataset multimnist") as e:
        train.main(["--dataset", "multimnist", "--model", "cnn", "--data-dir",
                    str(tmp_path / "none"), "--checkpoint-dir", str(tmp_path / "run")])  # fmt: skip
    assert "\n" not in str(e.value) and not (tmp_path / "none").exists()
