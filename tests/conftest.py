"""Shared fixtures and helpers: real MNIST from CAPSNET_DATA_DIR (default ../shared/data),
small models, checkpoints (a tiny untrained one for plumbing, a small trained run shared by the
session, the shipped one for accuracy), and the scripts run as a user runs them: in this process
(`run_in_process`, fast) or, for tests about the process itself, in their own (`run`)."""

import contextlib
import importlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # import the repository's modules without installing
sys.path.insert(0, str(REPO / "tools"))  # and the tools, for run_in_process("tools/...")

import evaluate  # noqa: E402
import train  # noqa: E402
from capslab import fused_routing  # noqa: E402
from capslab.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint, save_checkpoint  # noqa: E402
from capslab.data import load_split, say_once  # noqa: E402
from capslab.errors import exit_on_user_error  # noqa: E402
from capslab.settings import settings_to_dict  # noqa: E402
from capslab.training import TrainConfig, Trainer  # noqa: E402
from CapsNet import CapsNet, CapsNetConfig  # noqa: E402

# CAPSNET_DATA_DIR, else the workplace's shared copy, else train.py's default download folder.
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
DATA_DIR = Path(
    os.environ.get("CAPSNET_DATA_DIR")
    or (DEFAULT_DATA_DIR if DEFAULT_DATA_DIR.is_dir() else REPO / "data")
)
# Narrow layers keep the slow tests fast; routing, decoder and loss are the paper's.
SMALL = CapsNetConfig(conv1_channels=32, primary_channels=8)


def pytest_addoption(parser):
    parser.addoption(
        "--kernel-register-bytes",
        type=int,
        choices=(32, 64),
        help="build the CPU routing kernel for registers of this width (AVX2's 32 bytes or "
        "AVX-512's 64) whatever this CPU has, to test the code the other kind of CPU runs",
    )


def pytest_configure(config):
    fused_routing.register_bytes = config.getoption("--kernel-register-bytes")


CPU = torch.device("cpu")
# Small runs take 1-3 steps an epoch, too few for one-cycle (it would anneal within a step or
# two), and their tests extend runs with --epochs on resume, which one-cycle refuses: they use
# the exponential schedule. tests/test_recipe.py covers one-cycle.
SMALL_SCHEDULE = ["--schedule", "exponential", "--lr", "1e-3"]
# SMALL's narrow layers as train.py's flags: the runs below train in a fraction of the time.
SMALL_MODEL = ["--conv1-channels", "32", "--primary-channels", "8"]
# Flags of a small but real training run: 96 training, 64 validation and 100 test digits.
SMALL_RUN = [
    *SMALL_SCHEDULE,
    *SMALL_MODEL,
    "--train-subset",
    "96",
    "--val-size",
    "64",
    "--test-subset",
    "100",
    "--batch-size",
    "32",
    "--quiet",
]
TINY_RUN = [
    *SMALL_SCHEDULE,
    *SMALL_MODEL,
    "--train-subset",
    "64",
    "--val-size",
    "0",
    "--test-subset",
    "40",
    "--batch-size",
    "32",
    "--quiet",
]


# As root, file modes bind only a process without these capabilities (util-linux's setpriv).
AS_A_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all"]


