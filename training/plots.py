"""Pictures of a run: loss/accuracy curves, the confusion matrix, and for segmentation: scenes beside
their masks, per-class IoU bars."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_curves(fig, axes, title: str, path: str | Path) -> None:
    """Grid and legend on every panel of a curves figure, the title above them, written and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], path: str | Path, title: str = "", label_smoothing: float = 0.0) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    # Training loss includes label smoothing (a floor above zero); validation loss is plain cross-entropy.
    train_label = f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train"
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label=train_label)
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], label="train (augmented)")
    ax_acc.plot(epochs, [h["val_acc"] for h in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    save_curves(fig, (ax_loss, ax_acc), title, path)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def plot_confusion(matrix: np.ndarray, label_names: list[str], path: str | Path, title: str = "") -> None:
    n = len(label_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), label_names, rotation=45, ha="right")
    ax.set_yticks(range(n), label_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- segmentation -----------------------------------------------------------------------------------
# One fixed colour per scene class (background black, then the 10 garments, tab10's hues): the same class is
# the same colour in every picture and in every card, so a mask can be read without a legend lookup.
MASK_PALETTE = [
    (0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


def colour_masks(masks: np.ndarray) -> np.ndarray:
    """Class indices [..., H, W] -> RGB uint8 [..., H, W, 3] in MASK_PALETTE."""
    return np.asarray(MASK_PALETTE, dtype=np.uint8)[np.asarray(masks)]


def plot_scenes(images, masks, label_names: list[str], path: str | Path, predictions=None, title: str = "") -> None:
    """Rows of scenes: the image, its true mask and, when given, the predicted mask and where they differ."""
    images, masks = np.asarray(images)[:, 0], np.asarray(masks)
    columns = [("image", images, "gray"), ("truth", colour_masks(masks), None)]
    if predictions is not None:
        predictions = np.asarray(predictions)
        columns += [("prediction", colour_masks(predictions), None), ("errors", predictions != masks, "Reds")]
    n = len(images)
    fig, axes = plt.subplots(n, len(columns), figsize=(1.9 * len(columns) + 1.8, 1.9 * n), squeeze=False)
    for row in range(n):
        for col, (name, data, cmap) in enumerate(columns):
            ax = axes[row, col]
            ax.imshow(data[row], cmap=cmap, vmin=0, vmax=255 if cmap == "gray" else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=np.asarray(c) / 255) for c in MASK_PALETTE[:len(label_names)]]
    fig.legend(handles, label_names, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_segmentation_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc, ax_iou) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (fresh scenes each epoch)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="per-pixel cross-entropy", title="loss")
    ax_acc.plot(epochs, [h["train_pixel_acc"] for h in history], label="train")
    ax_acc.plot(epochs, [h["val_pixel_acc"] for h in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="pixel accuracy", title="pixel accuracy")
    ax_iou.plot(epochs, [h["val_miou"] for h in history], label="validation", color="C1")
    ax_iou.set(xlabel="epoch", ylabel="mIoU (11 classes)", title="mean IoU (model selection)")
    save_curves(fig, (ax_loss, ax_acc, ax_iou), title, path)


def plot_class_iou(per_class_iou: dict[str, float | None], path: str | Path, title: str = "") -> None:
    names = list(per_class_iou)
    values = [np.nan if v is None else v for v in per_class_iou.values()]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(range(len(names)), values, color=[np.asarray(c) / 255 for c in MASK_PALETTE[:len(names)]],
                  edgecolor="black", linewidth=0.5)
    for bar, value in zip(bars, values):
        if not np.isnan(value):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}", ha="center", fontsize=7)
    mean = np.nanmean(values) if not np.all(np.isnan(values)) else np.nan
    ax.axhline(mean, color="black", linestyle="--", linewidth=1)  # the mean, named in the title (bars fill the plot)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set(ylim=(0, 1.08), ylabel="IoU", title=f"{title}\nmIoU {mean:.4f} (dashed line)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gan_curves(history: list[dict], path: str | Path, title: str = "") -> None:
    """Both losses, and the discriminator's mean output on real and generated images, per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_d) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["loss_d"] for h in history], label="discriminator")
    ax_loss.plot(epochs, [h["loss_g"] for h in history], label="generator (non-saturating)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_d.plot(epochs, [h["d_real"] for h in history], label="D(x), real")
    ax_d.plot(epochs, [h["d_fake"] for h in history], label="D(G(z)), generated")
    if "aux_real_acc" in history[0]:  # AC-GAN: how often the class head names the class, real and generated
        ax_d.plot(epochs, [h["aux_real_acc"] for h in history], "--", label="class head accuracy, real")
        ax_d.plot(epochs, [h["aux_fake_acc"] for h in history], "--", label="class head accuracy, generated")
    ax_d.set(xlabel="epoch", ylabel="mean sigmoid output / accuracy", title="discriminator", ylim=(0, 1))
    save_curves(fig, (ax_loss, ax_d), title, path)


def save_image_grid(pixels: np.ndarray, path: str | Path, columns: int = 10, title: str = "",
                    row_labels: list[str] | None = None) -> None:
    """uint8 [N, 1, H, W] images tiled row by row, grey, nearest-neighbour (no smoothing of the pixels)."""
    n, _, h, w = pixels.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * (h + 2), columns * (w + 2)), dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = image[0]
    fig, ax = plt.subplots(figsize=(columns * 0.6 + 1.5, rows * 0.6 + 0.6))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([r * (h + 2) + h / 2 for r in range(len(row_labels))], row_labels, fontsize=7)
    else:
        ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
