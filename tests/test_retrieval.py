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
def test_recall_equals_brute_force_numpy(chunk_size):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=300)
    features = rng.normal(size=(300, 16)) + 0.8 * np.eye(16)[labels % 16]
    expected = brute_force_recall(features, labels, RECALL_KS)
    got = recall_at_k(torch.tensor(features, dtype=torch.float32), torch.tensor(labels), RECALL_KS,
                      chunk_size=chunk_size)
    for k in RECALL_KS:
        assert got[f"R@{k}"] == pytest.approx(expected[f"R@{k}"], abs=1e-6)
    assert 0 < got["R@1"] < got["R@10"] <= got["R@100"] <= 100


def test_query_excluded_by_index_not_by_rank():
    # two identical images of different classes: each must find the other, not itself
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    neighbours = nearest_neighbours(features, 1)
    assert neighbours[:, 0].tolist() == [1, 0, 3, 2]
    assert recall_at_k(features, labels, (1,))["R@1"] == 0.0
    assert recall_at_k(features, torch.tensor([0, 0, 1, 1]), (1,))["R@1"] == 100.0
