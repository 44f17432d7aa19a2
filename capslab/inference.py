"""What the notebook and predict.py ask of a trained CapsNet for one digit: the prediction with
every capsule's length and the reconstruction, the paper's Figure 4 perturbations, where the
winning capsule's evidence came from, and a 28x28 image as PNG bytes. It needs torch and Pillow
only; the notebook's figures and widgets are in notebook.py, its drawing canvas in canvas.py.
"""

import io

import torch
from PIL import Image

from capslab.data import CLASS_NAMES, to_model_input
from CapsNet import CapsNetConfig, capsule_length

PERTURBATIONS = [round(-0.25 + 0.05 * step, 2) for step in range(11)]  # Figure 4's range


def to_png(image: torch.Tensor, scale: int = 5) -> bytes:
    """(H, W) in [0, 1] -> PNG bytes, white on black, each pixel a scale x scale square."""
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # (H, W)
    picture = Image.fromarray(pixels).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@torch.no_grad()
def classify(
    model: torch.nn.Module, image28: torch.Tensor, class_names=CLASS_NAMES["mnist"]
) -> dict:
    """(28, 28) in [0, 1] -> the prediction, its capsule length, every length, the reconstruction.

    The confidence is the length of the winning digit capsule, which the margin loss pushes
    above 0.9 for a present class and below 0.1 for an absent one; lengths do not sum to 1.
    """
    device = next(model.parameters()).device
    lengths, reconstructions, v = model(
        to_model_input(image28, device)
    )  # (1, J), (1, 1, 28, 28), (1, J, 16)
    winner = int(lengths[0].argmax())
    return {
        "class_index": winner,
        "label": class_names[winner],
        "confidence": float(lengths[0, winner]),
        "lengths": lengths[0].float().cpu().tolist(),
        "reconstruction": reconstructions[0, 0].float().cpu(),  # (28, 28)
        "capsule": v[0, winner].float().cpu(),  # (16,) the winning v_j
    }


@torch.no_grad()
def perturbed_reconstructions(
    model, capsule: torch.Tensor, class_index: int, deltas=PERTURBATIONS
) -> torch.Tensor:
    """Figure 4 of the paper: reconstruct after adding each delta to each dimension in turn.

    capsule (16,) -> images (16, D, 28, 28): row d varies dimension d, column k adds deltas[k].
    """
    dim, steps = capsule.numel(), len(deltas)
    device = next(model.parameters()).device
    tweaks = torch.eye(dim)[:, None, :] * torch.tensor(deltas)[None, :, None]  # (16, D, 16)
    v = torch.zeros(dim * steps, model.config.num_classes, dim)  # (16*D, J, 16)
    v[:, class_index] = (capsule.cpu() + tweaks).view(-1, dim)
    target = torch.full((dim * steps,), class_index)
    images = model.decoder(v.to(device), target.to(device))  # (16*D, 1, 28, 28)
    return images.view(dim, steps, *images.shape[-2:]).float().cpu()


@torch.no_grad()
def decode_capsule(model, capsule: torch.Tensor, class_index: int) -> torch.Tensor:
    """The decoder's image of one capsule (16,) put in the place of class `class_index`: (28, 28).

    What the notebook's sliders redraw: the capsule as dragged, every other capsule masked.
    """
    device = next(model.parameters()).device
    v = torch.zeros(1, model.config.num_classes, capsule.numel())  # (1, J, 16)
    v[0, class_index] = capsule.cpu()
    image = model.decoder(v.to(device), torch.tensor([class_index], device=device))
    return image[0, 0].float().cpu()  # (28, 28)


def dimension_effects(model, capsule: torch.Tensor, class_index: int) -> torch.Tensor:
    """capsule (16,) -> (16,): how far, in L2 over the 784 pixels, the reconstruction moves
    when each dimension in turn moves by -0.25 or +0.25 (the larger of the two)."""
    ends = PERTURBATIONS[0], 0.0, PERTURBATIONS[-1]
    grid = perturbed_reconstructions(model, capsule, class_index, ends)  # (16, 3, 28, 28)
    moved = grid[:, [0, 2]] - grid[:, [1]]  # (16, 2, 28, 28)
    return moved.flatten(2).norm(dim=2).amax(dim=1)  # (16,)


@torch.no_grad()
def routing_maps(model, image28: torch.Tensor) -> dict:
    """(28, 28) in [0, 1] -> the predicted class and two (6, 6) maps over the PrimaryCaps grid,
    each summed over the 32 capsule types at a position, for that class's digit capsule j:

    coupling   the final coupling coefficients c_ij of routing
    agreement  u_hat_j|i . v_j: how far each primary capsule's vote agrees with v_j
    """
    config = model.config
    device = next(model.parameters()).device
    u, v, c = model.capsules(to_model_input(image28, device))  # (1, I, 8), (1, J, 16), (1, J, I)
    winner = int(capsule_length(v)[0].argmax())
    votes = model.digit_caps.votes(u)[0, winner]  # (I, 16), I = (type, row, col) flattened
    agreement = votes @ v[0, winner]  # (I,)
    grid = (config.primary_channels, config.primary_grid, config.primary_grid)  # (32, 6, 6)
    return {
        "class_index": winner,
        "coupling": c[0, winner].view(grid).sum(dim=0).float().cpu(),  # (6, 6)
        "agreement": agreement.view(grid).sum(dim=0).float().cpu(),  # (6, 6)
    }


def evidence_map(model, image28: torch.Tensor) -> torch.Tensor:
    """(28, 28) -> (6, 6): where the predicted capsule's evidence came from, the agreement map.

    Of the two maps of `routing_maps`, the agreement is the one that changes with the input.
    For the shipped model, `spread_across_inputs` of the coupling map is 2.9% over 200 MNIST
    test digits, of the agreement map 104% (the notebook measures its samples): routing leaves
    c_ij close to uniform (entropy within 0.002 nats of ln 10), so its map is nearly flat.
    """
    return routing_maps(model, image28)["agreement"]


def spread_across_inputs(maps: torch.Tensor) -> float:
    """(N, H, W) maps of N inputs -> how much they differ between inputs: the standard
    deviation over the inputs of each cell, averaged over the cells, over the mean |value|.
    0 for a map that is the same whatever the input."""
    return float(maps.std(dim=0).mean() / maps.abs().mean())


def receptive_field(config: CapsNetConfig, row: int, col: int) -> tuple[int, int, int]:
    """The input pixels that PrimaryCaps grid cell (row, col) sees: top, left and side.

    Conv1 (9x9) then PrimaryCaps (9x9, stride 2): a 17x17 square from pixel (2 row, 2 col), so
    cells are 2 px apart and neighbours share 15 of their 17 px each way.
    """
    return 2 * row, 2 * col, 2 * config.kernel_size - 1


def grid_extent(config: CapsNetConfig) -> tuple[float, float]:
    """Where the PrimaryCaps grid lies on the input when each cell is drawn 2 px wide at the
    centre of its receptive field: first and last pixel edge, 7 and 19 for the paper's model."""
    first, _, side = receptive_field(config, 0, 0)
    last, _, _ = receptive_field(config, config.primary_grid - 1, 0)
    return first + (side - 1) / 2 - 1, last + (side - 1) / 2 + 1
