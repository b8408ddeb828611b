"""Collectives of maskcon/dist.py and the learner: each against its one-process meaning, with 2 gloo processes.

One 2-process run (module fixture) exercises every helper and writes what each process saw; the tests
below compare the processes with each other and with the one-process result computed here.
"""

import os

import pytest
import torch
import torch.distributed
import torch.nn as nn

from maskcon import dist, failures
from maskcon.errors import AgreedError, UserError
from tests.conftest import run_gloo, tiny_learner

WORLD_SIZE = 2
BATCH = 4            # per process; global batch 8
QUEUE_SIZE = 20      # not a multiple of the global batch: the bank wraps around mid-batch
ENQUEUES = 5
IMAGE_SIZE = 8
SHUFFLES = 5
ROWS = {0: 3, 1: 5}  # uneven row counts for gather_to_main


def keys_and_labels(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's keys (N x 128, L2-normalised) and labels of an enqueue step."""
    generator = torch.Generator().manual_seed(100 * step + rank)
    k = nn.functional.normalize(torch.randn(BATCH, 128, generator=generator), dim=1)
    coarse = torch.randint(0, 20, (BATCH,), generator=generator)
    fine = torch.randint(0, 16_000_000, (BATCH,), generator=generator)   # large ids must travel exactly
    return k, coarse, fine


def key_images(rank: int) -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7 + rank))


def norm_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    net.register_buffer("queue", torch.zeros(3))
    return net


def _main_only_record(path: str, value: int) -> int:
    with open(path, "a") as record:
        record.write(f"ran on rank {dist.rank()}\n")
    return value


def _main_only_user_error() -> None:
    raise UserError("disk full while writing the checkpoint; free space and resume")


def _main_only_bug() -> None:
    raise ValueError("unexpected shape 3\nsecond line of the message")


def _fails_on(failing_rank: int, rank: int) -> int:
    if rank == failing_rank:
        raise UserError(f"shard 7 of rank {rank} does not decode")
    return rank


def _agreed_fails_on(failing_ranks: tuple, rank: int) -> int:
    if rank in failing_ranks:
        raise AgreedError("no such bucket")
    return rank


def _outcome(fn, *args) -> tuple[str, str]:
    try:
        return "returned", repr(fn(*args))
    except Exception as error:
        return type(error).__name__, str(error)


def worker(rank: int, out_dir: str) -> None:
    result = {}
    torch.manual_seed(rank)     # different global RNG streams: only shared decisions may agree

    # agree_to_stop
    finite = torch.tensor(1.0 + 2.0 * rank)                               # losses 1 and 3
    result["vote_calm"] = tuple(failures.agree_to_stop(sigterm=False, loss=finite))
    nan_on_one = torch.tensor(float("nan")) if rank == 1 else finite
    result["vote_nan"] = tuple(failures.agree_to_stop(sigterm=False, loss=nan_on_one))
    inf_in_sum = torch.tensor([1.0, float("inf") if rank == 0 else 2.0])
    result["vote_inf"] = tuple(failures.agree_to_stop(sigterm=False, loss=inf_in_sum))
    result["vote_sigterm"] = tuple(failures.agree_to_stop(sigterm=rank == 1, loss=None))
    result["vote_failed"] = tuple(failures.agree_to_stop(sigterm=False, loss=finite, failed=rank == 0))

    # run_on_main: success, a user error and a bug on the main process; afterwards the group still works
    record = os.path.join(out_dir, "main_only.txt")
    result["main_ok"] = _outcome(failures.run_on_main, _main_only_record, record, 42)
    result["main_user_error"] = _outcome(failures.run_on_main, _main_only_user_error)
    result["main_bug"] = _outcome(failures.run_on_main, _main_only_bug)
    # run_everywhere: success, then a failure on rank 1 only
    result["everywhere_ok"] = _outcome(failures.run_everywhere, _fails_on, -1, rank)
    result["everywhere_one_failed"] = _outcome(failures.run_everywhere, _fails_on, 1, rank)
    # an error every process would agree on, raised on all of them, then on a process other than the main one
    result["agreed_everywhere"] = _outcome(failures.run_everywhere, _agreed_fails_on, (0, 1), rank)
    result["agreed_not_on_main"] = _outcome(failures.run_everywhere, _agreed_fails_on, (1,), rank)
    torch.distributed.barrier()
    result["after_failures"] = dist.concat_all_gather(torch.tensor([rank])).tolist()

    # gather_to_main with uneven and empty row counts
    rows = torch.arange(ROWS[rank] * 3, dtype=torch.float32).view(-1, 3) + 100 * rank
    result["gathered"] = dist.gather_to_main(rows)
    result["gathered_empty"] = dist.gather_to_main(torch.zeros(0 if rank == 0 else 2, dtype=torch.long) + 5)

    # shuffle-BN: global sample ids through shuffle and unshuffle
    result["shuffles"] = []
    torch.manual_seed(rank)          # the global RNG differs across processes: only the seed passed may count
    for draw in range(SHUFFLES):
        ids = torch.arange(BATCH, dtype=torch.float32) + BATCH * rank                 # N
        shuffled, idx_unshuffle = dist.batch_shuffle(ids, seed=1000 + draw)
        restored = dist.batch_unshuffle(shuffled * 10, idx_unshuffle)
        result["shuffles"].append({"shuffled": shuffled, "restored": restored})
    images = key_images(rank).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    shuffled, idx_unshuffle = dist.batch_shuffle(images, seed=3)
    result["image_shuffle"] = {"dtype": str(shuffled.dtype), "shape": tuple(shuffled.shape),
                               "channels_last": shuffled.is_contiguous(memory_format=torch.channels_last),
                               "restored": dist.batch_unshuffle(shuffled, idx_unshuffle)}

    # the learner: keys through shuffle-BN come back to their own samples; gathered enqueue
    model = tiny_learner("--queue-size", str(QUEUE_SIZE))                 # the same model everywhere (seed 0)
    model.key_encoder.eval()             # per-sample key encoder: the result must not depend on the shuffle
    result["keys_eval"] = model.encode_keys(key_images(rank), shuffle_seed=11)
    for step in range(ENQUEUES):
        model.enqueue(*keys_and_labels(step, rank))
    result["bank"] = {name: getattr(model, name).clone()
                      for name in ("queue", "queue_coarse", "queue_fine", "queue_ptr")}

    # average_buffers: batch-norm statistics averaged, other buffers untouched
    net = norm_net()
    for buffer_name, buffer in net.named_buffers():
        buffer.fill_(1.0 + rank * 2.0 if buffer_name.endswith(("running_mean", "running_var")) else 10 + rank)
    dist.average_buffers(net)
    result["buffers"] = {name: buffer.clone() for name, buffer in net.named_buffers()}

    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("collectives")
    run_gloo(worker, str(out_dir))
    results = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    return results, out_dir



