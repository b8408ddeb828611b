"""The run as the trainer builds and follows it (maskcon/run.py, maskcon/train.py), in this process on the
bundled digits: the schedule the loop actually follows, the optimizer its step actually uses, the network its
evaluation actually reads, the labels its loader actually hands over, the checkpoint at the end, and a
resumed epoch that starts at its batch."""

import json
import math

import pytest
import torch

from tests.conftest import tiny_config

STEPS_PER_EPOCH = 1437 // 64      # digits' train split, batch 64: 22
WARMUP_STEPS = 11                 # --warmup-epochs 0.5 of 22 steps
BASE_LR = 0.4 * 64 / 128          # --lr 0.4 for a global batch of 128, scaled to the real global batch of 64


def run_config(shards, out, *options):
    return tiny_config("--shards", str(shards), "--output-dir", str(out), "--batch-size", "64",
                       "--eval-batch-size", "128", "--loader-threads", "1", "--eval-untrained", "false", *options)


@pytest.fixture(scope="module")
def finished(digits_shards, module_folder):
    """One epoch trained by the trainer, a metrics row after every step, no checkpoint before the end."""
    from maskcon.train import train

    out = module_folder / "one-epoch"
    config = run_config(digits_shards, out, "--epochs", "1", "--warmup-epochs", "0.5", "--lr", "0.4",
                        "--lr-reference-batch", "128", "--log-every", "1", "--checkpoint-every", "0")
    result = train(config)
    return config, out, result


def test_the_loop_follows_the_warm_up_then_the_cosine_schedule(finished):
    _, out, result = finished
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    used = {row["step"]: row["lr"] for row in rows if "loss" in row}   # the lr the optimizer held for the step
    assert sorted(used) == list(range(1, STEPS_PER_EPOCH + 1)) and result.step == STEPS_PER_EPOCH
    for step in range(STEPS_PER_EPOCH):
        if step < WARMUP_STEPS:
            expected = BASE_LR * (step + 1) / WARMUP_STEPS
        else:
            expected = BASE_LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / (STEPS_PER_EPOCH - WARMUP_STEPS)))
        assert used[step + 1] == pytest.approx(expected, rel=1e-9, abs=1e-12), step


def test_checkpoint_every_0_still_saves_at_the_end(finished):
    _, out, _ = finished
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{STEPS_PER_EPOCH:08d}"]


@torch.no_grad()
def test_the_evaluation_reads_the_trained_query_encoder(finished):
    """R@K of the run equal those of its exported backbone (the trained query encoder), recomputed here."""
    from maskcon.loaders import LoaderSpec, build_test_loader
    from maskcon.retrieval import RECALL_KS, recall_at_k
    from maskcon.run import build_model

    config, out, result = finished
    network = build_model(config, None)
    network.encoder.load_state_dict(torch.load(out / "backbone.pt", weights_only=True)["state_dict"])
    loader = build_test_loader(config.shards, LoaderSpec(image_size=config.image_size, batch_size=128, rank=0,
                                                         world_size=1, device=torch.device("cpu"),
                                                         backend=config.loader))
    batches = list(loader)
    features = torch.cat([network.features(batch["image"]) for batch in batches])
    order = torch.cat([batch["index"] for batch in batches]).argsort()
    fine = torch.cat([batch["fine"] for batch in batches]).long()
    expected = recall_at_k(features[order], fine[order], RECALL_KS)
    assert result.metrics == pytest.approx(expected, abs=1e-9)
    assert json.loads((out / "results.json").read_text())["R@1"] == pytest.approx(expected["R@1"], abs=1e-9)


def built_run(shards, out, *options):
    from maskcon.run import build_run, make_accelerator

    config = run_config(shards, out, *options)
    return build_run(config, make_accelerator(config))


def test_the_step_uses_an_optimizer_with_every_option_of_the_run(digits_shards, tmp_path):
    run = built_run(digits_shards, tmp_path / "run", "--momentum", "0.7", "--weight-decay", "0.003", "--lr", "0.2",
                    "--lr-reference-batch", "64")
    assert run.parts.optimizer is run.optimizer and run.parts.model is run.model
    for group in run.optimizer.param_groups:
        assert group["momentum"] == 0.7 and group["weight_decay"] == 0.003 and group["lr"] == 0.2
    optimized = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in run.learner.parameters() if p.requires_grad}
    assert not any(id(p) in optimized for p in run.learner.key_encoder.parameters())


