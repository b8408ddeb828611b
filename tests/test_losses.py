"""The five objectives: hand-computed values, the special cases that define MaskCon, gradients, precision."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from maskcon import losses
from maskcon.bench import objectives

# One sample (D = 2) against a bank of three entries; the labels make entries 0 and 1 the sample's class.
Q = torch.tensor([[1.0, 0.0]])
K_ = torch.tensor([[0.6, 0.8]])
QUEUE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
QUEUE_COARSE = torch.tensor([0, 0, 1])
COARSE = torch.tensor([0])
T0 = 0.5
# logits [q.k, q.queue] / t0 = [0.6, 1, 0, -1] / 0.5
LOGITS = [1.2, 2.0, 0.0, -2.0]


def cross_entropy(target: list[float]) -> float:
    log_partition = math.log(sum(math.exp(logit) for logit in LOGITS))
    return log_partition - sum(p * logit for p, logit in zip(target, LOGITS))


def mix(soft: list[float], w: float) -> list[float]:
    total = sum(soft)
    return [w * p / total + (1 - w) * (i == 0) for i, p in enumerate(soft)]


def random_inputs(n=6, bank=40, dim=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, dim, generator=generator), dim=1).requires_grad_()
    k = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    queue = F.normalize(torch.randn(bank, dim, generator=generator), dim=1)
    queue_coarse = torch.randint(-1, classes, (bank,), generator=generator)   # -1: empty entries
    coarse = torch.randint(0, classes, (n,), generator=generator)
    return q, k, queue, queue_coarse, coarse


def value_and_grad(loss_fn, q, **inputs):
    q = q.detach().requires_grad_()
    loss = loss_fn(q=q, **inputs)
    loss.backward()
    return loss.detach(), q.grad


def dense_reference(q, k, queue, target, t0=0.1):
    """Mean cross-entropy of softmax([q.k, q.queue] / t0) with a dense N x (1+K) target, and its gradient."""
    q = q.detach().requires_grad_()
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / t0
    loss = -(F.log_softmax(logits, dim=1) * target).sum(dim=1).mean()
    loss.backward()
    return loss.detach(), q.grad


def compiled(loss_fn):
    """The objective as torch.compile traces it as one graph (fullgraph: a graph break is an error); it then
    takes the whole-batch N x K form that CUDA uses."""
    torch._dynamo.reset()
    return torch.compile(loss_fn, fullgraph=True, backend="aot_eager")


FORMS = {"grouped": lambda loss_fn: loss_fn, "dense": compiled}


def test_hand_computed_values():
    t, w = 0.5, 0.5
    # same-class similarities k.queue / t = [0.6, 0.8] / 0.5; softmax rescaled to max 1: [e^-0.4, 1]
    maskcon_target = mix([1.0, math.exp(-0.4), 1.0, 0.0], w)
    common = dict(q=Q, k=K_, queue=QUEUE, t0=T0)
    assert losses.selfcon_loss(**common).item() == pytest.approx(cross_entropy([1, 0, 0, 0]), rel=1e-6)
    assert losses.maskcon_loss(**common, queue_coarse=QUEUE_COARSE, coarse=COARSE, t=t, w=w).item() == \
        pytest.approx(cross_entropy(maskcon_target), rel=1e-6)
    assert losses.grafit_loss(**common, queue_coarse=QUEUE_COARSE, coarse=COARSE, w=0.8).item() == \
        pytest.approx(cross_entropy(mix([1, 1, 1, 0], 0.8)), rel=1e-6)
    # fine labels: only entry 1 shares the sample's fine class
    assert losses.supfine_loss(**common, queue_fine=torch.tensor([5, 7, 6]), fine=torch.tensor([7])).item() == \
        pytest.approx(cross_entropy([0.5, 0.0, 0.5, 0.0]), rel=1e-6)
    classifier_ce = math.log(math.exp(2.0) + 1 + math.exp(-1.0)) - 2.0
    coins = losses.coins_loss(**common, logits_coarse=torch.tensor([[2.0, 0.0, -1.0]]), coarse=COARSE, w=0.3)
    assert coins.item() == pytest.approx(0.3 * classifier_ce + 0.7 * cross_entropy([1, 0, 0, 0]), rel=1e-6)


def test_matches_official_formulation():
    """Value and gradient equal a direct transcription of the official code's dense N x (1+K) computation."""
    q, k, queue, queue_coarse, coarse = random_inputs(bank=64, classes=2)
    t0, t, w = 0.1, 0.05, 0.7
    loss, grad = value_and_grad(losses.maskcon_loss, q, k=k, queue=queue, queue_coarse=queue_coarse,
                                coarse=coarse, t0=t0, t=t, w=w)
    with torch.no_grad():
        same = (coarse[:, None] == queue_coarse[None, :]).float()
        assert same.sum(dim=1).min() > 0                                  # the official code needs this
        logits_pd = (k @ queue.T) / t * same
        soft = (logits_pd - logits_pd.max(dim=1, keepdim=True).values).exp() * same
        soft = soft / soft.sum(dim=1, keepdim=True)
        soft = soft / soft.max(dim=1, keepdim=True).values
        maskcon_z = torch.cat([torch.ones(len(q), 1), soft], dim=1)
        maskcon_z = maskcon_z / maskcon_z.sum(dim=1, keepdim=True)
        target = w * maskcon_z + (1 - w) * F.one_hot(torch.zeros(len(q), dtype=torch.long), 65)
    reference, reference_grad = dense_reference(q, k, queue, target, t0=t0)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("classes", [2, 7, 50])
