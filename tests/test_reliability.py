"""Nothing lost, nothing silent: concurrent runs, signals, crash points, full disks, broken data
and broken checkpoints. Signals, the lock between runs, kill -9 and a closed pipe need the real
process (`run`, subprocess.Popen); the other CLI tests call the script's main in this process
(`run_in_process`), with the same output and exit status."""

import ast
import gzip
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capslab import atomic, checkpoint, errors, training
from capslab.checkpoint import load_checkpoint, save_checkpoint
from capslab.errors import UserError, exit_on_user_error

from conftest import (
    REPO,
    SMALL_RUN,
    assert_one_line_error,
    own_process_state,
    run,
    run_in_process,
    train_in_process,
)

RAW = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def start_training(data_dir, folder, *extra) -> subprocess.Popen:
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "--data-dir",
        str(data_dir),
        "--checkpoint-dir",
        str(folder),
        *SMALL_RUN,
        *map(str, extra),
    ]
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_first_epoch(folder, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (folder / "metrics.jsonl").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no epoch finished in time"
        time.sleep(0.2)


@pytest.mark.slow
def test_second_run_is_refused_and_sigterm_saves_a_resumable_checkpoint(data_dir, tmp_path):
    first = start_training(data_dir, tmp_path, "--epochs", 1000)
    try:
        wait_for_first_epoch(tmp_path, first)
        second = run(
            "train.py",
            "--data-dir",
            data_dir,
            "--checkpoint-dir",
            tmp_path,
            "--resume",
            check=False,
        )
        assert_one_line_error(second, "another train.py is writing to")
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert "SIGTERM: stopping after this batch" in out and "interrupted: saved" in out
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["epoch"] >= 1 and len(saved["metrics"]) == saved["epoch"]
    # The lock went with the process: the run continues from where SIGTERM stopped it.
    resumed = train_in_process(data_dir, tmp_path, "--epochs", saved["epoch"] + 1, "--resume")
    assert resumed["epoch"] == saved["epoch"] + 1


@pytest.mark.slow
def test_kill_9_leaves_a_consistent_set_and_no_lock(data_dir, tmp_path):
    victim = start_training(data_dir, tmp_path, "--epochs", 1000)
    try:
        wait_for_first_epoch(tmp_path, victim)
        time.sleep(1.5)  # somewhere in a later epoch, or inside a checkpoint write
    finally:
        victim.kill()
        victim.communicate()
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(logged) <= last["epoch"] and best["epoch"] >= 1
    assert max(r["val_acc"] for r in last["metrics"]) == last["best_val"]  # best.pt holds it
    resumed = train_in_process(data_dir, tmp_path, "--epochs", last["epoch"] + 1, "--resume")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == resumed["epoch"]


@pytest.mark.slow
def test_a_crash_between_checkpoint_writes_never_leaves_last_ahead_of_best(
    data_dir, tmp_path, monkeypatch
):
    train_in_process(data_dir, tmp_path, "--epochs", 1)
    real_save = training.save_checkpoint

    def die_on_last(state, path):
        if path.name == "last.pt":
            raise KeyboardInterrupt  # stands in for kill -9 right after best.pt was written
        real_save(state, path)

    monkeypatch.setattr(training, "save_checkpoint", die_on_last)
    with pytest.raises(KeyboardInterrupt):
        train_in_process(data_dir, tmp_path, "--epochs", 2, "--resume", "--max-shift", "2")
    last = load_checkpoint(tmp_path / "last.pt")
    assert last["epoch"] == 1 and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] >= last["epoch"]


