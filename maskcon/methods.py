"""The methods of the paper, one object each: objective, bank labels, head, hyperparameters.

A method is what the training step, the configuration, the sweeps and the tests read; adding one means one
`Method` here (and its objective in `maskcon/losses.py`). Every objective scores the same contrastive logits
softmax([q.k, q.queue] / t0) and differs in its target (see `maskcon/losses.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from maskcon import losses
from maskcon.errors import UserError


@dataclass(frozen=True)
class Method:
    """name: the --method value; summary: one line for --help and the docs;
    labels: which labels the objective reads, of the batch and of the memory bank ("coarse", "fine" or None);
    classifier: whether the learner needs the linear coarse classifier (CoIns);
    uses_w, uses_t: whether --w and --t change the objective;
    fixed_w: the w the supplement gives this baseline per dataset (Table 1; CIFAR: the best w of Tables 4 and 6),
    which replaces MaskCon's
    preset w on that dataset; objective: (q, k, queue, queue_labels, labels, logits_coarse, t0, t, w) -> loss.
    """

    name: str
    summary: str
    labels: str | None
    classifier: bool
    uses_w: bool
    uses_t: bool
    objective: Callable[..., torch.Tensor]
    fixed_w: dict[str, float] = field(default_factory=dict)

    def reads(self, option: str) -> bool:
        """Whether the objective reads --w or --t ("w", "t")."""
        return {"w": self.uses_w, "t": self.uses_t}[option]

    def loss(self, *, q: torch.Tensor, k: torch.Tensor, logits_coarse: torch.Tensor | None, bank,
             coarse: torch.Tensor, fine: torch.Tensor, t0: float, t: float, w: float) -> torch.Tensor:
        """The objective of one batch. q, k: N x D projections; bank: the learner (queue, queue_coarse,
        queue_fine), read BEFORE this batch's keys enter it; coarse, fine: (N,) int64 labels of the batch."""
        labels = {"coarse": coarse, "fine": fine, None: None}[self.labels]
        queue_labels = {"coarse": bank.queue_coarse, "fine": bank.queue_fine, None: None}[self.labels]
        return self.objective(q=q, k=k, queue=bank.queue, queue_labels=queue_labels, labels=labels,
                              logits_coarse=logits_coarse, t0=t0, t=t, w=w)


def _selfcon(*, q, k, queue, queue_labels, labels, logits_coarse, t0, t, w):
    return losses.selfcon_loss(q=q, k=k, queue=queue, t0=t0)


def _maskcon(*, q, k, queue, queue_labels, labels, logits_coarse, t0, t, w):
    return losses.maskcon_loss(q=q, k=k, queue=queue, queue_coarse=queue_labels, coarse=labels, t0=t0, t=t, w=w)


def _grafit(*, q, k, queue, queue_labels, labels, logits_coarse, t0, t, w):
    return losses.grafit_loss(q=q, k=k, queue=queue, queue_coarse=queue_labels, coarse=labels, t0=t0, w=w)


def _supfine(*, q, k, queue, queue_labels, labels, logits_coarse, t0, t, w):
    return losses.supfine_loss(q=q, k=k, queue=queue, queue_fine=queue_labels, fine=labels, t0=t0)


def _coins(*, q, k, queue, queue_labels, labels, logits_coarse, t0, t, w):
    return losses.coins_loss(q=q, k=k, queue=queue, logits_coarse=logits_coarse, coarse=labels, t0=t0, w=w)


METHODS: dict[str, Method] = {method.name: method for method in (
    Method("maskcon", "MaskCon: soft targets from key-to-bank similarities masked to the coarse class",
           labels="coarse", classifier=False, uses_w=True, uses_t=True, objective=_maskcon),
    Method("grafit", "Grafit: every same-coarse bank entry a positive, equal weights",
           labels="coarse", classifier=False, uses_w=True, uses_t=False, objective=_grafit,
           fixed_w={"cifar100": 0.8, "cifartoy_good": 0.5, "cifartoy_bad": 0.8, "sop_split1": 0.8,
                    "sop_split2": 0.8, "cars196": 1.0}),
    Method("coins", "CoIns: w x coarse classification + (1 - w) x SelfCon",
           labels="coarse", classifier=True, uses_w=True, uses_t=False, objective=_coins,
           fixed_w={"cifar100": 0.5, "cifartoy_good": 0.8, "cifartoy_bad": 0.8, "sop_split1": 0.5,
                    "sop_split2": 0.2, "cars196": 1.0}),
    Method("supfine", "SupFINE: Grafit's target with the fine labels (upper bound)",
           labels="fine", classifier=False, uses_w=False, uses_t=False, objective=_supfine),
    Method("selfcon", "SelfCon: MoCo's InfoNCE, no labels",
           labels=None, classifier=False, uses_w=False, uses_t=False, objective=_selfcon),
)}


def method_for(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]