def test_grafit_and_supfine_match_the_dense_target(classes, form):
    """Equal weights on the own key and every bank entry of the sample's class, built densely; empty bank
    entries (-1) and classes absent from the bank included."""
    q, k, queue, labels_bank, labels = random_inputs(n=12, bank=60, classes=classes, seed=classes)
    same = (labels[:, None] == labels_bank[None, :]).float()
    positives = torch.cat([torch.ones(len(q), 1), same], dim=1)
    one_hot = F.one_hot(torch.zeros(len(q), dtype=torch.long), 61).float()
    for w in (0.3, 1.0):
        target = w * positives / positives.sum(dim=1, keepdim=True) + (1 - w) * one_hot
        grafit = value_and_grad(FORMS[form](losses.grafit_loss), q, k=k, queue=queue, queue_coarse=labels_bank,
                                coarse=labels, t0=0.1, w=w)
        torch.testing.assert_close(grafit, dense_reference(q, k, queue, target))
    supfine = value_and_grad(FORMS[form](losses.supfine_loss), q, k=k, queue=queue, queue_fine=labels_bank,
                             fine=labels, t0=0.1)
    torch.testing.assert_close(supfine, dense_reference(q, k, queue, positives / positives.sum(dim=1, keepdim=True)))


@pytest.mark.parametrize("name", ["selfcon", "maskcon", "grafit", "supfine", "coins"])
def test_every_objective_compiles_as_one_graph_with_the_same_value_and_gradient(name):
    q, k, queue, queue_coarse, coarse = random_inputs(n=10, bank=48, classes=4, seed=3)
    extra = {"selfcon": {}, "maskcon": dict(queue_coarse=queue_coarse, coarse=coarse, t=0.05, w=0.6),
             "grafit": dict(queue_coarse=queue_coarse, coarse=coarse, w=0.6),
             "supfine": dict(queue_fine=queue_coarse, fine=coarse),
             "coins": dict(logits_coarse=torch.randn(len(q), 4, generator=torch.Generator().manual_seed(4)),
                           coarse=coarse, w=0.6)}[name]
    loss_fn = getattr(losses, f"{name}_loss")
    eager = value_and_grad(loss_fn, q, k=k, queue=queue, t0=0.1, **extra)
    graph = value_and_grad(compiled(loss_fn), q, k=k, queue=queue, t0=0.1, **extra)
    torch.testing.assert_close(graph, eager)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("classes", [1, 5, 30])
def test_maskcon_matches_the_dense_masked_target(classes, form):
    """Both computations (grouped by class on the CPU, whole-batch N x K on a GPU and under compile) equal
    the masked N x K target built densely, for few and many classes."""
    q, k, queue, queue_coarse, coarse = random_inputs(n=16, bank=50, classes=classes, seed=classes)
    t, w = 0.05, 0.8
    same = coarse[:, None] == queue_coarse[None, :]
    weights = ((k @ queue.T) / t).masked_fill(~same, -math.inf)
    weights = (weights - weights.amax(dim=1, keepdim=True)).exp().nan_to_num(0.0)   # max 1; 0 off-class
    bank_target = torch.cat([torch.ones(len(q), 1), weights], dim=1)
    one_hot = F.one_hot(torch.zeros(len(q), dtype=torch.long), 51).float()
    target = w * bank_target / bank_target.sum(dim=1, keepdim=True) + (1 - w) * one_hot
    maskcon = value_and_grad(FORMS[form](losses.maskcon_loss), q, k=k, queue=queue, queue_coarse=queue_coarse,
                             coarse=coarse, t0=0.1, t=t, w=w)
    torch.testing.assert_close(maskcon, dense_reference(q, k, queue, target))


def test_w_zero_gives_selfcon():
    q, k, queue, queue_coarse, coarse = random_inputs()
    selfcon = value_and_grad(losses.selfcon_loss, q, k=k, queue=queue, t0=0.1)
    for loss_fn, extra in [(losses.maskcon_loss, dict(t=0.05)), (losses.grafit_loss, {}),
                           (losses.coins_loss, {})]:
        labels = dict(logits_coarse=torch.randn(len(q), 3), coarse=coarse) if loss_fn is losses.coins_loss \
            else dict(queue_coarse=queue_coarse, coarse=coarse)
        loss, grad = value_and_grad(loss_fn, q, k=k, queue=queue, t0=0.1, w=0.0, **labels, **extra)
        torch.testing.assert_close(loss, selfcon[0])
        torch.testing.assert_close(grad, selfcon[1])