@pytest.mark.slow
def test_agree_to_stop_gives_every_process_the_same_answer(ranks):
    results, _ = ranks
    for result in results:
        assert result["vote_calm"] == (False, False, False, 2.0)           # mean loss of 1 and 3
        assert result["vote_nan"][:3] == (False, True, False)              # NaN on rank 1 only
        assert result["vote_inf"][:3] == (False, True, False)              # inf inside rank 0's tensor
        sigterm = result["vote_sigterm"]
        assert sigterm[:3] == (True, False, False) and sigterm[3] != sigterm[3]   # no loss: mean is NaN
        assert result["vote_failed"][:3] == (False, False, True)
    assert failures.Agreement(*results[0]["vote_nan"]).stop and not failures.Agreement(*results[0]["vote_calm"]).stop


def test_one_process_agree_to_stop_reads_the_local_loss():
    assert failures.agree_to_stop(sigterm=False, loss=torch.tensor(2.5)) == (False, False, False, 2.5)
    vote = failures.agree_to_stop(sigterm=False, loss=torch.tensor([1.0, float("nan")]))
    assert vote.loss_not_finite and vote.stop
    assert failures.agree_to_stop(sigterm=True).stop


@pytest.mark.slow
def test_run_on_main_runs_once_and_every_process_raises_when_it_fails(ranks):
    results, out_dir = ranks
    assert (out_dir / "main_only.txt").read_text() == "ran on rank 0\n"
    assert results[0]["main_ok"] == ("returned", "42") and results[1]["main_ok"] == ("returned", "None")
    assert results[0]["main_user_error"] == ("UserError",
                                             "disk full while writing the checkpoint; free space and resume")
    assert results[1]["main_user_error"] == ("MainProcessFailed", "the main process failed: disk full while "
                                             "writing the checkpoint; free space and resume")
    assert results[0]["main_bug"] == ("ValueError", "unexpected shape 3\nsecond line of the message")
    assert results[1]["main_bug"] == ("MainProcessFailed", "the main process failed: unexpected shape 3")
    for result in results:
        assert result["after_failures"] == [0, 1]     # the group still works after a failed main section


@pytest.mark.slow
def test_run_everywhere_stops_every_process_when_one_fails(ranks):
    results, _ = ranks
    assert [r["everywhere_ok"] for r in results] == [("returned", "0"), ("returned", "1")]
    assert results[1]["everywhere_one_failed"] == ("UserError", "shard 7 of rank 1 does not decode")
    assert results[0]["everywhere_one_failed"] == ("ProcessFailed",
                                                   "process 1 failed: shard 7 of rank 1 does not decode")
    # failed alike everywhere: the main process speaks for all (AgreedError is printed by rank 0 alone) ...
    assert [r["agreed_everywhere"] for r in results] == [("AgreedError", "no such bucket")] * 2
    # ... but not where the main process did not fail: the failed process says it itself
    assert results[1]["agreed_not_on_main"] == ("UserError", "no such bucket")
    assert results[0]["agreed_not_on_main"] == ("ProcessFailed", "process 1 failed: no such bucket")


