"""What every entry point shares: one-line errors, device choice and checkpoint I/O.

train.py, evaluate.py, predict.py, bench.py and inference.ipynb all import from here, so a
checkpoint is written and read one way only.
"""

import ctypes
import os
import pickle
import sys
from pathlib import Path

import torch

from baseline import BaselineCNN, BaselineConfig
from CapsNet import CapsNet, CapsNetConfig

SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "capsnet_mnist.pt"
# A checkpoint's "model_kind" names its class; checkpoints without one are CapsNets.
MODEL_KINDS = {"capsnet": (CapsNet, CapsNetConfig), "cnn": (BaselineCNN, BaselineConfig)}


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, wrong checkpoint): one line, no traceback."""


def exit_on_user_error(main):
    """Run `main()`, turning a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def keep_freed_memory() -> None:
    """On Linux (glibc), keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees tensors of 50 MB and more (Conv1's output is 52 MB at
    batch 128). By default glibc maps each of those afresh and unmaps it on free, so every step
    page-faults them in again. Heap-only allocation without trimming made `bench.py`'s training
    step about 9% faster on this repository's test machine. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**30)


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if requested not in available:
        raise UserError(f"unknown device {requested!r}: choose auto, cpu, cuda or mps")
    if not available[requested]:
        raise UserError(f"device {requested!r} is not available on this machine")
    return torch.device(requested)


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint safely (weights_only=True); any problem becomes one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path} is not a readable checkpoint: it is corrupt, or holds objects beyond tensors "
            "and plain types, which the safe loader (weights_only=True) refuses"
        ) from error
    except Exception as error:  # a truncated or foreign file fails anywhere inside the unpickler
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__}: it is empty, truncated or not a torch file)") from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise UserError(f"{path} is not a CapsNet checkpoint (it lacks 'model' and 'config')")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint") -> torch.nn.Module:
    """Rebuild the model from the checkpoint's own kind and config, then load its weights strictly."""
    kind = checkpoint.get("model_kind", "capsnet")
    if kind not in MODEL_KINDS:
        raise UserError(f"{path} holds an unknown model kind {kind!r}: choose {', '.join(MODEL_KINDS)}")
    model_class, config_class = MODEL_KINDS[kind]
    try:
        model = model_class(config_class.from_dict(checkpoint["config"]))
        model.load_state_dict(chosen_weights(checkpoint))
    except (TypeError, KeyError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"{path} does not match the model ({reason})") from error
    return model


def chosen_weights(checkpoint: dict) -> dict:
    """The weights validation chose: the raw ones, or their moving average (train.py --ema-decay)."""
    return checkpoint["ema"] if checkpoint.get("chosen") == "ema" else checkpoint["model"]


def load_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Checkpoint file -> model in eval mode on `device`, plus the checkpoint dict."""
    checkpoint = load_checkpoint(path, device)
    model = model_from_checkpoint(checkpoint, path).to(device).eval()
    return model, checkpoint


def export_weights(checkpoint: dict, path: str | Path) -> None:
    """Write the shippable part of a training checkpoint: weights, config, metrics; no optimizer."""
    keep = ("model_kind", "config", "dataset", "epoch", "metrics", "args")
    shipped = {key: checkpoint[key] for key in keep if key in checkpoint}
    save_checkpoint({**shipped, "model": chosen_weights(checkpoint)}, path)
