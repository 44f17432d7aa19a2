"""How every config dataclass goes into a checkpoint and back: as a dict of plain values."""

from dataclasses import asdict


def is_whole(value, minimum: int) -> bool:
    """An int (not a bool, which Python counts as one) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


class SavedSettings:
    """For a dataclass of plain values and tuples. Tuples are saved as lists, the form JSON and
    torch.load(weights_only=True) keep, and come back as tuples."""

    def to_dict(self) -> dict:
        values = asdict(self)
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict):
        return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})