@pytest.mark.slow
def test_stale_temporary_files_are_removed_at_start(data_dir, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".last.pt.tmp"
    stale.write_bytes(b"x" * 1000)
    train_in_process(data_dir, tmp_path, "--epochs", 1)
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp"))


def test_an_unwritable_checkpoint_dir_is_refused_before_training(data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_in_process(
        "train.py", "--data-dir", data_dir, "--checkpoint-dir", blocker, *SMALL_RUN, check=False
    )
    assert_one_line_error(result, f"--checkpoint-dir {blocker} is a file, not a folder")
    assert "epoch" not in result.stdout


def full_disk(obj, target):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")


def crash_mid_write(obj, target):
    with open(target, "wb") as file:
        file.write(b"half a checkpoint")
    raise OSError("Input/output error")


@pytest.mark.parametrize(
    "failing_save, message",
    [
        (full_disk, "the disk is full.*the previous last.pt is unchanged"),
        (crash_mid_write, "could not write .*last.pt.*the previous last.pt is unchanged"),
    ],
)
def test_a_failed_write_says_why_and_keeps_the_previous_file(
    tmp_path, monkeypatch, failing_save, message
):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}}, path)
    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(UserError, match=message):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]


def damaged_gzip(content: bytes) -> bytes:
    """`content` gzipped, then 64 bytes in the middle of the stream overwritten."""
    packed = bytearray(gzip.compress(content))
    middle = len(packed) // 2
    packed[middle : middle + 64] = bytes(64)
    return bytes(packed)


def test_an_atomic_write_reaches_the_disk_before_the_rename_and_the_rename_after(
    tmp_path, monkeypatch
):
    """A power cut after the rename must not leave an empty file: the temporary's bytes are
    fsynced first, and the folder's entry once renamed."""
    steps = []
    real_fsync, real_replace = atomic.os.fsync, atomic.os.replace
    monkeypatch.setattr(
        atomic.os,
        "fsync",
        lambda fd: steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd),
    )
    monkeypatch.setattr(
        atomic.os, "replace", lambda a, b: steps.append(("replace", str(b))) or real_replace(a, b)
    )
    target = tmp_path / "record.txt"
    atomic.write_atomically(target, lambda temporary: temporary.write_text("whole"))
    temporary = atomic.temporary_path(target)
    assert steps == [("fsync", str(temporary)), ("replace", str(target)), ("fsync", str(tmp_path))]
    assert target.read_text() == "whole" and not temporary.exists()


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("truncated", "corrupt"),
        ("bad_header", "corrupt"),
        ("gzip_damaged", "corrupt"),
        ("no_labels", "holds no images or labels"),
    ],
)
def test_a_damaged_mnist_file_is_named(data_dir, tmp_path, damage, fragment):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW:
        shutil.copy(data_dir / "MNIST" / "raw" / name, raw / name)
    broken = raw / "train-labels-idx1-ubyte"
    content = broken.read_bytes()
    if damage == "gzip_damaged":
        broken.unlink()
        broken = broken.with_name(broken.name + ".gz")
    broken.write_bytes(
        {
            "truncated": lambda: content[:5000],
            "bad_header": lambda: b"GIF89a" + content[6:],
            "gzip_damaged": lambda: damaged_gzip(content),
            "no_labels": lambda: idx_bytes(torch.zeros(0)),
        }[damage]()
    )
    result = run_in_process(
        "train.py",
        "--data-dir",
        tmp_path / "data",
        "--checkpoint-dir",
        tmp_path / "run",
        *SMALL_RUN,
        check=False,
    )
    assert_one_line_error(result, str(broken), fragment)


@pytest.mark.slow
def test_files_the_user_cannot_read_are_named_as_such_not_as_damaged(
    data_dir, tmp_path, tiny_checkpoint
):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW:
        (raw / name).symlink_to(data_dir / "MNIST" / "raw" / name)
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.unlink()
    shutil.copy(data_dir / "MNIST" / "raw" / labels.name, labels)
    locked = tmp_path / "locked.pt"
    shutil.copy(tiny_checkpoint, locked)
    for path in (labels, locked):
        path.chmod(0)
    scored = run(
        "evaluate.py", "--checkpoint", tiny_checkpoint, "--data-dir", tmp_path / "data",
        check=False, as_a_user=True,
    )  # fmt: skip
    assert_one_line_error(scored, f"{labels} cannot be read (Permission denied)")
    refused = run("evaluate.py", "--checkpoint", locked, check=False, as_a_user=True)
    assert_one_line_error(refused, f"checkpoint {locked} cannot be read (Permission denied)")


