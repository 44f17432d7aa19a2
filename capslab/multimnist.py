"""MultiMNIST, the paper's section 6: two MNIST digits of different classes, overlaid.

Each digit of a pair is padded to the 36x36 canvas and shifted by its own integer (dy, dx) of
up to 4 px in each direction, so two digits' 20x20 boxes overlap by about 80% on average. The
paper does not say how the two images combine; the authors' released code adds them and clips
at the maximum, and so does `overlay` (on uint8: min(a + b, 255)).

The paper stored 1,000 pairs per MNIST digit (60M training pairs). Here training pairs are
made on the fly from the digits in memory: each epoch pairs every training digit, in the
epoch's order, with a partner of another class from the same pool, both shifted at random
(`PairPool.training_batch`), so one epoch is as many pairs as there are training digits and
costs no I/O. Validation and test pairs are fixed: one pair per digit of their own split
(`fixed_pairs`), the test set from one seed on every machine. A pool only ever pairs its own
digits, so no validation or test pair holds a digit the model trains on.
"""

from dataclasses import dataclass

import torch

from capslab.data import IMAGE_SIZE, Split

CANVAS = IMAGE_SIZE["multimnist"]  # the paper's 36x36 MultiMNIST image
MAX_SHIFT = 4  # each digit moves up to 4 px in each direction
TEST_PAIRS_SEED = 2017  # the test pairs are the same everywhere, whatever --seed a run has


def place(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each 28x28 digit centred on the canvas, then moved by its (dy, dx) in [-4, 4], zero-filled.

    images (B, 28, 28) any dtype, offsets (B, 2) int -> (B, 36, 36).
    """
    border = (CANVAS - images.shape[-1]) // 2 + MAX_SHIFT  # 8: room for the centring and shift
    padded = torch.nn.functional.pad(images, (border,) * 4)  # (B, 44, 44)
    start = MAX_SHIFT - offsets  # (B, 2): canvas pixel p shows padded pixel p - offset + 4
    rows = start[:, 0, None] + torch.arange(CANVAS)  # (B, 36)
    cols = start[:, 1, None] + torch.arange(CANVAS)  # (B, 36)
    batch_index = torch.arange(len(images))[:, None, None]  # (B, 1, 1)
    return padded[batch_index, rows[:, :, None], cols[:, None, :]]  # (B, 36, 36)


def overlay(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The authors' rule: add, then clip at the maximum. uint8 (B, 36, 36) x2 -> (B, 36, 36)."""
    return (first.int() + second.int()).clamp_(max=255).to(torch.uint8)


def random_offsets(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 2) integer shifts, uniform in [-4, 4] each."""
    return torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (count, 2), generator=generator)


class PairPool(Split):
    """A split of single 28x28 digits that trains as MultiMNIST pairs.

    `images`, `labels` and `len` are the digits', so batching and subsets work as for MNIST;
    `training_batch` turns a batch of first digits into pairs.
    """

    def __init__(self, digits: Split):
        super().__init__(digits.images, digits.labels)
        # Digit indices sorted by class, with each class's start and count: a partner of
        # class k is by_class[start[k] + a uniform draw below count[k]].
        self.by_class = torch.argsort(self.labels, stable=True)  # (N,)
        self.count = torch.bincount(self.labels, minlength=int(self.labels.max()) + 1)  # (K,)
        self.start = torch.cumsum(self.count, 0) - self.count  # (K,)
        if (self.count > 0).sum() < 2:
            raise ValueError("MultiMNIST needs digits of at least two classes")

    def subset(self, indices: torch.Tensor) -> "PairPool":
        return PairPool(Split(self.images[indices], self.labels[indices]))

    def partners(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For each label (B,), the index (B,) of a digit of another class, uniform over the
        other classes present, then uniform within the class."""
        present = torch.nonzero(self.count).squeeze(1)  # (P,) classes in the pool
        position = torch.searchsorted(present, labels)  # (B,) each label's rank among them
        # Step 1 .. P-1 places along the present classes: never the label's own class.
        step = torch.randint(1, len(present), (len(labels),), generator=generator)
        partner_class = present[(position + step) % len(present)]  # (B,)
        within = torch.rand(len(labels), generator=generator, dtype=torch.float64)
        index = (within * self.count[partner_class]).long()  # (B,) below the class's count
        return self.by_class[self.start[partner_class] + index]

    def make_pairs(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> Split:
        """First digits (B, 28, 28), (B,) -> pairs: images (B, 36, 36), labels (B, 2) and the
        two shifted digits alone, sources (B, 2, 36, 36), all uint8 but the labels."""
        partner = self.partners(labels, generator)  # (B,)
        offsets = random_offsets(2 * len(labels), generator).view(2, len(labels), 2)
        first = place(images, offsets[0])  # (B, 36, 36)
        second = place(self.images[partner], offsets[1])  # (B, 36, 36)
        pair_labels = torch.stack([labels, self.labels[partner]], dim=1)  # (B, 2)
        sources = torch.stack([first, second], dim=1)  # (B, 2, 36, 36)
        return Split(overlay(first, second), pair_labels, sources)

    def training_batch(self, images, labels, max_shift: int, generator: torch.Generator):
        """Pairs made afresh for every batch; the 4-px placement replaces MNIST's --max-shift."""
        return self.make_pairs(images, labels, generator)


def fixed_pairs(digits: Split, seed: int) -> Split:
    """One seeded pair per digit of `digits` (which it leads), for validation and test."""
    pool = PairPool(digits)
    return pool.make_pairs(digits.images, digits.labels, torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class PairScores:
    """The paper's measure and the per-digit one, from class scores (N, J) and labels (N, 2)."""

    both_correct: torch.Tensor  # (N,) bool: the two longest capsules are the two digits
    digits_found: torch.Tensor  # (N,) 0, 1 or 2 of the pair's digits among the two longest

    @classmethod
    def of(cls, scores: torch.Tensor, labels: torch.Tensor) -> "PairScores":
        top2 = scores.topk(2, dim=1).indices  # (N, 2)
        found = (top2.unsqueeze(2) == labels.unsqueeze(1)).any(dim=1)  # (N, 2) per true digit
        return cls(found.all(dim=1), found.sum(dim=1))
