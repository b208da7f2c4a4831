"""Model metrics shared by the trainers and the exporters: a classifier's loss, accuracy and predictions;
segmentation IoU and item coverage.

Two IoU paths on purpose: `segmentation_scores` works from a pixel confusion matrix (what training and the
exporter accumulate batch by batch), `iou_scores` compares whole mask arrays (what the independent evaluation
in export/evaluate_segmenter.py uses), so a card's figure is checked by arithmetic written twice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.data import Dataset, normalise
from training.scenes import NUM_SCENE_CLASSES, SCENE_LABELS


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, data: Dataset, mean: list[float], std: list[float],
                        device: torch.device, batch_size: int = 512, max_batches: int | None = None) -> dict:
    """fp32 evaluation: loss, accuracy and per-image predictions (what export parity is checked against)."""
    model.eval()
    losses, predictions, labels = [], [], []
    for start in list(range(0, len(data), batch_size))[:max_batches]:
        x = normalise(data.images[start:start + batch_size].to(device), mean, std)
        y = data.labels[start:start + batch_size].to(device)
        logits = model(x).float()
        losses.append(F.cross_entropy(logits, y, reduction="sum").item())
        predictions.append(logits.argmax(1).cpu())
        labels.append(y.cpu())
    predictions, labels = torch.cat(predictions), torch.cat(labels)
    return {
        "loss": sum(losses) / len(labels),
        "accuracy": (predictions == labels).float().mean().item(),
        "predictions": predictions.numpy(),
        "labels": labels.numpy(),
    }



def pixel_confusion(truth: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] int64 counts of pixels with true class i predicted as j (bincount: millions of pixels)."""
    index = truth.flatten().long() * num_classes + predicted.flatten().long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray | torch.Tensor, label_names: list[str]) -> dict:
    """Per-class IoU = TP / (TP + FP + FN), its mean over classes present in truth or prediction, pixel accuracy.

    A class absent from both truth and prediction has no IoU (None) and is left out of the mean rather than
    counted as a perfect 1 or a failed 0.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = [float(t / u) if u > 0 else None for t, u in zip(tp, union)]
    present = [v for v in iou if v is not None]
    return {"per_class_iou": dict(zip(label_names, iou)), "miou": float(np.mean(present)) if present else 0.0,
            "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1.0)), "pixels": int(confusion.sum())}


def iou_scores(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[list, float, float]:
    """Per-class IoU (None where a class is in neither truth nor prediction), their mean, pixel accuracy."""
    truth, predicted = truth.ravel().astype(np.int64), predicted.ravel().astype(np.int64)
    ious = []
    for k in range(num_classes):
        t, p = truth == k, predicted == k
        union = np.count_nonzero(t | p)
        ious.append(np.count_nonzero(t & p) / union if union else None)
    present = [v for v in ious if v is not None]
    return ious, float(np.mean(present)), float(np.mean(truth == predicted))


def item_coverage(scenes, predicted: np.ndarray) -> dict:
    """For every placed item with visible pixels: the share of them predicted as the item's own class.

    Also the mIoU of the true outlines painted, item by item, with the garment class predicted most often
    over the item's visible pixels: how far the masks would get if only their outlines were fixed."""
    truth = scenes.masks.numpy()
    shares = []
    majority = np.zeros_like(truth)
    for n in range(len(scenes)):
        instances = scenes.instances[n].numpy()
        for slot, cls in enumerate(scenes.classes[n].tolist()):
            visible = instances == slot + 1
            if cls >= 0 and visible.any():
                shares.append(float(np.mean(predicted[n][visible] == cls + 1)))
                garment = predicted[n][visible]
                garment = garment[garment > 0]
                majority[n][visible] = np.bincount(garment).argmax() if len(garment) else 0
    shares = np.asarray(shares)
    background = truth == 0
    # Garment against background whatever the class: the outlines alone, apart from telling garments apart.
    foreground_iou = np.count_nonzero(~background & (predicted > 0)) / np.count_nonzero(~background | (predicted > 0))
    # Each garment class's pixels split the same way: the share predicted as some garment (its outline
    # found) and, of those, the share given its own class (named): which classes lose pixels to the
    # background and which to another garment.
    split = {}
    for k in range(1, NUM_SCENE_CLASSES):
        pixels = predicted[truth == k]
        found = pixels[pixels > 0]
        if len(pixels):
            split[SCENE_LABELS[k]] = {"found": len(found) / len(pixels),
                                      "named": float(np.mean(found == k)) if len(found) else 0.0}
    return {"items": int(len(shares)), "mean_own_class_share": float(shares.mean()),
            "per_class_found_and_named": split,
            "items_mostly_right": float(np.mean(shares > 0.5)),
            "background_kept": float(np.mean(predicted[background] == 0)), "foreground_iou": float(foreground_iou),
            "majority_class_true_outline_miou": iou_scores(truth, majority, NUM_SCENE_CLASSES)[1]}