def idx_bytes(values: torch.Tensor) -> bytes:
    """An IDX file of unsigned bytes: magic, the shape (big-endian), the values."""
    shape = b"".join(size.to_bytes(4, "big") for size in values.shape)
    return bytes([0, 0, 8, values.dim()]) + shape + values.to(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    "images, labels, fragment",
    [
        (
            torch.zeros(3, 28, 28),
            torch.tensor([0, 12, 9]),
            "t10k label 1 is 12; the classes are 0 to 9",
        ),
        (torch.zeros(3, 32, 32), torch.tensor([0, 1, 2]), "are not MNIST's (N, 28, 28) and (N,)"),
        (torch.zeros(3, 28, 28), torch.zeros(3, 2), "are not MNIST's (N, 28, 28) and (N,)"),
    ],
)
def test_idx_files_that_are_no_mnist_are_refused_by_name(tmp_path, images, labels, fragment):
    """Well-formed IDX files holding other shapes or labels beyond 9: refused, not trained on."""
    from capslab.data import read_raw

    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path))}: .*{re.escape(fragment)}"):
        read_raw(tmp_path, train=False)


def test_batch_size_beyond_the_data_is_a_clear_error(data_dir, tmp_path):
    result = run_in_process(
        "train.py",
        "--data-dir",
        data_dir,
        "--checkpoint-dir",
        tmp_path,
        *SMALL_RUN,
        "--batch-size",
        100000,
        check=False,
    )
    assert_one_line_error(result, "--batch-size 100000", "96 training images")


def test_out_of_memory_is_one_line_and_keeps_last(data_dir, tmp_path, monkeypatch):
    train_in_process(data_dir, tmp_path, "--epochs", 1)
    last_before = (tmp_path / "last.pt").read_bytes()

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(training.Trainer, "train_step", exhausted)
    common = ["--data-dir", data_dir, *SMALL_RUN, "--epochs", 2]
    resumed = run_in_process(
        "train.py", *common, "--checkpoint-dir", tmp_path, "--resume", check=False
    )
    assert_one_line_error(
        resumed,
        "out of memory on cpu at --batch-size 32: lower --batch-size",
        f"{tmp_path / 'last.pt'} is unchanged",
    )
    assert (tmp_path / "last.pt").read_bytes() == last_before
    fresh = run_in_process("train.py", *common, "--checkpoint-dir", tmp_path / "new", check=False)
    assert_one_line_error(fresh, "lower --batch-size; nothing was saved")


@pytest.fixture(scope="module")
def saved_run(trained_run):
    """The last.pt of conftest's trained_run, the session's small run."""
    return load_checkpoint(trained_run[0] / "last.pt")


