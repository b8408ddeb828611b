"""One typed configuration for a training run: defaults, per-dataset presets, YAML, command line.

Precedence, lowest first: the dataclass defaults (supplement, section A), the preset of the dataset,
a YAML file given with ``--config``, then command-line options. Every field is a command-line option in
both spellings, ``--batch-size 64`` and ``--batch_size=64`` (the form W&B sweep agents pass).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from maskcon.datasets import DATASETS
from maskcon.errors import OneLineParser, UserError
from maskcon.loaders.spec import BACKENDS
from maskcon.model import FEATURE_DIMS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from maskcon.recipes import VIEW_NAMES
from maskcon.remote import check_location
from maskcon.step import COMPILE_MODES
from maskcon.methods import METHODS

ARCHS = tuple(FEATURE_DIMS)   # the backbones the model builds
VIEWS = VIEW_NAMES            # the recipes' views


def option(default, help: str, *, resume: str, **extra):
    """A Config field: its default, its --help text, and whether a resumed run must keep the checkpoint's
    value ("match": it defines the run and its weights) or may change it ("free": where and how often the
    run logs, evaluates and writes, how fast it runs, where the same shards lie). extra: argparse's (const)."""
    assert resume in ("match", "free"), resume
    return field(default=default, metadata={"help": help, "resume": resume, **extra})


@dataclass
class Config:
    # --- data ---
    dataset: str = option("digits", f"dataset of the shards: {', '.join(DATASETS)}", resume="match")
    shards: str | None = option(None, "shard folder, or a remote one: s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or https://HOST/PATH, staged once per node into --shard-cache (none: shards/DATASET under the current folder, where make_shards writes)", resume="free")
    shard_cache: str | None = option(None, "node-local folder for remote shards staged by the run (default: $MASKCON_SHARD_CACHE, else ~/.cache/maskcon/shards)", resume="free")
    shard_cache_limit: str | None = option(None, "most the shard cache may hold, e.g. 500GB or 1.5TiB: whole folders not in use are evicted, least recently used first (default: no limit)", resume="free")
    image_size: int = option(32, "side of the square network input, pixels", resume="match")
    query_view: str = option("strong", f"augmentation of the query view: {'|'.join(VIEWS)}", resume="match")
    key_view: str = option("weak", f"augmentation of the key view: {'|'.join(VIEWS)}", resume="match")
    loader: str = option("dali", f"data loader back end: {'|'.join(BACKENDS)}", resume="match")
    loader_threads: int | None = option(None, "CPU threads (DALI) or workers (torch) per process, for training and evaluation; none: 2 for images of up to 64 px, 8 for larger ones", resume="free")
    # --- method ---
    method: str = option("maskcon", f"objective: {'|'.join(METHODS)}", resume="match")
    w: float = option(1.0, "weight of the soft target (MaskCon, Grafit) or of the coarse CE (CoIns), in [0, 1]", resume="match")
    t: float = option(0.05, "MaskCon temperature of the key-to-bank similarities (tau)", resume="match")
    t0: float = option(0.1, "temperature of the contrastive logits (tau_0, supplement section A)", resume="match")
    queue_size: int = option(8192, "memory bank size K, keys", resume="match")
    key_momentum: float = option(0.99, "momentum m of the key encoder", resume="match")
    # --- network ---
    arch: str = option("resnet18", f"backbone: {'|'.join(ARCHS)}", resume="match")
    pretrained: str | None = option(None, "initial weights: 'imagenet' (torchvision's; the paper datasets' default), a local torchvision weights file, or none", resume="match")
    proj_hidden: int = option(512, "projector hidden width", resume="match")
    proj_dim: int = option(128, "projector output dimension", resume="match")
    # --- optimisation (supplement, section A) ---
    epochs: int = option(200, "training epochs", resume="match")
    batch_size: int = option(128, "images per process per step (set by --global-batch when given)", resume="match")
    global_batch: int | None = option(None, "images per step summed over all processes, split evenly over them; the sweeps pin it to the recipe's batch (recorded in config.yaml either way)", resume="free")
    lr: float = option(0.02, "SGD learning rate for the reference batch", resume="match")
    lr_reference_batch: int = option(128, "global batch that --lr is given for", resume="match")
    scale_lr: bool = option(True, "scale lr linearly by global batch / reference batch", resume="match")
    momentum: float = option(0.9, "SGD momentum", resume="match")
    weight_decay: float = option(5e-4, "SGD weight decay", resume="match")
    warmup_epochs: float = option(5.0, "linear warm-up before the per-step cosine schedule, epochs", resume="match")
    mixed_precision: str | None = option(None, "no|bf16|fp16 (default: bf16 on a GPU unless accelerate launch asks for fp16 or bf16; fp32 on the CPU)", resume="match")
    channels_last: bool | None = option(None, "channels-last memory format (default: on for a GPU, off on the CPU)", resume="free")
    compile: bool = option(False, "torch.compile the training step: whole on one process; the encoders, projectors and objective on several", resume="free")
    compile_mode: str | None = option(None, f"torch.compile mode with --compile: {'|'.join(COMPILE_MODES)}", resume="free")
    seed: int = option(0, "random seed", resume="match")
    # --- evaluation, logging, checkpoints ---
    eval_every: int = option(10, "evaluate Recall@K every N epochs (and always after the last)", resume="free")
    eval_untrained: bool = option(False, "also evaluate the untrained network before the first step (a baseline)", resume="free")
    eval_batch_size: int = option(256, "images per process per evaluation batch", resume="free")
    log_every: int = option(10, "write a metrics row every N steps", resume="free")
    checkpoint_every: int = option(10, "checkpoint every N epochs (0: only on SIGTERM and at the end)", resume="free")
    keep_checkpoints: int = option(2, "newest checkpoints kept", resume="free")
    resume: str | None = option(None, "continue a run. Bare --resume: from the newest intact checkpoint in OUTPUT_DIR/checkpoints (an error when there is none); --resume auto: the same when there is one, else start afresh (for requeued jobs); --resume PATH: from a run folder or one checkpoint folder. Without it, an OUTPUT_DIR that holds another run's files is refused", resume="free", const="newest")
    accept_changes: str | None = option(None, "with --resume: comma-separated options allowed to differ from the checkpoint's run (e.g. epochs)", resume="free")
    dist_timeout: float = option(10.0, "minutes a process waits in a collective operation before the run fails", resume="free")
    output_dir: str | None = option(None, "where the run writes (default: a new folder under runs/)", resume="free")
    wandb: str = option("auto", "auto|online|offline|disabled (auto: online when logged in)", resume="free")
    wandb_project: str = option("maskcon", "W&B project", resume="free")
    run_name: str | None = option(None, "run name (default: DATASET-METHOD-TIME)", resume="free")
    max_steps: int | None = option(None, "stop after this many steps in all (smoke tests)", resume="free")
    config: str | None = option(None, "YAML file of options (command line wins)", resume="free")
    print_config: bool = option(False, "print the resolved configuration as YAML and exit", resume="free")
    check: bool = option(False, "check the run without training (options, shards, --resume checkpoint, W&B), print what it would do and exit", resume="free")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# A resumed run must match the checkpoint's run in these options, unless the user accepts the change by name
