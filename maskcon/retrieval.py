"""Recall@K of fine labels: the quality measure of the paper.

For every test image (the query) the other test images are ranked by cosine similarity of their
L2-normalised backbone features; Recall@K is the fraction of queries with at least one image of the same
fine class among their K nearest neighbours. The query itself is excluded by its index, so exact
duplicates elsewhere in the split still count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RECALL_KS = (1, 2, 5, 10, 50, 100)


def whole_split_note(test_samples: int, ks=RECALL_KS) -> str | None:
    """The Recall@K that rank every other image of a test split this small, in words; None when there is none."""
    trivial = [f"R@{k}" for k in ks if k >= test_samples - 1]
    if not trivial:
        return None
    return (f"the test split has {test_samples} images: {' and '.join(trivial)} rank all the others, so they say "
            f"nothing of the network; judge the run by the smaller K")


@torch.no_grad()
def nearest_neighbours(features: torch.Tensor, k: int, *, queries: torch.Tensor | list[int] | None = None,
                       chunk_size: int = 1024) -> torch.Tensor:
    """Indices of the k most similar other rows for every query row (default: every row). features: N x F.
    Returns Q x k (int64), most similar first; k larger than N - 1 is clipped.

    Similarities are computed a chunk of queries at a time (chunk x N), so 50,000 test images need
    chunk_size x 50,000 x 4 bytes at once rather than N x N.
    """
    features = F.normalize(features.float(), dim=1)
    num = features.shape[0]
    rows = (torch.arange(num, device=features.device) if queries is None
            else torch.as_tensor(queries, dtype=torch.long, device=features.device))
    k = min(k, num - 1)
    result = torch.empty(len(rows), k, dtype=torch.long, device=features.device)
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        similarity = features[chunk] @ features.T  # chunk x N
        similarity[torch.arange(len(chunk), device=features.device), chunk] = float("-inf")  # the query itself
        result[start:start + len(chunk)] = similarity.topk(k, dim=1).indices
    return result


@torch.no_grad()
def recall_at_k(features: torch.Tensor, labels: torch.Tensor, ks=RECALL_KS, *,
                chunk_size: int = 1024) -> dict[str, float]:
    """Recall@K in percent for every K in ks (K larger than N - 1 is clipped). Keys 'R@1', 'R@2', ..."""
    if features.shape[0] < 2:
        raise ValueError("Recall@K needs at least two test images")
    neighbours = nearest_neighbours(features, max(ks), chunk_size=chunk_size)
    labels = labels.to(neighbours.device)
    hits = labels[neighbours] == labels[:, None]  # N x k
    # rank of the first image of the query's class; a query without one misses at every K, however large
    first_hit = torch.where(hits.any(1), hits.float().argmax(1), torch.full_like(labels, max(ks)))
    num = labels.shape[0]
    return {f"R@{k}": 100.0 * int((first_hit < k).sum()) / num for k in ks}
