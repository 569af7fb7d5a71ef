"""The evaluate stage's pictures (confusion matrix, reliability diagram, misclassified images) and the
plot data `dvc plots` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from components.core.files import save_figure, write_json
from components.evaluate.calibration import ReliabilityBin, reliability_bins
from components.evaluate.metrics import confusion


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...], path: Path, title: str) -> Path:
    """Save a confusion-matrix PNG (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion(predicted, labels, len(classes))
    side = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    return save_figure(fig, path)


MISTAKE_CELL_PX = 160
"""Each misclassified image is scaled to fit a square of this many pixels (nearest neighbour: small scans stay sharp)."""


def plot_mistakes(paths: list[Path], labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], indices: list[int],
                  path: Path, part: str = "test") -> Path:
    """Save a grid of the given images of `part` titled with their true and predicted class.

    The grid is one picture (the images pasted side by side) under one set of axes, with the titles as text:
    drawn as a subplot per image, laid out by matplotlib, it took about a third of a second for 16 images.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    if not indices:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no misclassified images among {len(labels)} {part} images", ha="center", va="center")
        return save_figure(fig, path)
    columns = min(4, len(indices))
    rows = -(-len(indices) // columns)
    cell, title_px, gap = MISTAKE_CELL_PX, 56, 16  # the two-line title above each image, a gap around it
    width, height = columns * (cell + gap) + gap, rows * (cell + title_px + gap) + gap
    sheet = Image.new("RGB", (width, height), "white")
    titles = []
    for number, index in enumerate(indices):
        row, column = divmod(number, columns)
        left, top = gap + column * (cell + gap), gap + row * (cell + title_px + gap) + title_px
        with Image.open(paths[index]) as image:
            picture = image.convert("RGB")
        scale = cell / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.NEAREST)
        sheet.paste(picture, (left + (cell - picture.width) // 2, top + (cell - picture.height) // 2))
        guess = int(probs[index].argmax())
        titles.append((left + cell / 2, top - 6, f"true {classes[labels[index]]}\npred {classes[guess]} ({probs[index, guess]:.2f})"))
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi + 0.4), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height / (height + 0.4 * dpi)))
    ax.imshow(np.asarray(sheet), interpolation="nearest")
    ax.axis("off")
    for x, y, text in titles:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=8, color="#b30000")
    fig.suptitle(f"most confidently wrong {part} images ({len(indices)} shown)", fontsize=10, y=0.99)
    return save_figure(fig, path, dpi=dpi, layout=False)


def plot_reliability(rows: list[ReliabilityBin], bins: int, ece: float, path: Path, title: str) -> Path:
    """Save a reliability diagram: accuracy per confidence bin against the diagonal, with bin sizes below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 1.0 / bins
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    top.bar([r.low for r in rows], [r.accuracy for r in rows], width=width, align="edge", color="#2a7ab9",
            edgecolor="white", label="accuracy")
    top.bar([r.low for r in rows], [abs(r.confidence - r.accuracy) for r in rows],
            bottom=[min(r.accuracy, r.confidence) for r in rows], width=width, align="edge", fill=False,
            edgecolor="#d62728", hatch="//", label="gap to mean confidence")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"{title}\nECE {ece:.3f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar([r.low for r in rows], [r.count for r in rows], width=width, align="edge", color="#9ecae1")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    return save_figure(fig, path)


def write_plot_data(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], bins: int, plots_dir: Path) -> tuple[Path, ...]:
    """Rows for `dvc plots`: one per image (true vs predicted class) and one per confidence bin."""
    predicted = probs.argmax(axis=1)
    confusion = [{"actual": classes[t], "predicted": classes[p]} for t, p in zip(labels, predicted, strict=True)]
    curve = [
        {"confidence": round(r.confidence, 6), "accuracy": round(r.accuracy, 6), "count": r.count}
        for r in reliability_bins(probs, labels, bins)
    ]
    return (
        write_json(plots_dir / "confusion.json", confusion),
        write_json(plots_dir / "reliability.json", curve),
    )
