"""Pictures a person would rather look at than numbers: top-10 retrievals and a 2-D embedding map."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

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


RETRIEVAL_LEGEND = (("black", "query (first column)"), ("green", "same fine class as the query"),
                    ("red", "another fine class"))


def retrieval_grid(table: dict, folder: Path, step: int | None = None) -> Image.Image:
    """One row per fixed query: the query, then its 10 nearest test images, framed green when their fine
    class matches the query's and red when not; under it its title (with the training step) and legend."""
    features, fine = table["features"], table["fine"].cpu()
    queries = grid_queries(features.shape[0])
    neighbours = nearest_neighbours(features, GRID_NEIGHBOURS, queries=queries).cpu()  # queries x 10
    index = table["index"].cpu()  # table row -> position in the test split
    rows = [[q] + neighbours[r].tolist() for r, q in enumerate(queries)]  # table rows: query, then neighbours
    images = read_test_images(folder, sorted({int(index[i]) for row in rows for i in row}))
    pitch = TILE + 2 * BORDER
    canvas = Image.new("RGB", (pitch * (GRID_NEIGHBOURS + 1) + BORDER, pitch * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, table_row in enumerate(row):
            x, y = c * pitch + (BORDER if c else 0), r * pitch
            if c == 0:
                colour = "black"
            else:
                colour = "green" if int(fine[table_row]) == int(fine[row[0]]) else "red"
            draw.rectangle([x, y, x + pitch - 1, y + pitch - 1], fill=colour)
            tile = images.get(int(index[table_row]))
            if tile is not None:
                canvas.paste(tile.resize((TILE, TILE), Image.NEAREST), (x + BORDER, y + BORDER))
    return captioned(canvas, f"Top-{GRID_NEIGHBOURS} retrievals of {len(rows)} fixed test queries by backbone "
                             f"features{_when(step)}", RETRIEVAL_LEGEND)


def _when(step: int | None) -> str:
    """A picture's title's end: the training step it shows, or that it shows the network before training."""
    return "" if step is None else ", before training" if step == 0 else f", step {step}"


def captioned(body: Image.Image, title: str, legend: tuple) -> Image.Image:
    """BODY with a band under it: the title, then one coloured square and its words per (colour, words) of
    LEGEND. The texts also go into the PNG as its Title and Description (`Image.open(path).text`)."""
    font = ImageFont.load_default(size=12)
    line = 18
    width = max(body.width, 8 + int(font.getlength(title)))
    picture = Image.new("RGB", (width, body.height + line * (1 + len(legend)) + 8), "white")
    picture.paste(body, (0, 0))
    draw = ImageDraw.Draw(picture)
    y = body.height + 4
    draw.text((4, y), title, fill="black", font=font)
    for colour, words in legend:
        y += line
        draw.rectangle([4, y + 2, 16, y + 14], fill=colour)
        draw.text((22, y), words, fill="black", font=font)
    picture.info.update(figure_texts(title, [words for _, words in legend]))
    return picture


def figure_texts(title: str, legend: list[str]) -> dict:
    """What a picture says, as PNG text entries: its title, and its legend's entries joined by "; "."""
    return {"Title": title, "Description": "; ".join(legend)}


FINE_LEGEND_MAX = 20   # fine classes shown by name in the legend; beyond, colours repeat and the title says so


def embedding_plot(table: dict, max_points: int = 2000, seed: int = 0, coarse_names: list[str] | None = None,
                   fine_names: list[str] | None = None, step: int | None = None) -> Image.Image:
    """t-SNE of (at most max_points) test features, coloured by coarse class (left, with a legend of the
    coarse classes' names) and by fine class (right; a legend while there are at most FINE_LEGEND_MAX)."""
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
    figure, axes = plt.subplots(1, 2, figsize=(11, 5.5), dpi=100)
    title = f"Test features of the backbone, t-SNE{_when(step)}"
    figure.suptitle(title)
    names = {"coarse class": lambda c: coarse_names[c] if coarse_names else f"coarse {c}",
             "fine class": lambda c: fine_names[c] if fine_names else f"fine {c}"}
    entries = []
    for axis, labels, kind in ((axes[0], coarse[chosen], "coarse class"), (axes[1], fine[chosen], "fine class")):
        classes = np.unique(labels)
        colours = plt.cm.tab10 if len(classes) <= 10 else plt.cm.tab20   # tab10's colours differ most
        for position, label in enumerate(classes):
            shown = labels == label
            axis.scatter(points[shown, 0], points[shown, 1], color=colours(position % colours.N), s=4,
                         label=names[kind](int(label)))
        if len(classes) <= FINE_LEGEND_MAX:
            legend = axis.legend(title=kind, fontsize=7, markerscale=3, loc="best")
            entries += [f"{kind}: {text.get_text()}" for text in legend.get_texts()]
            axis.set_title(f"coloured by {kind}")
        else:
            axis.set_title(f"coloured by {kind} ({len(classes)} classes; colours repeat)")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    buffer.seek(0)
    picture = Image.open(buffer).convert("RGB")
    picture.info.update(figure_texts(title, entries))
    return picture
