"""The five objectives of the paper as pure functions of tensors (public API).

Every function takes keyword arguments only and returns the mean loss over the batch (a 0-d fp32 tensor).
Shared inputs:
    q:     N x D  L2-normalised query projections (carries the gradient)
    k:     N x D  L2-normalised key projections of the same images under another view (momentum encoder)
    queue: K x D  L2-normalised memory bank of keys from earlier batches
    t0:    temperature of the contrastive logits, tau_0 = 0.1 in the paper (supplement, section A)
Labels are int64; bank entries that hold no sample yet carry the label -1, which matches no class.

All objectives score the same logits, softmax([q.k, q.queue] / t0) over K + 1 entries (column 0 is the own
key), and differ only in the target distribution over those entries:
    selfcon  one-hot on the own key (MoCo's InfoNCE)
    grafit   w * (own key and every same-coarse bank entry, equal weights) + (1 - w) * one-hot
    supfine  Grafit's target with fine labels and w = 1
    maskcon  w * (own key = 1, same-coarse bank entries weighted by softmax(k.queue / t) rescaled so that
             the largest is 1, normalised) + (1 - w) * one-hot
    coins    no new target: w * cross-entropy of a coarse classifier + (1 - w) * selfcon
The gradient reaches q (and `logits_coarse` for CoIns) only: k, the bank and the targets are constants.
Logits and softmax are computed in fp32, also under autocast (a temperature of 0.05 turns the ~4e-3 error of
bf16 similarities into ~0.1 error in the logits).
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def selfcon_loss(*, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t0: float) -> torch.Tensor:
    """SelfCon: MoCo's InfoNCE, cross-entropy of softmax([q.k, q.queue] / t0) with the own key.

    q, k: N x D, queue: K x D, all L2-normalised; t0: temperature. Source: MoCo (He et al., CVPR 2020),
    the self-supervised baseline of MaskCon (Feng & Patras, CVPR 2023).
    """
    with _fp32(q):
        q_scaled = q.float() / t0                                   # N x D, cheaper than scaling N x K
        l_pos = (q_scaled * k.detach().float()).sum(dim=1)          # N
        l_neg = q_scaled @ queue.detach().float().T                 # N x K
        logits = torch.cat([l_pos[:, None], l_neg], dim=1)          # N x (1+K), column 0 the own key
        own_key = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, own_key)


def maskcon_loss(*, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, queue_coarse: torch.Tensor,
                 coarse: torch.Tensor, t0: float, t: float, w: float) -> torch.Tensor:
    """MaskCon: cross-entropy of softmax([q.k, q.queue] / t0) with the masked soft target.

    q, k: N x D, queue: K x D (L2-normalised); queue_coarse: (K,) and coarse: (N,) int64 coarse labels;
    t0: logit temperature (0.1); t: temperature of the key-to-bank similarities that weigh the same-coarse
    entries (0.05 or 0.1, supplement Table 1); w in [0, 1]: weight of the soft target against the one-hot
    target of SelfCon (w = 0 gives SelfCon).
    Target per sample: over the bank entries of the sample's own coarse class, softmax(k.queue / t), other
    entries 0; rescaled so its largest entry is 1; the own key gets 1; normalised to sum 1; mixed as
    w * that + (1 - w) * one-hot(own key). A sample whose coarse class has no entry in the bank gets the
    one-hot target. Source: Feng & Patras, "Masked Contrastive Learning for Coarse-Labelled Dataset",
    CVPR 2023, and its official code (models/model.py, MaskCon.forward), whose softmax-then-rescale equals
    exp((s - max s) / t) over the same-class similarities s = k.queue, the form computed here.

    Two equal computations of the target, chosen by `_dense_form`: on a GPU (and under torch.compile) the
    mask is an N x K boolean matrix and the masked softmax one whole-batch kernel, with static shapes and no
    host synchronisation; on the CPU the similarities are computed one coarse class at a time, between the
    keys and the bank entries of that class only, about N x K / C products for C balanced classes. Either way
    the target enters the cross-entropy as its expected bank key (see `_SoftTargetCrossEntropy`), so no
    N x K target is formed.
    """
    with _fp32(q):
        k, queue = k.detach().float(), queue.detach().float()
        with torch.no_grad():
            if _dense_form(q):
                bank_share, target_keys = _maskcon_target_dense(k, queue, queue_coarse, coarse, t, w)
            else:
                bank_share, target_keys = _maskcon_target_grouped(k, queue, queue_coarse, coarse, t, w)
        return _SoftTargetCrossEntropy.apply(q.float(), k, queue, t0, 1.0 - bank_share, target_keys)


def _maskcon_target_dense(k, queue, queue_coarse, coarse, t: float, w: float):
    """(bank share of the target (N,), expected bank key N x D) with an N x K mask: GPU form."""
    same = coarse[:, None] == queue_coarse[None, :]                     # N x K
    logits = ((k / t) @ queue.T).masked_fill(~same, float("-inf"))    # N x K, other classes excluded
    # a row without same-class entries is all -inf: its softmax is NaN, zeroed (the one-hot target)
    soft = torch.softmax(logits, dim=1).nan_to_num(0.0)                 # N x K
    # rescaled so the largest entry is 1, own key 1, normalised: soft / (1 + max soft) (see below)
    top = soft.amax(dim=1)                                              # N, 0 without same-class entries
    share = torch.where(top > 0, w / (1.0 + top), 0.0)                  # N
    return share, (soft @ queue).mul_(share[:, None])


def _maskcon_target_grouped(k, queue, queue_coarse, coarse, t: float, w: float):
    """(bank share of the target (N,), expected bank key N x D), one coarse class at a time: CPU form."""
    bank_share = k.new_zeros(k.shape[0])                                # N, the bank's share of the target
    target_keys = torch.zeros_like(k)                                   # N x D, sum_j target_ij queue_j
    for rows, entries in _same_class_blocks(coarse, queue_coarse):
        bank = queue[entries]                                           # K_c x D, the class's bank entries
        soft = torch.softmax((k[rows] / t) @ bank.T, dim=1)             # n_c x K_c
        # Rescaled so that its largest entry is 1: e = exp(s - max s); with the own key at 1 and
        # normalised: e / (1 + sum e) = soft / (1 + max soft), since max soft = 1 / sum e.
        share = w / (1.0 + soft.amax(dim=1))                            # n_c
        target_keys[rows] = (soft @ bank).mul_(share[:, None])
        bank_share[rows] = share
    return bank_share, target_keys


def grafit_loss(*, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, queue_coarse: torch.Tensor,
                coarse: torch.Tensor, t0: float, w: float) -> torch.Tensor:
    """Grafit: the own key and every same-coarse bank entry as positives, with equal weights.

    q, k: N x D, queue: K x D (L2-normalised); queue_coarse: (K,), coarse: (N,) int64; t0: logit temperature;
    w in [0, 1]: weight of the coarse target against SelfCon's one-hot target.
    Target: w * (1 on the own key and on each bank entry of the sample's coarse class, normalised) +
    (1 - w) * one-hot(own key). Source: Touvron et al., "Grafit", ICCV 2021, in the memory-bank form of the
    MaskCon official code (models/model.py, MaskCon.forward_explicit, mode 'grafit').
    The equal weights make the target's expected bank key a per-class sum of the bank: O(K x D) work on the
    CPU; on a GPU (and under torch.compile) an N x K mask times the bank, with static shapes and no host sync.
    """
    with _fp32(q):
        k, queue = k.detach().float(), queue.detach().float()
        with torch.no_grad():
            if _dense_form(q):
                same = (coarse[:, None] == queue_coarse[None, :]).float()      # N x K
                count = same.sum(dim=1)                                         # N, same-class entries
                class_sums = same @ queue                                       # N x D
            else:
                classes, entry_class = torch.unique(queue_coarse, return_inverse=True)   # sorted bank labels
                per_class = queue.new_zeros(len(classes), queue.shape[1]).index_add_(0, entry_class, queue)
                class_count = torch.bincount(entry_class, minlength=len(classes)).to(queue.dtype)
                slot = torch.searchsorted(classes, coarse).clamp_(max=len(classes) - 1)  # N
                count = torch.where(classes[slot] == coarse, class_count[slot], 0.0)      # N
                class_sums = per_class[slot] * (count > 0)[:, None]                       # N x D
            weight = w / (1.0 + count)                                  # N, each positive's share of w
            target_keys = class_sums.mul_(weight[:, None])              # N x D
            target_pos = 1.0 - weight * count                           # N, own key: weight + (1 - w)
        return _SoftTargetCrossEntropy.apply(q.float(), k, queue, t0, target_pos, target_keys)


def supfine_loss(*, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, queue_fine: torch.Tensor,
                 fine: torch.Tensor, t0: float) -> torch.Tensor:
    """SupFINE: Grafit's target with the fine labels and w = 1 (the fully supervised upper bound).

    q, k: N x D, queue: K x D (L2-normalised); queue_fine: (K,), fine: (N,) int64 fine labels;
    t0: logit temperature. Source: the SupFINE baseline of MaskCon (Feng & Patras, CVPR 2023).
    """
    return grafit_loss(q=q, k=k, queue=queue, queue_coarse=queue_fine, coarse=fine, t0=t0, w=1.0)


def coins_loss(*, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, logits_coarse: torch.Tensor,
               coarse: torch.Tensor, t0: float, w: float) -> torch.Tensor:
    """CoIns: w * cross-entropy(logits_coarse, coarse) + (1 - w) * SelfCon.

    q, k: N x D, queue: K x D (L2-normalised); logits_coarse: N x C outputs of the linear coarse classifier;
    coarse: (N,) int64; t0: logit temperature; w in [0, 1]: weight of the classification term.
    Source: Xu et al., "Weakly supervised representation learning with coarse labels", ICCV 2021, in the form
    of the MaskCon official code (models/model.py, MaskCon.forward_explicit, mode 'coins').
    """
    with _fp32(q):
        classification = F.cross_entropy(logits_coarse.float(), coarse)
        return w * classification + (1.0 - w) * selfcon_loss(q=q, k=k, queue=queue, t0=t0)


def _dense_form(q: torch.Tensor) -> bool:
    """Whether the targets use the whole-batch N x K form: on accelerators, where a data-dependent loop costs
    kernel launches and host synchronisations, and under torch.compile, which needs static shapes."""
    return q.device.type != "cpu" or torch.compiler.is_compiling()


def _fp32(q: torch.Tensor) -> torch.autocast:
    """Context in which matmuls and softmax stay in fp32 even inside an autocast region."""
    return torch.autocast(device_type=q.device.type, enabled=False)


def _same_class_blocks(labels: torch.Tensor, bank_labels: torch.Tensor):
    """Yields (rows, entries) per class of `labels` that has bank entries: the indices of its samples and of
    its bank entries. One host synchronisation per call (the block sizes)."""
    classes, counts = torch.unique(labels, return_counts=True)          # sorted
    bank_order = torch.argsort(bank_labels)
    bank_sorted = bank_labels[bank_order]
    bounds = torch.stack([counts, torch.searchsorted(bank_sorted, classes),
                          torch.searchsorted(bank_sorted, classes, right=True)]).tolist()
    rows_by_class = torch.argsort(labels, stable=True).split(bounds[0])
    for rows, start, end in zip(rows_by_class, bounds[1], bounds[2]):
        if end > start:
            yield rows, bank_order[start:end]


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax([q.k, q.queue] / t0) with a soft target; the gradient flows to q only.

    The target is given by its own-key weight target_pos (N,) and its expected bank key
    target_keys = sum_j target_ij queue_j (N x D): the target's part of the loss is
    q.(target_pos k + target_keys) / t0 and of the gradient (target_pos k + target_keys) / t0, so the N x K
    bank target never has to exist. The N x (1+K) logits are never concatenated either: the bank columns go
    through one fused softmax, the own-key column is folded in through the log-partition functions, and the
    bank probabilities are kept for the backward pass, which is one N x K by K x D product, as in SelfCon.
    """

    @staticmethod
    def forward(ctx, q, k, queue, t0, target_pos, target_keys):
        q_scaled = q / t0                                           # N x D
        l_pos = (q_scaled * k).sum(dim=1)                           # N
        l_neg = q_scaled @ queue.T                                  # N x K
        target_dot_logits = (q_scaled * torch.addcmul(target_keys, target_pos[:, None], k)).sum(dim=1)   # N
        prob_neg = torch.softmax(l_neg, dim=1)                      # N x K, over the bank columns alone
        # log-partition of the bank columns: the softmax's largest entry is 1 / sum exp(l - max l)
        log_partition_neg = l_neg.amax(dim=1) - prob_neg.amax(dim=1).log()     # N
        log_partition = torch.logaddexp(l_pos, log_partition_neg)                # N, over all 1 + K
        ctx.t0 = t0
        ctx.save_for_backward(k, queue, target_pos, target_keys, l_pos, prob_neg,
                              log_partition_neg, log_partition)
        return (log_partition - target_dot_logits).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        k, queue, target_pos, target_keys, l_pos, prob_neg, log_partition_neg, log_partition = ctx.saved_tensors
        with torch.autocast(device_type=grad_loss.device.type, enabled=False):
            # d loss / d q_i = sum_j (softmax - target)_ij [k_i, queue_j] / (N t0): N x D
            prob_pos = (l_pos - log_partition).exp()                # N, softmax of the own-key column
            bank_share = (log_partition_neg - log_partition).exp()  # N, softmax mass of the bank columns
            grad_q = (prob_neg @ queue).mul_(bank_share[:, None])   # expected bank key under the softmax
            grad_q.addcmul_((prob_pos - target_pos)[:, None], k).sub_(target_keys)
            grad_q.mul_(grad_loss / (k.shape[0] * ctx.t0))
        return grad_q, None, None, None, None, None