@pytest.mark.parametrize(
    "break_it, fragment",
    [
        (lambda c: c["train_config"].update(lr=-1), "invalid training settings"),
        (lambda c: c["train_config"].update(batch_size="32"), "invalid training settings"),
        (lambda c: c["config"].update(routing_iterations=0), "invalid model config"),
        (lambda c: c["config"].update(routing_iterations="3"), "invalid model config"),
        (lambda c: c.update(train_config=[1, 2]), "invalid training settings"),
        (lambda c: c.update(config="capsnet"), "invalid model config"),
        (  # a crafted config, within each size's bounds, too big to build: refused, not OOM-killed
            lambda c: c["config"].update(conv1_channels=2**31 - 1),
            "parameters: loading it needs",
        ),
        (lambda c: c["config"].update(image_size=2**31 - 1), "model cannot be built ("),
        (
            lambda c: c["model"].update({"digit_caps.W": torch.zeros(3)}),
            "digit_caps.W has shape (3,)",
        ),
        (lambda c: c["model"]["conv1.conv.bias"].fill_(float("nan")), "conv1.conv.bias holds NaN"),
        (lambda c: c.update(dataset="emnist"), "unknown dataset 'emnist'"),
        (
            lambda c: c["model"].update({"conv1.conv.bias": c["model"]["conv1.conv.bias"].long()}),
            "conv1.conv.bias is torch.int64, the model needs torch.float32",
        ),
        (lambda c: c.update(class_names=["a", "b"]), "names 2 classes for a model of 10 outputs"),
        (lambda c: c.update(model_kind=["capsnet"]), "unknown model kind ['capsnet']"),
        (lambda c: c.update(metrics={"epoch": 1}), "its 'metrics' are not a list of records"),
        (lambda c: c.update(epoch="2"), "holds an invalid epoch '2' (not a count)"),
        (lambda c: c.update(epoch=None), "holds an invalid epoch None (not a count)"),
        (lambda c: c.update(epochs_before=-1), "holds an invalid epochs_before -1 (not a count)"),
    ],
)
def test_a_broken_checkpoint_is_refused_in_one_line(
    saved_run, data_dir, tmp_path, break_it, fragment
):
    broken = {
        **saved_run,
        "config": dict(saved_run["config"]),
        "train_config": dict(saved_run["train_config"]),
        "model": {k: v.clone() for k, v in saved_run["model"].items()},
    }
    break_it(broken)
    torch.save(broken, tmp_path / "last.pt")
    resume = ["--checkpoint-dir", tmp_path, "--resume", "--epochs", 3]  # one epoch more
    resumed = run_in_process("train.py", "--data-dir", data_dir, *resume, check=False)
    assert_one_line_error(resumed, str(tmp_path / "last.pt"), fragment)
    if "training settings" not in fragment:  # evaluate.py reads no training settings
        scored = run_in_process(
            "evaluate.py", "--checkpoint", tmp_path / "last.pt", "--data-dir", data_dir, check=False
        )
        assert_one_line_error(scored, str(tmp_path / "last.pt"), fragment)


def test_a_flipped_byte_inside_the_weights_is_caught_by_its_checksum(saved_run, tmp_path):
    """torch.load checks no CRC: without load_checkpoint's check this loads as a wrong weight."""
    path = tmp_path / "last.pt"
    torch.save(saved_run, path)
    content = bytearray(path.read_bytes())
    weights = saved_run["model"]["digit_caps.W"].numpy().tobytes()
    start = content.find(weights)
    assert start > 0  # stored as is: zip does not compress torch's tensors
    content[start + len(weights) // 2] ^= 0x40
    path.write_bytes(content)
    torch.load(path, weights_only=True)  # loads, one weight changed
    with pytest.raises(UserError, match=r"last.pt is corrupt: its .*/data/\d+ fails its checksum"):
        load_checkpoint(path)


def test_a_forked_worker_ignores_the_ctrl_c_its_parent_handles(capsys):
    with own_process_state():
        stop = training.StopRequest()
        stop.owner += 1  # as a DataLoader worker forked after the handler was installed sees it
        stop.handle(signal.SIGINT, None)
        stop.handle(signal.SIGINT, None)  # not even a second one aborts it
        assert not stop.requested and capsys.readouterr().out == ""
        stop.owner -= 1
        stop.handle(signal.SIGINT, None)
        assert stop.requested and "SIGINT: stopping after this batch" in capsys.readouterr().out


@pytest.mark.slow
def test_a_reader_that_stops_early_gets_no_traceback():
    # `python sweep.py GRID --table | head -1`: the reader is gone before the table is written.
    command = [sys.executable, str(REPO / "sweep.py"), "results/grids/recipe.json", "--table"]
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 1
    assert stderr == ""


SCRIPTS_THAT_LOAD_TORCH = [
    "train.py", "evaluate.py", "predict.py", "export.py", "sweep.py", "bench.py",
    *(f"tools/{name}.py" for name in ("colour_mnist", "conv_gradient_timing", "export_imagefolder",
                                      "folder_loading", "routing_kernel_timing")),
]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS_THAT_LOAD_TORCH)
def test_each_script_sets_what_ctrl_c_does_before_it_loads_torch(script):
    """The call comes before any import but the standard library's and capslab.errors (which
    imports nothing else): the test below cannot tell, on a machine that loads torch fast."""
    body = ast.parse((REPO / script).read_text()).body
    calls = [
        index
        for index, node in enumerate(body)
        if isinstance(node, ast.Expr)
        and ast.unparse(node) == "exit_on_ctrl_c_while_loading(__name__)"
    ]
    assert len(calls) == 1, script
    earlier = [
        alias.name if isinstance(node, ast.Import) else node.module
        for node in body[: calls[0]]
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert all(
        name.split(".")[0] in sys.stdlib_module_names or name == "capslab.errors"
        for name in earlier
    ), (script, earlier)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["predict.py", "tools/colour_mnist.py"])  # the rest alike, above
