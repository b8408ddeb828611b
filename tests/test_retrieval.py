import numpy as np
import pytest
import torch

from maskcon.retrieval import RECALL_KS, nearest_neighbours, recall_at_k


def brute_force_recall(features: np.ndarray, labels: np.ndarray, ks) -> dict:
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")
    result = {}
    for k in ks:
        top = order[:, : min(k, len(labels) - 1)]
        result[f"R@{k}"] = 100.0 * np.mean([(labels[top[i]] == labels[i]).any() for i in range(len(labels))])
    return result


@pytest.mark.parametrize("chunk_size", [7, 1024])
@pytest.mark.parametrize("num, alone", [(300, 0), (40, 3)])    # 40 images: K of 50 and 100 see them all
def test_recall_equals_brute_force_numpy(chunk_size, num, alone):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=num)
    labels[:alone] = 12 + np.arange(alone)      # classes of one image each
    features = rng.normal(size=(num, 16)) + 0.8 * np.eye(16)[labels % 16]
    expected = brute_force_recall(features, labels, RECALL_KS)
    got = recall_at_k(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), RECALL_KS,
                      chunk_size=chunk_size)
    for k in RECALL_KS:
        assert got[f"R@{k}"] == pytest.approx(expected[f"R@{k}"], abs=1e-6)
    assert 0 < got["R@1"] < got["R@10"] <= got["R@100"] <= 100
    if alone:       # K above N - 1 finds a match for every image, but those alone in their class
        assert got["R@100"] == pytest.approx(100 * np.mean(np.bincount(labels)[labels] > 1)) and got["R@100"] < 100


def test_an_image_alone_in_its_class_is_a_miss_at_every_k():
    # fewer test images than K: a query with no other image of its class still misses at K of 50 and 100
    features = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    assert set(recall_at_k(features, torch.arange(5), RECALL_KS).values()) == {0.0}
    assert recall_at_k(features, torch.tensor([0, 0, 1, 2, 3]), (100,))["R@100"] == 40.0


def test_query_excluded_by_index_not_by_rank():
    # two identical images of different classes: each must find the other, not itself
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    neighbours = nearest_neighbours(features, 1)
    assert neighbours[:, 0].tolist() == [1, 0, 3, 2]
    assert recall_at_k(features, labels, (1,))["R@1"] == 0.0
    assert recall_at_k(features, torch.tensor([0, 0, 1, 1]), (1,))["R@1"] == 100.0


def test_neighbours_of_chosen_queries_equal_those_of_every_row():
    rng = np.random.default_rng(1)
    features = torch.tensor(rng.normal(size=(50, 8)), dtype=torch.float32)
    every = nearest_neighbours(features, 5)
    queries = [0, 7, 49, 7]
    assert torch.equal(nearest_neighbours(features, 5, queries=queries, chunk_size=3), every[queries])
    assert nearest_neighbours(features, 100, queries=[3]).shape == (1, 49)  # k clipped to N - 1


def test_retrieval_grid_shows_each_query_and_its_neighbours_read_from_the_shards(tmp_path):
    from maskcon.datasets.synthetic import write_synthetic_shards
    from maskcon.plots import BORDER, GRID_NEIGHBOURS, TILE, grid_queries, read_test_images, retrieval_grid

    def colour(position: int) -> np.ndarray:
        return np.full((16, 16, 3), [5 * position, 255 - 5 * position, 100], np.uint8)

    out = write_synthetic_shards(tmp_path / "shards", num_train=4, num_test=50, image=colour,
                                 labels=lambda position: (position % 5, 0), num_fine=5, num_coarse=1,
                                 samples_per_shard=8, image_size=(16, 16))
    images = read_test_images(out, [0, 9, 49])
    assert sorted(images) == [0, 9, 49] and all(np.array_equal(np.asarray(images[i]), colour(i)) for i in images)
    # table rows in another order than the test split, as gathered from several processes
    index = torch.tensor(np.random.default_rng(0).permutation(50))
    fine = index % 5
    features = torch.eye(5)[fine] + 0.01 * torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(retrieval_grid({"features": features, "fine": fine, "index": index}, out))
    step = TILE + 2 * BORDER
    for r, query in enumerate(grid_queries(50)):
        y = r * step
        assert tuple(grid[y + step // 2, BORDER + step // 2]) == tuple(colour(int(index[query]))[0, 0])
        frames = [tuple(grid[y + 1, c * step + BORDER + 1]) for c in range(1, GRID_NEIGHBOURS + 1)]
        # 9 other images of the query's fine class, then one of another class
        assert frames.count((0, 128, 0)) == 9 and frames.count((255, 0, 0)) == 1, frames


def test_the_pictures_carry_their_titles_and_legends_into_their_files(tmp_path):
    from PIL import Image

    from maskcon.datasets.synthetic import write_synthetic_shards
    from maskcon.plots import embedding_plot, retrieval_grid
    from maskcon.tracking import _save_picture

    out = write_synthetic_shards(tmp_path / "shards", num_train=4, num_test=60,
                                 image=lambda position: np.full((16, 16, 3), position, np.uint8),
                                 labels=lambda position: (position % 6, position % 6 // 3), num_fine=6, num_coarse=2,
                                 samples_per_shard=8, image_size=(16, 16))
    fine = torch.arange(60) % 6
    table = {"features": torch.eye(6)[fine] + 0.01 * torch.randn(60, 6, generator=torch.Generator().manual_seed(0)),
             "fine": fine, "coarse": fine // 3, "index": torch.arange(60)}
    _save_picture(retrieval_grid(table, out, step=120), tmp_path / "grid.png")
    texts = Image.open(tmp_path / "grid.png").text
    assert "retrievals" in texts["Title"] and "step 120" in texts["Title"]
    assert retrieval_grid(table, out, step=0).info["Title"].endswith("features, before training")   # untrained
    assert texts["Description"].split("; ") == ["query (first column)", "same fine class as the query",
                                                "another fine class"]
    _save_picture(embedding_plot(table, coarse_names=["animals", "vehicles"], step=120), tmp_path / "map.png")
    texts = Image.open(tmp_path / "map.png").text
    assert "t-SNE" in texts["Title"] and "step 120" in texts["Title"]
    legend = texts["Description"].split("; ")
    assert "coarse class: animals" in legend and "coarse class: vehicles" in legend
    assert [entry for entry in legend if entry.startswith("fine class: ")] == [f"fine class: fine {c}" for c in range(6)]