def run(
    script: str, *args, check: bool = True, timeout: float = 600, as_a_user: bool = False
) -> subprocess.CompletedProcess:
    """A script in its own process, as a user runs it: for tests about the process itself
    (signals, locks between processes, the interpreter's exit), or, with as_a_user, one that
    file modes bind even when the tests run as root. Importing torch costs each call 2-4 s;
    `run_in_process` gives the same result object without it."""
    prefix = []
    if as_a_user and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv (util-linux) to run a process that file modes bind")
        prefix = AS_A_USER
    result = subprocess.run(
        [*prefix, sys.executable, str(REPO / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


# The interpreter's own warning filters (python -W unset): DeprecationWarning shows in __main__
# only. pytest's filters differ; a script run in-process prints what it would print alone.
INTERPRETER_WARNING_FILTERS = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning onto the sys.stderr of the moment, as the interpreter prints it."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def own_process_state():
    """Put back what a script's main changes in the process it runs in: the SIGINT and SIGTERM
    handlers (train.py's StopRequest installs its own and leaves them), torch's thread count
    (--threads) and deterministic mode, and the random generators (seed_everything). Notes
    said once a process (data.say_once) are said again, as in a fresh process."""
    say_once.cache_clear()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    generators = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_rng_state(generators[0])
        random.setstate(generators[1])
        np.random.set_state(generators[2])


def exit_status(code) -> int:
    """The status `sys.exit(code)` gives the interpreter: None is 0; a message is printed, 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def run_in_process(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """A script's `main(argv)` in this process, as `python script args...` runs it: through
    `exit_on_user_error` (a UserError is one `error: ...` line on stderr and status 2), with
    sys.argv, the working directory, stdout, stderr and the warning filters a fresh process
    would have, and its clock (train.LAUNCHED) starting now. A SystemExit (argparse, the
    scripts' own) becomes the exit status; any other exception propagates, as a traceback
    would. Returns a subprocess.CompletedProcess, as `run` does."""
    module = importlib.import_module(Path(script).stem)
    argv = list(map(str, args))
    stdout, stderr = io.StringIO(), io.StringIO()
    launched = getattr(module, "LAUNCHED", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(own_process_state())
        stack.enter_context(contextlib.chdir(REPO))
        stack.enter_context(redirect_attribute(sys, "argv", [str(REPO / script), *argv]))
        if launched is not None:
            stack.enter_context(redirect_attribute(module, "LAUNCHED", time.perf_counter()))
        stack.enter_context(warnings.catch_warnings())
        warnings.resetwarnings()
        for action, category, module_name in INTERPRETER_WARNING_FILTERS:
            warnings.filterwarnings(action, category=category, module=module_name, append=True)
        warnings.showwarning = print_warning
        stack.enter_context(contextlib.redirect_stdout(stdout))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        try:
            exit_on_user_error(lambda: module.main(argv))
            returncode = 0
        except SystemExit as exit:
            returncode = exit_status(exit.code)
    result = subprocess.CompletedProcess(
        [script, *argv], returncode, stdout.getvalue(), stderr.getvalue()
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@contextlib.contextmanager
def redirect_attribute(owner, name: str, value):
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


class StopAfterTwoBatches:
    """Stands in for train.StopRequest: a Ctrl-C or SIGTERM during the run's second batch."""

    def __init__(self):
        self.checks = 0

    @property
    def requested(self):
        self.checks += 1
        return self.checks >= 2


def train_in_process(data_dir, folder, *extra, run_flags=SMALL_RUN) -> dict:
    """train.main in this process, its UserError raised and its output in capsys; returns the
    run's last.pt."""
    with own_process_state():
        train.main(
            [
                *["--data-dir", str(data_dir), "--checkpoint-dir", str(folder)],
                *run_flags,
                *map(str, extra),
            ]
        )
    return load_checkpoint(folder / "last.pt")


def make_trainer(folder, model_config=None, steps_per_epoch: int = 1, **settings) -> Trainer:
    """A Trainer of a seeded SMALL CapsNet on the CPU, with TrainConfig(**settings)."""
    torch.manual_seed(0)
    return Trainer(
        TrainConfig(**settings),
        CapsNet(model_config or SMALL),
        CPU,
        steps_per_epoch,
        folder,
        quiet=True,
    )


def evaluate_json(capsys, *flags) -> dict:
    capsys.readouterr()  # drop what came before
    evaluate.main([*map(str, flags), "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Real MNIST on disk; tests never download it."""
    if not (DATA_DIR / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found in {DATA_DIR}/MNIST/raw (set CAPSNET_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist_test(data_dir):
    return load_split("mnist", data_dir, train=False)


@pytest.fixture(scope="session")
def mnist_train(data_dir):
    return load_split("mnist", data_dir, train=True)


@pytest.fixture
def small_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(SMALL)


@pytest.fixture(scope="session")
def trained_checkpoint() -> Path:
    """The shipped model, else the file named by CAPSNET_TEST_CHECKPOINT, else skip."""
    if SHIPPED_CHECKPOINT.is_file():
        return SHIPPED_CHECKPOINT
    path = os.environ.get("CAPSNET_TEST_CHECKPOINT")
    if path and Path(path).is_file():
        return Path(path).resolve()  # notebooks run in other directories
    pytest.skip(f"no trained model: ship {SHIPPED_CHECKPOINT.name} or set CAPSNET_TEST_CHECKPOINT")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained, narrow CapsNet in checkpoint format: exercises the plumbing in milliseconds."""
    torch.manual_seed(0)
    config = CapsNetConfig(conv1_channels=8, primary_channels=2, decoder_hidden=(16, 32))
    model = CapsNet(config)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    save_checkpoint(
        {
            "model": model.state_dict(),
            "config": settings_to_dict(config),
            "dataset": "mnist",
            "epoch": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> tuple[Path, str]:
    """One small run, trained once per session through train.py's main: SMALL_RUN for 2 epochs
    (exponential lr, 96 training digits). Returns its folder (last.pt, best.pt, metrics.jsonl,
    curve.png) and what it printed. Shared: read it, never write into it (train into a folder
    of your own, or copy the file you change)."""
    folder = tmp_path_factory.mktemp("trained_run")
    result = run_in_process(
        "train.py", "--data-dir", data_dir, "--checkpoint-dir", folder, "--epochs", 2, *SMALL_RUN
    )
    return folder, result.stdout


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder that exists and refuses new files: a read-only one, or where root ignores the
    mode, /sys (read-only in most containers); the test skips if neither refuses."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for folder in (locked, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError:
            return folder
    pytest.skip("no folder here refuses new files")


@pytest.fixture
def few_digits(mnist_test):
    return mnist_test.subset(torch.arange(40))


@pytest.fixture
def small_checkpoint(small_model, tmp_path):
    path = tmp_path / "small.pt"
    save_checkpoint(
        {
            "model": small_model.state_dict(),
            "config": settings_to_dict(small_model.config),
            "dataset": "mnist",
            "epoch": 0,
        },
        path,
    )
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A 1-bit PNG that claims width x height pixels but holds none (65 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, gray, no interlace
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
