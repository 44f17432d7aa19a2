"""Divergence that stays finite: a loss that grows by orders of magnitude stops the run with the
step named and the last good checkpoint kept, and a run at chance is warned about."""

import pytest
import torch

import train
from capslab import training
from capslab.checkpoint import load_checkpoint
from capslab.data import first_images, load_split
from CapsNet import CapsNet

from conftest import CPU, SMALL, SMALL_MODEL, SMALL_SCHEDULE, own_process_state

DIVERGING = [*SMALL_SCHEDULE[:-1], "1e3", *SMALL_MODEL, "--train-subset", "128", "--val-size", "64",
             "--test-subset", "32", "--batch-size", "32", "--quiet"]  # fmt: skip


def test_a_cnn_whose_loss_explodes_stops_with_the_step_named(data_dir, tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(training.NonFiniteError) as error, own_process_state():
        train.main(["--model", "cnn", *DIVERGING, "--epochs", "2", "--data-dir", str(data_dir),
                    "--checkpoint-dir", str(folder)])  # fmt: skip
    message = str(error.value)
    assert "\n" not in message and "diverged at epoch 1 step" in message
    assert "nothing was saved yet" in message and not (folder / "last.pt").exists()


def test_divergence_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    config = training.TrainConfig(
        batch_size=16, epochs=1, val_size=0, schedule="exponential", bf16=False
    )
    trainer = training.Trainer(
        config, CapsNet(SMALL), CPU, steps_per_epoch=4, checkpoint_dir=tmp_path
    )
    digits = first_images(load_split("mnist", data_dir, train=False), 16)
    generator = torch.Generator().manual_seed(0)
    trainer.train_step(digits.images, digits.labels, generator)  # the first loss, the reference
    saved = trainer.save("last.pt")
    before = load_checkpoint(saved)["model"]
    trainer.progress.initial_loss = 1e-6  # as if the run had started a million times lower
    with pytest.raises(training.NonFiniteError, match=f"the last good checkpoint is {saved}"):
        trainer.train_step(digits.images, digits.labels, generator)
    after = load_checkpoint(saved)["model"]
    assert all(torch.equal(before[name], after[name]) for name in before)
    # The step was refused before Adam moved the weights.
    assert all(torch.equal(trainer.model.state_dict()[n], before[n]) for n in before)


@pytest.mark.slow  # seconds of training: the fast loop stays near a minute
def test_a_capsnet_trained_to_chance_is_warned_about_and_exits_cleanly(data_dir, tmp_path, capsys):
    with own_process_state():
        train.main([*DIVERGING, "--epochs", "1", "--data-dir", str(data_dir),
                    "--checkpoint-dir", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr()
    assert "is at chance (10.0%)" in printed.out + printed.err
    assert "try a lower --lr" in printed.out + printed.err


def test_a_short_run_that_learns_is_not_warned_about(data_dir, tmp_path, capsys):
    with own_process_state():
        train.main([*SMALL_SCHEDULE, *SMALL_MODEL, "--train-subset", "128", "--val-size", "64",
                    "--test-subset", "32", "--batch-size", "32", "--quiet", "--epochs", "1",
                    "--data-dir", str(data_dir), "--checkpoint-dir", str(tmp_path)])  # fmt: skip
    printed = capsys.readouterr()
    assert "at chance" not in printed.out + printed.err