@pytest.mark.slow
def test_gather_to_main_concatenates_uneven_rows_on_main_only(ranks):
    results, _ = ranks
    expected = torch.cat([torch.arange(ROWS[r] * 3, dtype=torch.float32).view(-1, 3) + 100 * r
                          for r in range(WORLD_SIZE)])
    torch.testing.assert_close(results[0]["gathered"], expected, rtol=0, atol=0)
    assert results[1]["gathered"] is None
    assert results[0]["gathered_empty"].tolist() == [5, 5] and results[1]["gathered_empty"] is None


@pytest.mark.slow
def test_batch_shuffle_permutes_the_global_batch_and_unshuffle_restores_it(ranks):
    results, _ = ranks
    moved = False
    for draw in range(SHUFFLES):
        shuffled = [results[r]["shuffles"][draw]["shuffled"] for r in range(WORLD_SIZE)]
        assert sorted(torch.cat(shuffled).tolist()) == list(range(WORLD_SIZE * BATCH))   # a permutation
        moved |= any(value >= BATCH for value in shuffled[0].tolist())    # rank 1's samples reached rank 0
        for rank in range(WORLD_SIZE):
            restored = results[rank]["shuffles"][draw]["restored"]
            assert restored.tolist() == [10.0 * (i + BATCH * rank) for i in range(BATCH)]
    assert moved


@pytest.mark.slow
def test_the_shuffle_is_the_permutation_of_the_seed_passed(ranks):
    """Process r gets the samples at positions rN..(r+1)N - 1 of randperm(P*N) drawn from the seed, whatever
    each process's global RNG; so the seed alone (the run's seed and the step, passed alike everywhere)
    decides the shuffle, and a resumed run shuffles as the uninterrupted one."""
    results, _ = ranks
    draws = set()
    for draw in range(SHUFFLES):
        permutation = torch.randperm(WORLD_SIZE * BATCH, generator=torch.Generator().manual_seed(1000 + draw))
        for rank in range(WORLD_SIZE):
            got = results[rank]["shuffles"][draw]["shuffled"]
            assert sorted(got.tolist()) == sorted(permutation[rank * BATCH:(rank + 1) * BATCH].tolist())
        draws.add(tuple(results[0]["shuffles"][draw]["shuffled"].tolist()))
    assert len(draws) > 1      # the seeds of the draws differ, and so do their shuffles


@pytest.mark.slow
def test_batch_shuffle_keeps_dtype_and_layout_of_images(ranks):
    results, _ = ranks
    for rank, result in enumerate(results):
        image_shuffle = result["image_shuffle"]
        assert image_shuffle["dtype"] == "torch.bfloat16" and image_shuffle["channels_last"]
        assert image_shuffle["shape"] == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
        expected = key_images(rank).to(torch.bfloat16)
        torch.testing.assert_close(image_shuffle["restored"], expected, rtol=0, atol=0)


@pytest.mark.slow
def test_keys_through_shuffle_bn_belong_to_their_own_samples(ranks):
    results, _ = ranks
    model = tiny_learner("--queue-size", str(QUEUE_SIZE))
    model.key_encoder.eval()
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["keys_eval"], model.encode_keys(key_images(rank), shuffle_seed=0))


@pytest.mark.slow
def test_banks_stay_identical_and_hold_the_last_keys_of_all_processes(ranks):
    results, _ = ranks
    # the bank written by hand: entry t of the global stream (step, rank, row) lands in slot t mod K
    expected = {"queue": torch.zeros(QUEUE_SIZE, 128), "queue_coarse": torch.zeros(QUEUE_SIZE, dtype=torch.long),
                "queue_fine": torch.zeros(QUEUE_SIZE, dtype=torch.long)}
    position = 0
    for step in range(ENQUEUES):
        for rank in range(WORLD_SIZE):
            for k, coarse, fine in zip(*keys_and_labels(step, rank)):
                slot = position % QUEUE_SIZE
                expected["queue"][slot], expected["queue_coarse"][slot], expected["queue_fine"][slot] = k, coarse, fine
                position += 1
    for name, value in results[0]["bank"].items():
        torch.testing.assert_close(results[1]["bank"][name], value, rtol=0, atol=0)
        if name in expected:
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert results[0]["bank"]["queue_fine"].max() > 2**23          # large class ids arrived exactly
    assert results[0]["bank"]["queue_ptr"].item() == (ENQUEUES * WORLD_SIZE * BATCH) % QUEUE_SIZE


@pytest.mark.slow
def test_average_buffers_averages_batch_norm_statistics_only(ranks):
    results, _ = ranks
    for name in results[0]["buffers"]:
        statistic = name.endswith(("running_mean", "running_var"))
        for rank, result in enumerate(results):
            expected = 2.0 if statistic else 10.0 + rank    # statistics: mean of 1 and 3; others unchanged
            assert torch.all(result["buffers"][name] == expected), (rank, name)
