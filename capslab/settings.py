"""How every config dataclass goes into a checkpoint and back: as a dict of plain values.

The configs themselves (CapsNet.py's CapsNetConfig, the baselines', TrainConfig) know nothing of
this, so the model file needs none of it.
"""

from dataclasses import asdict

SEEDS = 2**32  # numpy's seed range: every --seed is in 0 .. SEEDS - 1
SEED_RANGE = "0 .. 2**32 - 1"


def is_seed(value) -> bool:
    return is_whole(value, 0) and value < SEEDS


def is_whole(value, minimum: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def settings_to_dict(config) -> dict:
    """A dataclass of plain values and tuples as a dict; tuples become lists, the form JSON and
    torch.load(weights_only=True) keep."""
    values = asdict(config)
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


def settings_from_dict(config_class, values: dict):
    """The inverse of settings_to_dict: lists come back as tuples."""
    return config_class(
        **{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
    )