# (--accept-changes); it may change the others silently (maskcon.checkpoints reads both sets).
MUST_MATCH_ON_RESUME = frozenset(name for name, f in FIELDS.items() if f.metadata["resume"] == "match")
MAY_DIFFER_ON_RESUME = frozenset(FIELDS) - MUST_MATCH_ON_RESUME
# --help's groups, in order: every option in one of them.
SECTIONS = {
    "data and loader": ("dataset", "shards", "shard_cache", "shard_cache_limit", "image_size", "query_view", "key_view", "loader", "loader_threads"),
    "method": ("method", "w", "t", "t0", "queue_size", "key_momentum"),
    "network": ("arch", "pretrained", "proj_hidden", "proj_dim"),
    "optimisation and schedule": ("epochs", "batch_size", "global_batch", "lr", "lr_reference_batch", "scale_lr",
                                  "momentum", "weight_decay", "warmup_epochs", "mixed_precision", "channels_last",
                                  "compile", "compile_mode", "seed"),
    "evaluation, logging and checkpoints": ("eval_every", "eval_untrained", "eval_batch_size", "log_every",
                                            "checkpoint_every", "keep_checkpoints", "resume", "accept_changes",
                                            "output_dir", "wandb", "wandb_project", "run_name"),
    "the run": ("dist_timeout", "max_steps", "config", "print_config", "check"),
}
assert sorted(name for names in SECTIONS.values() for name in names) == sorted(FIELDS), "an option without a section"
# What config.yaml and --print-config record besides the options (maskcon.plan.Plan.resolved). Given back
# with --config they are accepted, and checked against the options they follow from, never taken as options.
RECORDED = ("num_processes", "base_lr", "provenance")
ACTIONS = ("print_config", "check")   # options that end a run before training: never recorded
# Options of one start of the run, not of the run: never recorded either, so that a config.yaml starts the same
# run anew (a resume is asked for on the command line).
NOT_RECORDED = (*ACTIONS, "resume", "accept_changes")


