"""The learner: a query encoder with projector, its momentum copy, and a labelled memory bank (MoCo-style).

The model only computes tensors; the losses live in `maskcon/losses.py` and the order of operations
(forward, keys, loss, step, momentum update, enqueue) in the training loop. Forward goes through the
DDP/Accelerate wrapper; every other method is called on the unwrapped model.
"""

import copy
import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskcon import dist
from maskcon.errors import UserError

# pooled feature width F of each backbone (torchvision ResNets without their fc layer)
FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
SMALL_IMAGE_SIZE = 64   # px; at or below it the stem is a 3x3 stride-1 conv without max-pool (official code)
MIN_IMAGE_SIZE = 8      # px; the small stem's encoder halves the side three times: below 8 its last stage sees padding
MAX_IMAGE_SIZE = 1024   # px; the paper's largest input is 224, and one 1024-px view of a batch of 128 is 1.6 GB


class MaskConModel(nn.Module):
    """Query encoder + projector (+ coarse classifier for CoIns), momentum key encoder, memory bank.

    arch: "resnet18" | "resnet34" | "resnet50"; image_size: input side in px; proj_hidden, proj_dim: widths
    of the projector Linear(F, 512)-ReLU-Linear(512, 128) (supplement, section A); num_coarse: number of
    coarse classes of the linear classifier, None for no classifier (only CoIns uses it, so DDP sees no
    unused parameters otherwise); queue_size: K, bank entries (8,192 in the paper); momentum: m of the
    key encoder update k <- m k + (1 - m) q (0.99); pretrained: None, "imagenet" (torchvision's ImageNet
    weights) or the path of a local torchvision ResNet weights file.
    """

    def __init__(self, *, arch: str = "resnet18", image_size: int, proj_hidden: int = 512, proj_dim: int = 128,
                 num_coarse: int | None = None, queue_size: int = 8192, momentum: float = 0.99,
                 pretrained: str | None = None):
        super().__init__()
        if arch not in FEATURE_DIMS:
            raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(FEATURE_DIMS)}")
        feature_dim = FEATURE_DIMS[arch]
        self.momentum = momentum
        self.encoder = _backbone(arch, image_size, pretrained)                 # N x 3 x S x S -> N x F
        self.projector = nn.Sequential(nn.Linear(feature_dim, proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(proj_hidden, proj_dim))        # N x F -> N x D
        self.classifier = nn.Linear(feature_dim, num_coarse) if num_coarse is not None else None
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_projector = copy.deepcopy(self.projector)
        for parameter in [*self.key_encoder.parameters(), *self.key_projector.parameters()]:
            parameter.requires_grad_(False)

        # Memory bank: K x D keys with their labels; -1 marks an entry that holds no sample yet (it matches
        # no class). The random start is drawn from a fixed seed, so every process starts from the same bank.
        start = torch.randn(queue_size, proj_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("queue", F.normalize(start, dim=1))                        # K x D
        self.register_buffer("queue_coarse", torch.full((queue_size,), -1, dtype=torch.long))   # K
        self.register_buffer("queue_fine", torch.full((queue_size,), -1, dtype=torch.long))     # K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))             # next slot to write

    def forward(self, query: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Query branch, with gradients. query: N x 3 x S x S.

        Returns {"q": N x D L2-normalised projections (fp32), "logits_coarse": N x C, or None without a
        classifier}.
        """
        features = self.encoder(query)                                          # N x F
        q = F.normalize(self.projector(features).float(), dim=1)               # N x D
        logits_coarse = self.classifier(features) if self.classifier is not None else None
        return {"q": q, "logits_coarse": logits_coarse}

    @torch.no_grad()
    def encode_keys(self, key: torch.Tensor, shuffle_seed: int) -> torch.Tensor:
        """Key branch: key (N x 3 x S x S) -> N x D L2-normalised fp32 keys of the momentum encoder.

        The batch is shuffled across processes around the key encoder (shuffle-BN, MoCo), so batch norm
        cannot use statistics that give away which key belongs to which query; identity on one process.
        shuffle_seed: the permutation's seed, the same on every process (`dist.batch_shuffle`).
        Under autocast the images travel in its dtype (bf16, fp16), the precision the first conv casts them
        to anyway.
        """
        if torch.is_autocast_enabled(key.device.type):
            key = key.to(torch.get_autocast_dtype(key.device.type))
        shuffled, idx_unshuffle = dist.batch_shuffle(key, shuffle_seed)
        k = F.normalize(self.key_projector(self.key_encoder(shuffled)).float(), dim=1)   # N x D
        return dist.batch_unshuffle(k, idx_unshuffle)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query for every parameter of the encoder and projector, as one
        multi-tensor operation."""
        query_parameters = [*self.encoder.parameters(), *self.projector.parameters()]
        key_parameters = [*self.key_encoder.parameters(), *self.key_projector.parameters()]
        torch._foreach_lerp_(key_parameters, query_parameters, 1.0 - self.momentum)

    def compile_encoders(self, mode: str | None = None, backend: str = "inductor") -> None:
        """torch.compile both encoders and projectors in place (parameter names unchanged, so checkpoints
        and DDP see the same module); mode applies to the inductor backend only."""
        options = {"mode": mode} if backend == "inductor" else {}
        for module in (self.encoder, self.projector, self.key_encoder, self.key_projector):
            module.compile(backend=backend, **options)

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor) -> None:
        """Write the keys (N x D) and labels ((N,) int64 each) of all processes into the bank.

        The keys and labels of every process are gathered first (rank order) in one all-gather of
        N x (D + 2) fp32 (labels are exact in fp32 up to 2^24 classes), so every process holds the same bank.
        The write starts at queue_ptr and wraps around K, so K need not be a multiple of the global batch;
        a global batch larger than K keeps its last K entries.
        """
        packed = torch.cat([k.float(), coarse[:, None].float(), fine[:, None].float()], dim=1)   # N x (D+2)
        packed = dist.concat_all_gather(packed)                                                # P*N x (D+2)
        k, coarse, fine = packed[:, :-2], packed[:, -2].long(), packed[:, -1].long()
        size, queue_size = k.shape[0], self.queue.shape[0]
        dropped = max(size - queue_size, 0)
        slots = (self.queue_ptr + dropped + torch.arange(size - dropped, device=k.device)) % queue_size
        self.queue.index_copy_(0, slots, k[dropped:].to(self.queue))
        self.queue_coarse.index_copy_(0, slots, coarse[dropped:].to(self.queue_coarse))
        self.queue_fine.index_copy_(0, slots, fine[dropped:].to(self.queue_fine))
        self.queue_ptr.add_(size).remainder_(queue_size)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """N x F pooled fp32 backbone features of the query encoder for evaluation (run in eval mode)."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            return self.encoder(x).float()
        finally:
            self.encoder.train(was_training)


def _backbone(arch: str, image_size: int, pretrained: str | None) -> nn.Module:
    """torchvision ResNet without its fc layer: N x 3 x S x S -> N x F pooled features.

    For S <= 64 px the 7x7 stride-2 stem and the max-pool become a 3x3 stride-1 conv and identity (official
    code); pretrained weights then load into everything but conv1.
    """
    import torchvision   # imported here: it costs a second that --help need not pay

    net = getattr(torchvision.models, arch)(weights=None)
    small = image_size <= SMALL_IMAGE_SIZE
    if small:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    if pretrained is not None:
        state = _pretrained_state(arch, pretrained)
        skipped = ("fc.", "conv1.") if small else ("fc.",)
        state = {name: value for name, value in state.items() if not name.startswith(skipped)}
        expected = {name: value.shape for name, value in net.state_dict().items() if not name.startswith(skipped)}
        found = {name: getattr(value, "shape", None) for name, value in state.items()}
        misfits = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
        if misfits:
            raise UserError(f"pretrained weights {pretrained!r} do not fit {arch} ({len(misfits)} tensors "
                            f"missing, extra or of another shape, e.g. {misfits[0]}); pass torchvision's {arch} "
                            f"ImageNet weights")
        net.load_state_dict(state, strict=False)
    return net


def check_pretrained_reachable(arch: str) -> None:
    """UserError (one line) unless torchvision's ImageNet weights of `arch` are in the torch hub cache or
    their download address answers (a HEAD request; nothing is downloaded)."""
    import torchvision   # imported here: it costs a second that --help need not pay

    import urllib.error
    import urllib.request

    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    if (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file():
        return
    try:
        urllib.request.urlopen(urllib.request.Request(weights.url, method="HEAD"), timeout=15).close()
    except (OSError, urllib.error.URLError) as error:
        raise _unreachable(arch, weights.url, error) from None


def _unreachable(arch: str, url: str, error: BaseException) -> UserError:
    """The one line for torchvision's ImageNet weights that cannot be downloaded: --check and the run say it alike."""
    reason = (str(getattr(error, "reason", error)).splitlines() or [""])[0] or type(error).__name__
    return UserError(f"cannot download torchvision's {arch} ImageNet weights ({reason}); fetch {url} elsewhere and "
                     f"pass the file with --pretrained PATH, or start from random weights with --pretrained none")


def fetch_pretrained(arch: str, pretrained: str) -> None:
    """Make `pretrained` available before the learner is built: download torchvision's weights into the torch
    hub cache ("imagenet"), or check a local weights file; UserError (one line) when neither works."""
    _pretrained_state(arch, pretrained)


def _pretrained_state(arch: str, pretrained: str) -> dict[str, torch.Tensor]:
    """State dict of torchvision's ImageNet weights ("imagenet", downloaded once to the torch hub cache) or
    of a local weights file (a torchvision ResNet state dict saved with torch.save)."""
    import torchvision   # imported here: it costs a second that --help need not pay

    if pretrained == "imagenet":
        weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1     # the official code's weights
        try:
            return weights.get_state_dict(progress=False)
        except (OSError, RuntimeError) as error:
            raise _unreachable(arch, weights.url, error) from None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise UserError(f"pretrained weights file {str(path)!r} not found; pass 'imagenet' or the path of "
                        f"torchvision's {arch} weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"cannot read pretrained weights {str(path)!r} ({type(error).__name__}); pass a "
                        f"torchvision {arch} state dict saved with torch.save") from None
    if not isinstance(state, dict):
        raise UserError(f"pretrained weights {str(path)!r} hold a {type(state).__name__}, not a state dict; "
                        f"pass a torchvision {arch} state dict saved with torch.save")
    return state
