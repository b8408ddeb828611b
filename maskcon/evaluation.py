"""Evaluation without training: Recall@K of a trained network on the test split of any shards, on one or
several processes, as the trainer evaluates it (`maskcon.train.extract_features`, the run's test view and
normalisation), and the features written to a file for one's own retrieval.

    python launch/eval.py RUN_OR_BACKBONE_OR_CHECKPOINT [--shards DIR] [--features FILE.pt]
    accelerate launch --multi_gpu --num_processes N launch/eval.py ...

The network is a run folder's backbone.pt (its newest intact checkpoint when it has none yet), a backbone.pt
file, a run's checkpoints folder (its newest intact checkpoint), or one checkpoint folder (RUN/checkpoints/step-N).
Its recipe (normalisation), image size, architecture and evaluation batch are the run's, from the backbone's
metadata and the run's config.yaml. An existing --features file is replaced only when eval.py wrote it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import yaml
from torch import nn

from maskcon import checkpoints, remote, rundir
from maskcon.rundir import BACKBONE_FILE
from maskcon.backbone import FEATURES_KEYS, build_encoder, load_backbone
from maskcon.errors import OneLineParser, UserError, file_in_the_way
from maskcon.files import write_atomic
from maskcon.retrieval import RECALL_KS, recall_at_k, whole_split_note
from maskcon.shard_format import MANIFEST

ENCODER_PREFIX = "encoder."   # the query encoder's weights in a checkpoint's model.safetensors


class Network(nn.Module):
    """A trained query encoder as the trainer's evaluation reads it (`features`)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images).float()


