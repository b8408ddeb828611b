"""The official-style reference loader the benchmarks compare with: the official MaskCon code's way of loading.

A PIL image decoded per sample from its shard tar member, the recipe's steps as PIL transforms (PIL_OPS:
torchvision's transforms on PIL images, MoCo v2's PIL Gaussian blur), ToTensor and Normalize, in a
shuffling torch DataLoader with worker processes. Batches are tuples (query, key: float32 N x 3 x S x S,
fine, coarse: int64 N) on the host. `python launch/bench.py loader` and `python launch/bench.py train`
both use `official_style_loader`.
"""

from __future__ import annotations

import dataclasses
import io
import random
from pathlib import Path

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

from maskcon.loaders.split import TarSamples, read_split
from maskcon.loaders.torch_backend import TORCHVISION_OPS, worker_context
from maskcon.recipes import Recipe, check_implementations


class _PilGaussianBlur:
    """MoCo v2's GaussianBlur, as the official code uses it: PIL's filter with sigma uniform in a range."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


# op name -> (params, output side S) -> a transform of PIL images (semantics: maskcon/recipes.py); the other
# ops are torchvision's transforms, which take PIL images as they take tensors
PIL_OPS = {
    **TORCHVISION_OPS,
    "random_resized_crop": lambda p, size: T.RandomResizedCrop(size, scale=p["scale"], ratio=p["ratio"]),
    "resize": lambda p, size: T.Resize((size, size)),
    "gaussian_blur": lambda p, size: T.RandomApply([_PilGaussianBlur(p["sigma"])], p=p["p"]),
}
check_implementations(PIL_OPS, "PIL")


def pil_transform(steps, recipe: Recipe, size: int) -> T.Compose:
    """A PIL image -> normalised float32 3 x size x size, following the steps."""
    return T.Compose([*(PIL_OPS[step.op](step.params, size) for step in steps), T.ToTensor(),
                      T.Normalize(recipe.mean, recipe.std)])


class OfficialTwoViews(torch.utils.data.Dataset):
    """Position -> (query, key, fine, coarse): one PIL image per sample, two views from the global RNGs."""

    def __init__(self, samples: TarSamples, query: T.Compose, key: T.Compose):
        self.samples, self.query, self.key = samples, query, key

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int):
        data, fine, coarse = self.samples.read(position)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return self.query(image), self.key(image), fine, coarse


def official_style_loader(folder: Path | str, *, recipe: str | Recipe, image_size: int, batch_size: int,
                          workers: int, seed: int = 0, query_view: str = "strong", key_view: str = "weak",
                          pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The official code's loading of the train split under `folder`, with this run's query and key views, in a
    DataLoader set up as the official code sets it up: shuffled (from `seed`), drop_last, `workers` worker
    processes, pinned memory for a GPU. Workers persist across epochs (the official code restarts them every
    epoch; keeping them is kinder to this baseline on small sets)."""
    from maskcon.datasets import recipe_for

    chosen = recipe if isinstance(recipe, Recipe) else recipe_for(recipe)
    views = dataclasses.replace(chosen, strong=chosen.view(query_view), weak=chosen.view(key_view))
    _, split = read_split(folder, "train")
    dataset = OfficialTwoViews(TarSamples(split), pil_transform(views.strong, views, image_size),
                               pil_transform(views.weak, views, image_size))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                       num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(seed),
                                       multiprocessing_context=worker_context(workers))
