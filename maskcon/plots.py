"""Pictures a person would rather look at than numbers: top-10 retrievals and a 2-D embedding map."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw

from maskcon.retrieval import nearest_neighbours
from maskcon.loaders.split import TarSamples, read_split

GRID_QUERIES = 8  # fixed test queries shown at every evaluation
GRID_NEIGHBOURS = 10
TILE = 64  # pixels per thumbnail
BORDER = 3


def grid_queries(num_test: int, count: int = GRID_QUERIES) -> list[int]:
    """The same evenly spaced test indices at every evaluation of a run."""
    count = min(count, num_test)
    return [int(i) for i in np.linspace(0, num_test - 1, count).round()]


def read_test_images(folder: Path, indices: list[int]) -> dict[int, Image.Image]:
    """Images of the test split at the given positions (the order of the shards), read from the tars."""
    _, split = read_split(folder, "test")
    samples = TarSamples(split)
    return {position: Image.open(io.BytesIO(samples.image(position).tobytes())).convert("RGB")
            for position in sorted(set(indices))}


def retrieval_grid(table: dict, folder: Path) -> Image.Image:
    """One row per fixed query: the query, then its 10 nearest test images, framed green when their fine
    class matches the query's and red when not."""
    features, fine = table["features"], table["fine"].cpu()
    queries = grid_queries(features.shape[0])
    neighbours = nearest_neighbours(features, GRID_NEIGHBOURS, queries=queries).cpu()  # queries x 10
    index = table["index"].cpu()  # table row -> position in the test split
    rows = [[q] + neighbours[r].tolist() for r, q in enumerate(queries)]  # table rows: query, then neighbours
    images = read_test_images(folder, sorted({int(index[i]) for row in rows for i in row}))
    step = TILE + 2 * BORDER
    canvas = Image.new("RGB", (step * (GRID_NEIGHBOURS + 1) + BORDER, step * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, table_row in enumerate(row):
            x, y = c * step + (BORDER if c else 0), r * step
            if c == 0:
                colour = "black"
            else:
                colour = "green" if int(fine[table_row]) == int(fine[row[0]]) else "red"
            draw.rectangle([x, y, x + step - 1, y + step - 1], fill=colour)
            tile = images.get(int(index[table_row]))
            if tile is not None:
                canvas.paste(tile.resize((TILE, TILE), Image.NEAREST), (x + BORDER, y + BORDER))
    return canvas


def embedding_plot(table: dict, max_points: int = 2000, seed: int = 0) -> Image.Image:
    """t-SNE of (at most max_points) test features, coloured by coarse class (left) and fine class (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    features = F.normalize(table["features"].float(), dim=1).cpu().numpy()
    fine, coarse = table["fine"].cpu().numpy(), table["coarse"].cpu().numpy()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(features), size=min(max_points, len(features)), replace=False)
    perplexity = float(min(30, max(2, len(chosen) // 4)))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features[chosen])
    figure, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=100)
    for axis, labels, title in ((axes[0], coarse[chosen], "coarse class"), (axes[1], fine[chosen], "fine class")):
        axis.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab20", s=4)
        axis.set_title(f"test features (t-SNE), coloured by {title}")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