def _parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if str(text).lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


@functools.cache
def _type_hints() -> dict:
    return typing.get_type_hints(Config)


def _field_type(f: dataclasses.Field):
    kind = _type_hints()[f.name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    optional = len(args) == 1 and type(None) in typing.get_args(kind)
    base = args[0] if optional else kind
    return base, optional


def build_parser(defaults: dict | None = None) -> argparse.ArgumentParser:
    """The trainer's options. defaults: the values --help shows (the dataset's preset: `resolved_defaults`);
    the parser itself sets nothing it was not given (argument_default=SUPPRESS), so precedence stays in
    `parse_config`."""
    shown = {name: f.default for name, f in FIELDS.items()} | (defaults or {})
    parser = OneLineParser(
        prog="python launch/train.py",
        usage="%(prog)s [--dataset NAME] [--method NAME] [--OPTION VALUE ...]",
        description="Train MaskCon or a baseline on WebDataset shards. Options override the dataset's "
                    "preset and a --config YAML file; the defaults shown are those of --dataset (and --method) "
                    "when given with --help. Both --some-option and --some_option=value work; a true/false option "
                    "also takes --no-NAME. Several processes: "
                    "python launch/run.py --processes N [options].",
        argument_default=argparse.SUPPRESS,
    )
    for section, names in SECTIONS.items():
        group = parser.add_argument_group(section)
        for name in names:
            _add_option(group, name, shown[name])
    return parser


def _add_option(group, name: str, default) -> None:
    """--NAME-WITH-DASHES shown once with its one default; --name_with_underscores (the sweeps' spelling)
    and --no-NAME (a true/false option's false) accepted, not shown."""
    base, optional = _field_type(FIELDS[name])
    dashed, hidden = f"--{name.replace('_', '-')}", [f"--{name}"] if "_" in name else []
    text = FIELDS[name].metadata.get("help", "")
    if default is not None or "(default:" not in text:   # an option that is none by default may say what none means
        text += f" (default: {'none' if default is None else default})"
    if base is bool:
        options = dict(dest=name, nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        group.add_argument(dashed, help=text, **options)
        for flag in hidden:
            group.add_argument(flag, help=argparse.SUPPRESS, **options)
        group.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false", help=argparse.SUPPRESS)
        return
    options = dict(dest=name, type=_optional(base) if optional else base, metavar=name.upper())
    if "const" in FIELDS[name].metadata:   # e.g. a bare --resume
        options.update(nargs="?", const=FIELDS[name].metadata["const"])
    group.add_argument(dashed, help=text, **options)
    for flag in hidden:
        group.add_argument(flag, help=argparse.SUPPRESS, **options)


def resolved_defaults(argv: list[str]) -> dict:
    """The values a run of `argv` starts from before its own options: the dataclass defaults with the preset
    of the --dataset and --method found in argv (or in its --config file)."""
    scout = OneLineParser(add_help=False, argument_default=argparse.SUPPRESS)
    for name in ("dataset", "method", "config"):
        scout.add_argument(f"--{name}", dest=name)
    found = vars(scout.parse_known_args(argv)[0])
    from_yaml = _options(load_yaml(found["config"])) if found.get("config") else {}
    dataset = found.get("dataset", from_yaml.get("dataset", Config.dataset))
    method = found.get("method", from_yaml.get("method", Config.method))
    return {**{name: f.default for name, f in FIELDS.items()}, **preset(dataset, method), **from_yaml}


def _coerce(name: str, value):
    base, optional = _field_type(FIELDS[name])
    if value is None:
        if optional:
            return None
        raise UserError(f"option {name} cannot be empty")
    try:
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        return base(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise UserError(f"option {name}: cannot read {value!r} as {base.__name__}") from None


def load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FIELDS) - set(RECORDED))
    if unknown:
        raise UserError(f"config file {path}: unknown options {', '.join(unknown)} (see --help)")
    return {k: v if k in RECORDED else _coerce(k, v) for k, v in values.items()}


def _options(from_yaml: dict) -> dict:
    return {name: value for name, value in from_yaml.items() if name not in RECORDED}


def world_size() -> int:
    """Processes of this run: WORLD_SIZE, which `accelerate launch` (torchrun) sets in each process; 1 alone."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def parse_config(argv: list[str] | None = None, *, processes: int | None = None) -> Config:
    """Resolve defaults < dataset preset < YAML < command line into one validated Config, with the batch
    settled for `processes` (default: `world_size()`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(resolved_defaults(argv) if {"-h", "--help"} & set(argv) else None)
    cli = vars(parser.parse_args(argv))
    loaded = load_yaml(cli["config"]) if cli.get("config") else {}
    from_yaml, recorded = _options(loaded), {k: v for k, v in loaded.items() if k in RECORDED}
    if "num_processes" in recorded or "batch_size" in cli or "global_batch" in cli:
        _one_batch_option(from_yaml, cli)
    dataset = cli.get("dataset", from_yaml.get("dataset", Config.dataset))
    if from_yaml.get("dataset", dataset) != dataset:    # its other values are that dataset's recipe
        raise UserError(f"config file {cli['config']} is of a {from_yaml['dataset']} run: --dataset {dataset} would "
                        f"train {dataset} with its image size, epochs and bank; drop --dataset, or --config")
    method = cli.get("method", from_yaml.get("method", Config.method))
    values = preset(dataset, method)
    values.update(from_yaml)
    values.update(cli)
    config = Config(**values)
    validate(config)
    given = {**from_yaml, **cli}
    refuse_conflicts(config, given)
    processes = world_size() if processes is None else processes
    settle_batch(config, processes, batch_given="batch_size" in given)
    _check_recorded(config, recorded, processes, cli)
    return config


def _one_batch_option(from_yaml: dict, cli: dict) -> None:
    """A run's record holds the batch twice (per process and in all): the command line's batch option wins
    over the file's, and of the file's own two, the global batch (the recipe's) stands."""
    if "batch_size" in cli:
        from_yaml.pop("global_batch", None)
    elif "global_batch" in cli or "global_batch" in from_yaml:
        from_yaml.pop("batch_size", None)


def _check_recorded(config: Config, recorded: dict, processes: int, cli: dict) -> None:
    """A recorded base_lr must follow from the options it was derived from, unless the command line
    changes one of them (the run then has a new rate)."""
    inputs = {"lr", "lr_reference_batch", "scale_lr", "batch_size", "global_batch"}
    if "base_lr" not in recorded or recorded.get("num_processes") != processes or inputs & set(cli):
        return
    derived = base_learning_rate(config, processes)
    if not math.isclose(float(recorded["base_lr"]), derived, rel_tol=1e-9):
        raise UserError(f"config file {config.config}: base_lr {recorded['base_lr']} does not follow from its "
                        f"options (lr {config.lr} for a batch of {config.lr_reference_batch} gives {derived:g}); "
                        f"remove base_lr from the file or restore the option that was changed")


def base_learning_rate(config: Config, num_processes: int) -> float:
    """--lr for a global batch of --lr-reference-batch, scaled linearly to the real global batch
    (batch x processes) unless --no-scale-lr."""
    global_batch = config.batch_size * num_processes
    return config.lr * (global_batch / config.lr_reference_batch if config.scale_lr else 1.0)


def refuse_conflicts(config: Config, given: dict) -> None:
    """One line for options that contradict each other; `given`: the options set by YAML or command line."""
    if config.accept_changes and not config.resume:
        raise UserError("--accept-changes only applies with --resume; add --resume or drop --accept-changes")
    if config.compile_mode is not None and not config.compile:
        raise UserError("--compile-mode only applies with --compile; add --compile or drop --compile-mode")
    if "global_batch" in given and "batch_size" in given and config.global_batch is not None:
        raise UserError("--global-batch and --batch-size both set the batch; give one of them")
    if config.check and config.print_config:
        raise UserError("--check and --print-config both end the run before training; give one of them")


def settle_batch(config: Config, processes: int, *, batch_given: bool) -> None:
    """Fill in --batch-size (per process) and --global-batch (all processes) for `processes` processes.

    --global-batch given: it is split evenly (refused when it does not divide). Otherwise the global batch is
    --batch-size x processes. Under a W&B sweep agent (WANDB_SWEEP_ID) on several processes without
    --global-batch the run is refused: it would train another batch, and lr, than the recipe's."""
    if config.global_batch is not None:
        if config.global_batch < 1 or config.global_batch % processes:
            raise UserError(f"--global-batch {config.global_batch} does not split evenly over {processes} "
                            f"process(es); pass a multiple of {processes} or start another number of processes")
        config.batch_size = config.global_batch // processes
        return
    if processes > 1 and os.environ.get("WANDB_SWEEP_ID") and not batch_given:
        raise UserError(f"this sweep run on {processes} processes would train a global batch of "
                        f"{config.batch_size * processes}, not the recipe's {config.batch_size}; add "
                        f"global_batch to the sweep's parameters")
    config.global_batch = config.batch_size * processes


def preset(dataset: str, method: str) -> dict:
    """The options a dataset's description sets (maskcon/datasets), with the w the supplement fixes for a
    baseline on that dataset (maskcon/methods.py)."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    description = DATASETS[dataset]
    values = {"image_size": description.image_size, "pretrained": description.pretrained, **description.preset}
    if method in METHODS and dataset in METHODS[method].fixed_w:
        values["w"] = METHODS[method].fixed_w[dataset]
    return values


def validate(config: Config) -> None:
    """Reject impossible options with one line each."""
    if config.dataset not in DATASETS:
        raise UserError(f"unknown dataset {config.dataset!r}; known datasets: {', '.join(DATASETS)}")
    check_location(config.shards)
    check_location(config.shard_cache)
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}; known methods: {', '.join(METHODS)}")
    if config.arch not in ARCHS:
        raise UserError(f"unknown arch {config.arch!r}; known: {', '.join(ARCHS)}")
    if not 0.0 <= config.w <= 1.0:
        raise UserError(f"--w must lie in [0, 1], got {config.w}")
    for name in ("t", "t0"):
        if not 0 < getattr(config, name) < math.inf:
            raise UserError(f"temperature --{name} must be a positive number, got {getattr(config, name)}")
    for name in ("query_view", "key_view"):
        if getattr(config, name) not in VIEWS:
            raise UserError(f"--{name.replace('_', '-')} must be {' or '.join(VIEWS)}, got {getattr(config, name)!r}")
    if config.loader not in BACKENDS:
        raise UserError(f"--loader must be {' or '.join(BACKENDS)}, got {config.loader!r}")
    if config.wandb not in ("auto", "online", "offline", "disabled"):
        raise UserError(f"--wandb must be auto, online, offline or disabled, got {config.wandb!r}")
    if config.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise UserError(f"--mixed-precision must be no, bf16 or fp16, got {config.mixed_precision!r}")
    if not MIN_IMAGE_SIZE <= config.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px (the encoder halves the side "
                        f"three times; the paper's largest is 224), got {config.image_size}")
    positive = ("epochs", "batch_size", "queue_size", "eval_every", "eval_batch_size",
                "log_every", "keep_checkpoints", "lr_reference_batch", "proj_hidden", "proj_dim")
    for name in positive:
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if config.loader_threads is not None and config.loader_threads < 1:
        raise UserError(f"--loader-threads must be at least 1, got {config.loader_threads}")
    if config.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every must be >= 0, got {config.checkpoint_every}")
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "dist_timeout"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(config, name)}")
    if config.lr <= 0:
        raise UserError(f"--lr must be > 0, got {config.lr}")
    if not 0.0 <= config.momentum < 1.0:
        raise UserError(f"--momentum must lie in [0, 1), got {config.momentum}")
    if config.weight_decay < 0 or config.warmup_epochs < 0:
        name = "weight_decay" if config.weight_decay < 0 else "warmup_epochs"
        raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}")
    if not 0 <= config.seed < 2**32:
        raise UserError(f"--seed must lie in 0 to 2**32 - 1, got {config.seed}")
    if not 0.0 <= config.key_momentum < 1.0:
        raise UserError(f"--key-momentum must lie in [0, 1), got {config.key_momentum}")
    if config.compile_mode not in (None, *COMPILE_MODES):
        raise UserError(f"--compile-mode must be {', '.join(COMPILE_MODES[:-1])} or {COMPILE_MODES[-1]}, got "
                        f"{config.compile_mode!r}")
    if not config.dist_timeout > 0:
        raise UserError(f"--dist-timeout must be > 0 minutes, got {config.dist_timeout}")
    if isinstance(config.resume, bool) or str(config.resume).lower() in ("true", "false", ""):
        # YAML's `resume: true` (and sweeps' --resume=true) mean a bare --resume; false and empty, none
        config.resume = "newest" if str(config.resume).lower() == "true" else None
    from maskcon.remote import parse_size

    parse_size(config.shard_cache_limit)
    if config.max_steps is not None and config.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {config.max_steps}")


def default_shards_dir(dataset: str) -> Path:
    """Where shards are written and read unless told otherwise: shards/DATASET under the current folder."""
    return Path("shards") / dataset


def shards_dir(config: Config) -> Path:
    """The local shard folder of a run (for a remote --shards URL: its staged copy, maskcon.remote.stage)."""
    return Path(config.shards) if config.shards else default_shards_dir(config.dataset)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