def test_the_step_takes_the_runs_temperatures_weight_and_method(digits_shards, tmp_path):
    run = built_run(digits_shards, tmp_path / "run", "--method", "maskcon", "--t0", "0.2", "--t", "0.07", "--w", "0.3")
    assert (run.parts.t0, run.parts.t, run.parts.w) == (0.2, 0.07, 0.3)
    assert run.parts.method.name == "maskcon"


def test_the_bank_is_filled_with_keys_of_the_key_view(digits_shards, tmp_path):
    """MoCo's bank holds keys of the key view by the momentum encoder: the fill's entries are the keys an
    untouched copy of the learner gives the key views of the fill's batch, not those of its query views."""
    import copy

    from maskcon.train import BANK_FILL_EPOCH, fill_memory_bank

    run = built_run(digits_shards, tmp_path / "run")     # a bank of 64 keys, batches of 64: one batch fills it
    untouched = copy.deepcopy(run.learner)
    fill_memory_bank(run.learner, run.train_loader)
    run.train_loader.set_epoch(BANK_FILL_EPOCH)
    batch = next(iter(run.train_loader))
    keys, of_queries = (untouched.encode_keys(batch[view], 0) for view in ("key", "query"))
    torch.testing.assert_close(run.learner.queue, keys)
    assert not torch.allclose(run.learner.queue, of_queries, atol=1e-3)
    assert torch.equal(run.learner.queue_fine.cpu(), batch["fine"].cpu())


def test_the_loader_and_the_bank_hold_fine_and_coarse_labels_of_the_shards(digits_shards, tmp_path):
    from maskcon.train import fill_memory_bank

    run = built_run(digits_shards, tmp_path / "run")
    fine_to_coarse = torch.tensor(run.manifest["fine_to_coarse"])
    batch = next(iter(run.train_loader))
    assert len(set(batch["fine"].tolist())) > len(run.manifest["coarse_classes"])
    assert torch.equal(batch["coarse"].cpu(), fine_to_coarse[batch["fine"].cpu()])
    fill_memory_bank(run.learner, run.train_loader)
    assert len(set(run.learner.queue_fine.tolist())) > len(run.manifest["coarse_classes"])
    assert torch.equal(run.learner.queue_coarse.cpu(), fine_to_coarse[run.learner.queue_fine.cpu()])


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_an_epoch_started_at_a_batch_yields_the_rest_of_the_full_epoch(digits_shards, tmp_path, backend):
    run = built_run(digits_shards, tmp_path / "run", "--loader", backend)
    loader = run.train_loader
    loader.set_epoch(3)
    whole = list(loader)
    loader.set_epoch(3, start=17)
    rest = list(loader)
    assert len(rest) == STEPS_PER_EPOCH - 17
    for ours, reference in zip(rest, whole[17:]):
        for name in ("query", "key", "fine", "coarse"):
            assert torch.equal(ours[name], reference[name]), name
    loader.set_epoch(4)
    again = next(iter(loader))    # the start applies to one pass only
    loader.set_epoch(4)
    assert torch.equal(again["query"], next(iter(loader))["query"])


def test_the_test_loader_takes_the_loader_threads_of_the_run(digits_shards, tmp_path):
    from maskcon.loaders import loader_defaults

    assert loader_defaults(8).threads != 1
    run = built_run(digits_shards, tmp_path / "run")      # --loader-threads 1
    assert run.train_loader.pipeline.num_threads == 1 and run.test_loader.pipeline.num_threads == 1   # DALI's own


@torch.no_grad()
def test_training_and_evaluation_normalise_with_the_recipe_of_the_runs_dataset(digits_shards, tmp_path):
    """--dataset folder on the digits' shards: the test loader uses the folder recipe's mean and std (as the
    training loader, built from --dataset), not the digits' that the manifest names."""
    from maskcon.loaders import LoaderSpec, build_test_loader

    run = built_run(digits_shards, tmp_path / "run", "--dataset", "folder", "--image-size", "8")
    ours = next(iter(run.test_loader))["image"]
    options = dict(image_size=8, batch_size=128, rank=0, world_size=1, device="cpu", backend="dali",
                   num_threads=1)
    for recipe, same in (("folder", True), ("digits", False)):
        reference = next(iter(build_test_loader(digits_shards, LoaderSpec(recipe=recipe, **options))))["image"]
        assert torch.equal(ours, reference) == same, recipe
