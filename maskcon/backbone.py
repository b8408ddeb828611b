"""The trained encoder as others use it: `backbone.pt` with its metadata, a model card, `load_backbone`.

backbone.pt holds {"state_dict": the query encoder's weights (a torchvision ResNet without its fc layer, with
the small-image stem at or below 64 px), "metadata": what is needed to use and cite it}. For retrieval on
your own images:

    import torch, maskcon
    from PIL import Image
    encoder = maskcon.load_backbone("runs/cifar100-maskcon-20260101-120000")   # or .../backbone.pt
    batch = maskcon.backbone.images_to_batch([Image.open(p) for p in paths], encoder.metadata)  # N x 3 x S x S
    features = torch.nn.functional.normalize(encoder(batch), dim=1)            # N x F, cosine = dot product
    nearest = (features @ features.T).topk(6, dim=1).indices[:, 1:]            # 5 nearest of each image
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from maskcon.files import write_atomic
from maskcon.errors import UserError, door
from maskcon.methods import METHODS
from maskcon.rundir import BACKBONE_FILE, CHECKPOINTS, CONFIG

MODEL_CARD_FILE = "MODEL_CARD.md"
FEATURES_KEYS = {"features", "fine", "coarse", "index", "keys"}   # the dict that `launch/eval.py --features` saves


def backbone_metadata(resolved: dict, metrics: dict, step: int) -> dict:
    """What load_backbone returns beside the weights. resolved: the run's config.yaml content (with its
    `provenance`); metrics: the final evaluation's Recall@K (percent); step: optimizer steps trained."""
    from maskcon.datasets import recipe_for
    from maskcon.model import FEATURE_DIMS, SMALL_IMAGE_SIZE

    recipe = recipe_for(resolved["dataset"])
    small = resolved["image_size"] <= SMALL_IMAGE_SIZE
    code = resolved.get("provenance", {}).get("code", {})
    return {
        "arch": resolved["arch"],
        "stem": "conv3x3 stride 1, no max-pool" if small else "conv7x7 stride 2 + max-pool (torchvision)",
        "image_size": resolved["image_size"],
        "feature_dim": FEATURE_DIMS[resolved["arch"]],
        "normalisation": {"mean": list(recipe.mean), "std": list(recipe.std),
                          "input": "RGB in [0, 1], whole image resized to image_size x image_size"},
        "dataset": resolved["dataset"], "method": resolved["method"],
        **{name: resolved.get(name) if METHODS[resolved["method"]].reads(name) else None
           for name in ("w", "t")},                     # None where the objective does not read it
        "recall_at_k": dict(metrics), "step": step, "commit": code.get("commit"), "clean": code.get("clean"),
        "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def save_backbone(output_dir: Path | str, encoder: nn.Module, metadata: dict) -> Path:
    """Write OUTPUT_DIR/backbone.pt (weights on the CPU + metadata) and MODEL_CARD.md, each atomically."""
    output_dir = Path(output_dir)
    state = {name: tensor.detach().cpu() for name, tensor in encoder.state_dict().items()}
    path = output_dir / BACKBONE_FILE
    write_atomic(path, lambda partial: torch.save({"state_dict": state, "metadata": metadata}, partial))
    write_atomic(output_dir / MODEL_CARD_FILE, model_card(metadata))
    return path


LABELS_READ = {"coarse": "on the coarse labels of", "fine": "on the fine labels of", None: "without labels, on"}


def model_card(metadata: dict) -> str:
    """A short Markdown model card of the backbone."""
    recall = "  ".join(f"{name} {value:.2f}" for name, value in metadata["recall_at_k"].items()) or "not evaluated"
    norm = metadata["normalisation"]
    hyper = ", ".join(f"{name} {metadata[name]}" for name in ("w", "t") if metadata.get(name) is not None)
    return (f"# {metadata['arch']} backbone: {metadata['method']} on {metadata['dataset']}\n\n"
            f"- Trained by maskcon with the `{metadata['method']}` objective{f' ({hyper})' if hyper else ''} for "
            f"{metadata['step']} steps {LABELS_READ[METHODS[metadata['method']].labels]} `{metadata['dataset']}`; "
            f"commit {metadata['commit']}"
            f"{'' if metadata['clean'] in (True, None) else ' (with uncommitted changes)'}.\n"
            f"- Fine-label Recall@K on the test split: {recall}.\n"
            f"- Input: {norm['input']} ({metadata['image_size']} px), normalised with mean {norm['mean']} and std "
            f"{norm['std']}.\n"
            f"- Network: torchvision {metadata['arch']} without its fc layer, stem {metadata['stem']}; output "
            f"N x {metadata['feature_dim']} pooled features (compare them by cosine similarity).\n\n"
            "```python\nimport maskcon\nencoder = maskcon.load_backbone(\"THIS_FOLDER\")   # nn.Module in eval mode, "
            ".metadata\n```\n\nMethod: Feng & Patras, Masked Contrastive Learning for Coarse-Labelled Dataset, "
            "CVPR 2023.\n")


def build_encoder(arch: str, image_size: int) -> nn.Module:
    """The untrained encoder a run of `arch` at `image_size` px trains (the learner's own constructor)."""
    from maskcon.model import _backbone

    return _backbone(arch, image_size, None)


def load_backbone(path: Path | str, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained encoder of a run folder (or of its backbone.pt) as an nn.Module in eval mode:
    N x 3 x S x S normalised images -> N x F features, with the run's metadata as `.metadata` (a dict:
    arch, stem, image_size, feature_dim, normalisation, dataset, method, w, t, recall_at_k, step, commit)."""
    file = Path(path) / BACKBONE_FILE if Path(path).is_dir() else Path(path)
    if not Path(path).exists():
        raise UserError(f"{path}: no such file or folder; pass a finished run folder or its {BACKBONE_FILE}")
    if not file.is_file():
        raise UserError(_no_backbone(Path(path)))
    try:    # only tensors and plain containers are read (weights_only): a hostile file runs no code
        saved = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as error:      # bytes of anything else: the unpickler raises whatever it stumbles on
        raise UserError(f"cannot read {file} ({type(error).__name__}); it is not a maskcon backbone: pass a "
                        f"finished run folder or its {BACKBONE_FILE}") from None
    if isinstance(saved, dict) and FEATURES_KEYS <= set(saved):
        raise UserError(f"{file} is a features file written by launch/eval.py --features, not a network; pass a "
                        f"finished run folder or its {BACKBONE_FILE}")
    if not isinstance(saved, dict) or not {"state_dict", "metadata"} <= set(saved):
        raise UserError(f"{file} holds no maskcon metadata (weights only); rebuild the encoder with "
                        f"maskcon.backbone.build_encoder(arch, image_size) and load it")
    try:
        metadata = saved["metadata"]
        encoder = build_encoder(metadata["arch"], metadata["image_size"])
        encoder.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{file}: its weights do not fit the network its metadata describes "
                        f"({type(error).__name__}); save the backbone again from its run") from None
    encoder.metadata = metadata
    return encoder.eval()


def _no_backbone(folder: Path) -> str:
    """Why FOLDER (a folder without backbone.pt) gives no backbone, and how to get one: a run writes its
    backbone.pt when it finishes, so a stopped run, its checkpoints folder or one checkpoint is resumed to the end."""
    from maskcon import checkpoints

    folder = folder.absolute()       # "." inside a checkpoints folder: its run is the folder above
    if (folder / checkpoints.FILES_RECORD).exists() or (folder / checkpoints.MODEL_FILE).exists():
        what, run, resume = "is a checkpoint, not a backbone", folder.parent.parent, f"--resume {folder}"
    elif checkpoints.list_checkpoints(folder):
        what, run, resume = "is a run's checkpoints folder, not a backbone", folder.parent, "--resume"
    elif (folder / CONFIG).is_file():
        what, run, resume = f"holds no {BACKBONE_FILE}: the run has not finished", folder, "--resume"
        if not any(checkpoints.damage(path) is None for path in checkpoints.list_checkpoints(folder / CHECKPOINTS)):
            return (f"{folder} {what} and holds no intact checkpoint; run it again (the command that started it, "
                    f"with --output-dir {folder} --resume auto)")
    else:
        return f"no backbone at {folder / BACKBONE_FILE}; pass a finished run folder or its {BACKBONE_FILE}"
    if (run / BACKBONE_FILE).is_file():      # the run has finished: its backbone is there
        return (f"{folder} {what}; the run's trained backbone is {run / BACKBONE_FILE} (load {run}), or evaluate "
                f"this one with {door('eval')} {folder}")
    return (f"{folder} {what}; a run writes {BACKBONE_FILE} when it finishes: resume it to the end (the command "
            f"that started it, with --output-dir {run} {resume}), or evaluate it as it is with "
            f"{door('eval')} {folder}")


def images_to_batch(images: list, metadata: dict) -> torch.Tensor:
    """PIL images (or paths of image files) -> N x 3 x S x S float32 batch as the run's test view made it: 8-bit
    RGB as the shards hold it (16-bit grey / 257, alpha dropped), the whole image resized to S x S (bilinear,
    antialiased), scaled to [0, 1] and normalised with the run's mean and std."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from maskcon.datasets.source import rgb8   # the shard converter's 8-bit RGB, so both see the same pixels

    if isinstance(images, (str, os.PathLike, Image.Image)) or not hasattr(images, "__iter__"):
        raise TypeError(f"images_to_batch takes a list of PIL images or image paths, not a {type(images).__name__}")
    images = list(images)
    if not images:
        raise ValueError("images_to_batch got no images; pass a list of at least one PIL image or image path")
    wrong = [type(image).__name__ for image in images if not isinstance(image, (str, os.PathLike, Image.Image))]
    if wrong:
        raise TypeError(f"images_to_batch takes PIL images or image paths, not {', '.join(sorted(set(wrong)))}")
    size = metadata["image_size"]
    norm = metadata["normalisation"]

    def test_view(image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                return test_view(opened)
        rgb = Image.fromarray(rgb8(image))
        return TF.normalize(TF.to_tensor(TF.resize(rgb, [size, size], antialias=True)), norm["mean"], norm["std"])

    return torch.stack([test_view(image) for image in images])