def test_ctrl_c_while_torch_loads_is_one_line_and_status_130(script):
    """A second in, each script is still importing torch (2-4 s on 2 cores), or has begun its
    work; either way Ctrl-C ends it with one line, no traceback from inside an import."""
    process = subprocess.Popen(
        [sys.executable, REPO / script, "--help"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 0:
        pytest.skip(f"{script} --help finished within a second: nothing to interrupt")
    assert (process.returncode, stderr) == (130, "error: interrupted\n")


def test_ctrl_c_outside_trainings_own_handler_is_one_line_and_status_130(
    tiny_checkpoint, monkeypatch
):
    """Ctrl-C while evaluate.py scores: `error: interrupted`, no traceback, the shell's 130."""
    import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "score", interrupted)
    result = run_in_process("evaluate.py", "--checkpoint", tiny_checkpoint, check=False)
    assert result.returncode == 130
    assert_one_line_error(result, "interrupted")


def test_an_interrupted_figure_leaves_the_previous_file_whole_and_no_temporary(tmp_path):
    from capslab import figures

    path = tmp_path / "curve.png"
    records = [{"epoch": 1, "train_loss": 0.5, "val_acc": 90.0, "test_acc": 89.0}]
    figures.plot_curve(records, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def torn_savefig(self, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG torn")  # part of a file, then Ctrl-C
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures.pyplot().Figure, "savefig", torn_savefig)
        with pytest.raises(KeyboardInterrupt):
            figures.plot_curve([*records, {**records[0], "epoch": 2}], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


def test_a_signal_the_caller_ignores_stays_ignored_and_the_loading_handler_ends_with_loading():
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    seen = []

    def main():
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts `script &`
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        errors.exit_on_ctrl_c_while_loading("__main__")
        exit_on_user_error(main)
        assert seen.pop() == (signal.SIG_IGN, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        errors.exit_on_ctrl_c_while_loading("evaluate")  # imported, as the tests import it
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        errors.exit_on_ctrl_c_while_loading("__main__")
        assert signal.getsignal(signal.SIGINT) is errors.exit_interrupted
        exit_on_user_error(main)
        assert seen.pop() == (signal.default_int_handler, errors.raise_terminated)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not os._exit's
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


@pytest.mark.parametrize(
    "signum, message, status",
    [(signal.SIGTERM, "terminated", 143), (signal.SIGINT, "interrupted", 130)],
)
def test_a_signal_mid_write_is_one_line_and_leaves_the_old_file_whole(
    tmp_path, capsys, signum, message, status
):
    """evaluate, predict, export and the tools have no handler of their own: SIGTERM stops them
    as Ctrl-C does, and the file being written stays as it was, with no temporary left."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"what the user saved")
    before = signal.getsignal(signal.SIGTERM)

    def write(path: Path) -> None:
        path.write_bytes(b"half")
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the handler raises long before this ends
        path.write_bytes(b"whole")

    with pytest.raises(SystemExit) as stopped:
        exit_on_user_error(lambda: atomic.write_atomically(target, write))
    assert stopped.value.code == status
    assert capsys.readouterr().err == f"error: {message}\n"
    assert target.read_bytes() == b"what the user saved"
    assert list(tmp_path.iterdir()) == [target]
    assert signal.getsignal(signal.SIGTERM) is before