def test_one_same_class_entry_shares_the_target_with_the_own_key():
    q, k, queue, _, _ = random_inputs(n=4, bank=10)
    queue_coarse = torch.full((10,), 1)
    queue_coarse[3] = 0                                     # the only entry of class 0
    coarse = torch.zeros(4, dtype=torch.long)
    loss = losses.maskcon_loss(q=q, k=k, queue=queue, queue_coarse=queue_coarse, coarse=coarse,
                               t0=0.1, t=0.05, w=1.0)
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / 0.1
    expected = (torch.logsumexp(logits, dim=1) - 0.5 * logits[:, 0] - 0.5 * logits[:, 4]).mean()
    torch.testing.assert_close(loss, expected)


def test_large_t_gives_grafit_equal_weights():
    q, k, queue, queue_coarse, coarse = random_inputs()
    common = dict(k=k, queue=queue, queue_coarse=queue_coarse, coarse=coarse, t0=0.1, w=0.6)
    maskcon = value_and_grad(losses.maskcon_loss, q, t=1e6, **common)
    grafit = value_and_grad(losses.grafit_loss, q, **common)
    torch.testing.assert_close(maskcon, grafit)


def test_no_same_class_entry_gives_one_hot_target():
    q, k, queue, _, _ = random_inputs()
    queue_coarse = torch.full((len(queue),), -1)            # empty bank: no entry matches any class
    queue_coarse[:5] = 2
    coarse = torch.tensor([0, 1, 0, 1, 0, 2])               # only the last sample has same-class entries
    selfcon_per_sample = [losses.selfcon_loss(q=q[i:i + 1], k=k[i:i + 1], queue=queue, t0=0.1)
                          for i in range(5)]
    for t in (0.01, 0.05, 1.0):
        for loss_fn, extra in [(losses.maskcon_loss, dict(t=t)), (losses.grafit_loss, {})]:
            for i in range(5):
                loss = loss_fn(q=q[i:i + 1], k=k[i:i + 1], queue=queue, queue_coarse=queue_coarse,
                               coarse=coarse[i:i + 1], t0=0.1, w=1.0, **extra)
                torch.testing.assert_close(loss, selfcon_per_sample[i])
            batch_loss = loss_fn(q=q, k=k, queue=queue, queue_coarse=queue_coarse, coarse=coarse, t0=0.1,
                                 w=1.0, **extra)
            assert torch.isfinite(batch_loss)


def test_extreme_temperatures_stay_finite():
    q, k, queue, queue_coarse, coarse = random_inputs(bank=200)
    for t in (1e-3, 0.01, 1e3):
        loss, grad = value_and_grad(losses.maskcon_loss, q, k=k, queue=queue, queue_coarse=queue_coarse,
                                    coarse=coarse, t0=0.05, t=t, w=1.0)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["selfcon", "maskcon", "grafit", "supfine", "coins"])
def test_gradient_reaches_only_the_query(name):
    q, k, queue, queue_coarse, coarse = random_inputs()
    k.requires_grad_()
    queue.requires_grad_()
    logits_coarse = torch.randn(len(q), 3, requires_grad=True)
    inputs = dict(q=q, k=k, queue=queue, t0=0.1)
    extra = {"selfcon": {}, "maskcon": dict(queue_coarse=queue_coarse, coarse=coarse, t=0.05, w=0.5),
             "grafit": dict(queue_coarse=queue_coarse, coarse=coarse, w=0.5),
             "supfine": dict(queue_fine=queue_coarse, fine=coarse),
             "coins": dict(logits_coarse=logits_coarse, coarse=coarse, w=0.5)}[name]
    getattr(losses, f"{name}_loss")(**inputs, **extra).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None
    assert (logits_coarse.grad is not None) == (name == "coins")


def test_fp32_under_autocast():
    q, k, queue, queue_coarse, coarse = random_inputs(bank=256)
    inputs = dict(q=q, k=k, queue=queue, queue_coarse=queue_coarse, coarse=coarse, t0=0.1, t=0.05, w=0.5)
    reference = losses.maskcon_loss(**inputs)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = losses.maskcon_loss(**{**inputs, "q": q.bfloat16().float()})
        autocast.backward()
        selfcon = losses.selfcon_loss(q=q, k=k, queue=queue, t0=0.1)
    assert autocast.dtype == torch.float32 and selfcon.dtype == torch.float32
    assert q.grad.dtype == torch.float32
    # bf16 logits would be off by ~1e-2 at t0 = 0.1
    torch.testing.assert_close(autocast, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(selfcon, losses.selfcon_loss(q=q, k=k, queue=queue, t0=0.1))


def test_objectives_bench_runs(capsys):
    assert objectives.main(["--device", "cpu", "--repeats", "2", "--batch", "8", "--queue-size", "64",
                            "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["results"]) == {"selfcon", "maskcon"}
    assert all(r["median_ms"] > 0 and r["peak_mib"] > 0 for r in report["results"].values())
