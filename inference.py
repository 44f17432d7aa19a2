"""What the notebook and predict.py ask of a trained CapsNet for one digit: the prediction with
every capsule's length and the reconstruction, and the paper's Figure 4 perturbations."""

import torch

from data import CLASS_NAMES, to_model_input

PERTURBATIONS = [round(-0.25 + 0.05 * step, 2) for step in range(11)]  # Figure 4's range


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