def load_network(path: Path) -> tuple[nn.Module, dict, str]:
    """(the query encoder, the run's settings {dataset, arch, image_size, eval_batch_size, shards}, what was
    loaded) of PATH: a run folder, a backbone.pt, a run's checkpoints folder, or one checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder; pass a run folder, a backbone.pt or a checkpoint folder "
                        f"(RUN/checkpoints/step-N)")
    run = _run_folder(path)
    settings = yaml.safe_load((run / rundir.CONFIG).read_text()) if run and (run / rundir.CONFIG).is_file() else {}
    if path.is_file() or (path / BACKBONE_FILE).is_file():
        encoder = load_backbone(path)
        settings = {**settings, **{name: encoder.metadata[name] for name in ("dataset", "arch", "image_size")}}
        return encoder, settings, f"backbone {path if path.is_file() else path / BACKBONE_FILE}"
    checkpoint = path if (path / checkpoints.MODEL_FILE).is_file() else _newest_checkpoint(
        path if checkpoints.list_checkpoints(path) else path / rundir.CHECKPOINTS)
    if checkpoint is None and (path / rundir.GRID_FILE).is_file():
        raise UserError(f"{path} is the folder of a grid (launch/grid.py): pass one of its points, a run folder "
                        f"{path}/POINT")
    if checkpoint is None:
        raise UserError(f"{path} holds no backbone.pt and no checkpoint; pass a run folder, a backbone.pt or a "
                        f"checkpoint folder (RUN/checkpoints or RUN/checkpoints/step-N)")
    if not settings:
        raise UserError(f"{checkpoint} lies outside a run folder with config.yaml; its network cannot be built")
    encoder = build_encoder(settings["arch"], settings["image_size"])
    try:
        weights = safetensors.torch.load_file(str(checkpoint / checkpoints.MODEL_FILE))
        encoder.load_state_dict({name[len(ENCODER_PREFIX):]: tensor for name, tensor in weights.items()
                                 if name.startswith(ENCODER_PREFIX)})
    except (OSError, RuntimeError, ValueError, safetensors.SafetensorError) as error:
        problem = checkpoints.damage(checkpoint) or type(error).__name__
        raise UserError(f"checkpoint {checkpoint} cannot be read ({problem}); pass another checkpoint, or the run "
                        f"folder for its newest intact one") from None
    return encoder.eval(), settings, f"checkpoint {checkpoint}"


def _newest_checkpoint(root: Path) -> Path | None:
    """The newest intact checkpoint under ROOT (a run's checkpoints folder); None when it holds none."""
    try:
        return checkpoints.newest_intact(root, lambda line: None)
    except UserError:
        listed = "; ".join(f"{path.name}: {checkpoints.damage(path)}" for path in checkpoints.list_checkpoints(root))
        raise UserError(f"no intact checkpoint in {root} ({listed}); pass the run's {BACKBONE_FILE} if it has one, "
                        f"else train the run again") from None


def _run_folder(path: Path) -> Path | None:
    """The run folder PATH belongs to (itself, the folder of its backbone.pt, or of its checkpoints)."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / rundir.CONFIG).is_file():
            return candidate
    return None


def evaluate(path: Path, shards: str | Path | None, *, batch_size: int | None, loader: str, threads: int | None,
             features_file: Path | None, shard_cache: str | None = None) -> tuple[dict, str]:
    """(R@K on the main process, {} elsewhere; what was evaluated). Every process calls it. SHARDS: a folder or a
    remote one (staged into the node's SHARD_CACHE, by default the run's, as the trainer stages it); None: the
    shards the run recorded."""
    from accelerate import Accelerator

    from maskcon.loaders import LoaderSpec, build_test_loader
    from maskcon.train import extract_features

    encoder, settings, what = load_network(path)
    location = shards or _recorded_shards(settings)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    shards = Path(location)
    if remote.is_url(str(location)):     # one process per node downloads, the others wait on the cache's lock
        speaks = accelerator.is_local_main_process
        shards = remote.stage(str(location), shard_cache or settings.get("shard_cache"), show_progress=speaks,
                              log=lambda line: print(line, file=sys.stderr) if speaks else None, announce_wait=speaks)
    network = Network(encoder).to(accelerator.device)
    test = build_test_loader(shards, LoaderSpec(recipe=settings["dataset"], image_size=settings["image_size"],
                                                batch_size=batch_size or settings.get("eval_batch_size", 256),
                                                rank=accelerator.process_index, world_size=accelerator.num_processes,
                                                device=accelerator.device, backend=loader, num_threads=threads))
    table = extract_features(network, test, accelerator)
    if table is None:
        return {}, what
    metrics = recall_at_k(table["features"], table["fine"], RECALL_KS)
    alone = int((torch.bincount(table["fine"])[table["fine"]] == 1).sum())
    if alone:     # no other image can be found for them: a figure near 0 may say more of the split than the network
        print(f"note: {alone} of {len(table['fine'])} test images are the only one of their fine class in {shards}: "
              f"each counts as a miss at every K", file=sys.stderr)
    whole = whole_split_note(len(table["fine"]))
    if whole:
        print(f"note: {whole}", file=sys.stderr)
    if features_file is not None:
        _write_features(features_file, table, shards)
    return metrics, f"{what} on {location}"


def _recorded_shards(settings: dict) -> str | Path:
    """The shards a run recorded: its remote folder, else its local --shards or its dataset's default folder where
    they are; one line asking for --shards where they are not (a relative folder is relative to where the run was
    started)."""
    from maskcon.config import default_shards_dir

    recorded, dataset = settings.get("shards"), settings["dataset"]
    if remote.is_url(recorded):
        return recorded
    shards = Path(recorded or default_shards_dir(dataset))
    if not (shards / MANIFEST).is_file():
        whose = "its --shards" if recorded else "the default"
        where = "" if shards.is_absolute() else ", relative to the folder the run was started in"
        raise UserError(f"no {dataset} shards at {shards} ({whose}{where}); pass --shards FOLDER, the {dataset} "
                        f"shards the run trained on")
    return shards


def _write_features(file: Path, table: dict, shards: Path) -> None:
    """FILE (torch.save): features N x F fp32, fine, coarse, index (position in the test split), keys, and the
    names of the labels: fine_classes[fine[i]], coarse_classes[coarse[i]]."""
    from maskcon.loaders import read_split
    from maskcon.loaders.split import TarSamples
    from maskcon.shard_format import key_at

    manifest, split = read_split(shards, "test")
    samples = TarSamples(split)
    keys = [key_at(samples.split.indexes[int(samples.rows[i, 0])], int(samples.rows[i, 1]))
            for i in table["index"].tolist()]
    check_features_file(file)   # again: a file may have been put there while the evaluation ran
    features = {**{name: values.cpu() for name, values in table.items()}, "keys": keys,
                "fine_classes": [str(name) for name in manifest["fine_classes"]],
                "coarse_classes": [str(name) for name in manifest["coarse_classes"]]}
    try:
        write_atomic(file, lambda partial: torch.save(features, partial))
    except (OSError, RuntimeError) as error:   # torch.save reports a full disk as a RuntimeError
        raise UserError(f"writing --features {file} failed ({' '.join(str(error).split())}); free space or fix "
                        f"permissions there; nothing was written") from None


def check_features_file(file: Path) -> None:
    """Refuse a --features FILE that cannot be written, or that would replace a file other than a features
    file of eval.py, before anything is evaluated."""
    if file.is_dir():
        raise UserError(f"--features {file} is a folder; name a file in it, e.g. --features {file / 'features.pt'}")
    if not file.parent.is_dir():
        blocker = file_in_the_way(file.parent)
        if blocker:
            raise UserError(f"--features {file}: {blocker} is a file, not a folder; choose another path")
        raise UserError(f"--features {file}: the folder {file.parent} does not exist; create it (mkdir -p "
                        f"{file.parent}) or choose another path")
    if not os.access(file.parent, os.W_OK | os.X_OK):
        raise UserError(f"--features {file}: no permission to write in {file.parent}; choose another folder")
    if os.path.lexists(file) and not (file.is_file() and _is_features_file(file)):
        raise UserError(f"--features {file} exists and is not a features file written by eval.py; choose another "
                        f"file name, or move that file away first")


def _is_features_file(file: Path) -> bool:
    """Whether FILE is a features file that eval.py --features wrote (only tensors and lists read; tensors mapped)."""
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:       # bytes of anything else: the unpickler raises whatever it stumbles on
        return False
    return isinstance(saved, dict) and FEATURES_KEYS <= set(saved)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python launch/eval.py", allow_abbrev=False,
                           description="Recall@K of a trained network on a test split, without training.")
    parser.add_argument("network", type=Path,
                        help="a run folder, its backbone.pt, its checkpoints folder, or one checkpoint folder")
    parser.add_argument("--shards", default=None,
                        help="shard folder whose test split is evaluated, or a remote one (s3://, gs://, https://), "
                             "staged as training stages it (default: the run's shards)")
    parser.add_argument("--shard-cache", default=None,
                        help="node-local folder for remote shards (default: the run's, else $MASKCON_SHARD_CACHE, "
                             "else ~/.cache/maskcon/shards)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process per batch (default: the run's)")
    parser.add_argument("--loader", choices=("dali", "torch"), default="dali", help="data loader back end")
    parser.add_argument("--loader-threads", type=int, default=None, help="loader threads per process")
    parser.add_argument("--features", type=Path, default=None,
                        help="also write the features, labels, test positions and sample keys to this file "
                             "(torch.save); an existing file is replaced only if it is a features file of eval.py")
    parser.add_argument("--json", action="store_true", help="print the Recall@K as one JSON line")
    return parser


def main(argv: list[str]) -> int:
    """launch/eval.py (through maskcon.cli, which prints a UserError as its one line): Recall@K printed (and
    with --json, one JSON line); 0."""
    args = build_parser().parse_args(argv)
    remote.check_location(args.shards)
    remote.check_location(args.shard_cache)
    if args.features is not None:
        check_features_file(args.features)
    metrics, what = evaluate(args.network, args.shards, batch_size=args.batch_size, loader=args.loader,
                             threads=args.loader_threads, features_file=args.features, shard_cache=args.shard_cache)
    if metrics:
        print(json.dumps(metrics) if args.json else
              f"{what}: " + "  ".join(f"{name} {value:.2f}" for name, value in metrics.items()))
    return 0
