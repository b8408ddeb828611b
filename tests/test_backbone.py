"""backbone.pt: the encoder with its metadata, its model card, and maskcon.load_backbone."""

import json

import torch
import pytest
from PIL import Image

import maskcon
from maskcon.backbone import backbone_metadata, build_encoder, images_to_batch, save_backbone
from maskcon.errors import UserError

RESOLVED = {"dataset": "cifar100", "method": "maskcon", "arch": "resnet18", "image_size": 32, "w": 1.0, "t": 0.05,
            "provenance": {"code": {"commit": "a" * 40, "clean": False}}}


def test_a_saved_backbone_loads_as_the_same_network_with_its_metadata(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 32)
    for parameter in encoder.parameters():      # not the initial weights: a loader that rebuilds them fails
        parameter.data.normal_()
    encoder.eval()
    save_backbone(tmp_path, encoder, backbone_metadata(RESOLVED, {"R@1": 65.5, "R@10": 89.0}, step=7))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = encoder(images)
        for where in (tmp_path, tmp_path / "backbone.pt"):
            loaded = maskcon.load_backbone(where)
            assert not loaded.training and torch.equal(loaded(images), expected)
    meta = loaded.metadata
    assert (meta["arch"], meta["image_size"], meta["feature_dim"], meta["dataset"], meta["method"]) == (
        "resnet18", 32, 512, "cifar100", "maskcon")
    assert meta["stem"].startswith("conv3x3") and meta["commit"] == "a" * 40 and meta["clean"] is False
    assert meta["normalisation"]["mean"] == [0.5071, 0.4865, 0.4409]   # CIFAR-100's, as the recipe
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "R@1 65.50" in card and "uncommitted" in card and "load_backbone" in card


@pytest.mark.parametrize("method, hyper, labels", [
    ("maskcon", "(w 0.7, t 0.2)", "on the coarse labels of `cifar100`"),
    ("grafit", "(w 0.7)", "on the coarse labels of `cifar100`"),
    ("supfine", "", "on the fine labels of `cifar100`"),        # the upper bound trains on the fine labels
    ("selfcon", "", "without labels, on `cifar100`"),
])
def test_the_model_card_names_the_labels_and_the_weights_its_method_reads(tmp_path, method, hyper, labels):
    meta = backbone_metadata({**RESOLVED, "method": method, "w": 0.7, "t": 0.2}, {}, step=3)
    save_backbone(tmp_path, build_encoder("resnet18", 32), meta)
    line = (tmp_path / "MODEL_CARD.md").read_text().splitlines()[2]
    assert line.startswith(f"- Trained by maskcon with the `{method}` objective{' ' + hyper if hyper else ''} for "
                           f"3 steps {labels}; commit "), line
    assert (meta["w"], meta["t"]) == {"maskcon": (0.7, 0.2), "grafit": (0.7, None)}.get(method, (None, None))


def test_a_large_image_backbone_keeps_torchvisions_stem():
    meta = backbone_metadata({**RESOLVED, "dataset": "cars196", "image_size": 224}, {}, step=1)
    assert meta["stem"].startswith("conv7x7") and meta["normalisation"]["mean"] == [0.485, 0.456, 0.406]


def test_images_become_the_test_view_batch():
    meta = backbone_metadata(RESOLVED, {}, step=1)
    batch = images_to_batch([Image.new("RGB", (50, 20), (255, 0, 0)), Image.new("L", (8, 8), 0)], meta)
    assert batch.shape == (2, 3, 32, 32)
    red = (1.0 - 0.5071) / 0.2673
    assert batch[0, 0].allclose(torch.full((32, 32), red), atol=1e-4)


def test_weights_without_metadata_are_refused_in_one_line(tmp_path):
    torch.save(build_encoder("resnet18", 32).state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(UserError, match="no maskcon metadata") as error:
        maskcon.load_backbone(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="elsewhere: no such file or folder"):
        maskcon.load_backbone(tmp_path / "elsewhere")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(UserError, match="no backbone at"):
        maskcon.load_backbone(tmp_path / "unfinished")
    from maskcon.evaluation import load_network

    with pytest.raises(UserError, match="elsewhere: no such file or folder"):
        load_network(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="holds no backbone.pt and no checkpoint"):
        load_network(tmp_path / "unfinished")


class _Hostile:
    """A pickle that runs a command when it is loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_files_that_are_not_a_network_are_refused_in_one_line_and_run_nothing(tmp_path):
    import os

    from maskcon.evaluation import load_network

    (tmp_path / "config.yaml").write_text("dataset: digits\narch: resnet18\nimage_size: 8\n")   # a run folder's
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": _Hostile(tmp_path / "ran")}, tmp_path / "hostile.pt")
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "metadata": {"arch": "resnet18", "image_size": 8}},
               tmp_path / "misfit.pt")
    for name, says in (("config.yaml", "it is not a maskcon backbone: pass a finished run folder"),
                       ("noise.pt", "it is not a maskcon backbone"), ("hostile.pt", "it is not a maskcon backbone"),
                       ("misfit.pt", "its weights do not fit the network its metadata describes")):
        for load in (maskcon.load_backbone, load_network):
            with pytest.raises(UserError, match=says) as error:
                load(tmp_path / name)
            assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert not (tmp_path / "ran").exists()
    checkpoint = tmp_path / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)      # cut short while it was copied
    with pytest.raises(UserError, match=r"step-00000010 cannot be read \(files.json missing") as error:
        load_network(checkpoint)
    assert "\n" not in str(error.value)


def test_16_bit_grey_images_keep_their_greys_as_the_shards_do(tmp_path):
    import io

    import numpy as np

    from maskcon.datasets.source import decoded_alike

    meta = backbone_metadata(RESOLVED, {}, step=1)
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(tmp_path / "grey16.png")   # 16-bit mid grey
    as_sharded = Image.open(io.BytesIO(decoded_alike((tmp_path / "grey16.png").read_bytes(), tmp_path / "grey16.png")))
    mid_grey = (128 / 255 - 0.5071) / 0.2673           # channel 0 of a pixel of 128 / 255, CIFAR-100's mean and std
    for image in (Image.open(tmp_path / "grey16.png"), tmp_path / "grey16.png", str(tmp_path / "grey16.png")):
        batch = images_to_batch([image], meta)
        assert batch[0, 0].allclose(torch.full((32, 32), mid_grey), atol=1e-4), image
        assert torch.equal(batch, images_to_batch([as_sharded], meta))


def test_images_to_batch_names_what_it_takes():
    meta = backbone_metadata(RESOLVED, {}, step=1)
    with pytest.raises(ValueError, match="no images"):
        images_to_batch([], meta)
    for wrong, named in ((Image.new("RGB", (4, 4)), "Image"), ([torch.zeros(3, 4, 4)], "Tensor"), ([3], "int")):
        with pytest.raises(TypeError, match=f"PIL images or image paths, not .*{named}"):
            images_to_batch(wrong, meta)


@pytest.fixture(scope="module")
def stopped_run(module_folder):
    """A run folder stopped before its end: config.yaml and one real checkpoint of a tiny learner, no backbone.pt.
    (the run folder, the learner's query encoder weights)"""
    import dataclasses

    import yaml
    from accelerate import Accelerator

    from maskcon import checkpoints
    from tests.conftest import tiny_config, tiny_learner

    run = module_folder / "stopped"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(tiny_config())))
    learner = tiny_learner(seed=3)
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(learner)
    checkpoints.save(accelerator, run / "checkpoints", step=2, epoch=0, extra_state={}, keep=1)
    return run, {name: tensor.clone() for name, tensor in learner.encoder.state_dict().items()}


def test_a_runs_checkpoints_folder_is_evaluated_by_its_newest_checkpoint(stopped_run):
    from maskcon.evaluation import load_network

    run, weights = stopped_run
    for where in (run / "checkpoints", run, run / "checkpoints" / "step-00000002"):
        encoder, settings, what = load_network(where)
        assert what == f"checkpoint {run / 'checkpoints' / 'step-00000002'}" and settings["dataset"] == "digits"
        assert all(torch.equal(tensor, weights[name]) for name, tensor in encoder.state_dict().items())


@pytest.mark.parametrize("recorded, says", [
    (None, "no digits shards at shards/digits (the default, relative to the folder the run was started in)"),
    ("mine/digits", "no digits shards at mine/digits (its --shards, relative to the folder the run was started in)"),
])
def test_eval_from_another_folder_names_the_runs_shards_and_asks_for_them(stopped_run, tmp_path, monkeypatch,
                                                                          recorded, says):
    import shutil

    import yaml

    from maskcon.evaluation import evaluate

    run = tmp_path / "run"
    shutil.copytree(stopped_run[0], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "shards": recorded}))
    monkeypatch.chdir(tmp_path)        # not where the run was started
    with pytest.raises(UserError) as error:
        evaluate(run, None, batch_size=None, loader="dali", threads=1, features_file=None)
    assert str(error.value).startswith(says) and "--shards FOLDER" in str(error.value), str(error.value)


def test_load_backbone_on_a_checkpoint_of_a_finished_run_points_to_its_backbone(stopped_run, tmp_path):
    import shutil

    run = tmp_path / "finished"
    shutil.copytree(stopped_run[0], run)
    save_backbone(run, build_encoder("resnet18", 8), backbone_metadata({**RESOLVED, "image_size": 8}, {}, step=2))
    step = run / "checkpoints" / "step-00000002"
    for where in (step, run / "checkpoints"):
        with pytest.raises(UserError) as error:
            maskcon.load_backbone(where)
        assert f"the run's trained backbone is {run / 'backbone.pt'} (load {run})" in str(error.value)
        assert "resume" not in str(error.value) and f"python launch/eval.py {where}" in str(error.value)
    assert maskcon.load_backbone(run).metadata["step"] == 2


def test_eval_of_a_grid_folder_asks_for_one_of_its_points(tmp_path):
    from maskcon.evaluation import load_network

    (tmp_path / "grid.yaml").write_text("sweep: tiny.yaml\n")
    (tmp_path / "seed-0").mkdir()
    with pytest.raises(UserError) as error:
        load_network(tmp_path)
    assert str(error.value) == f"{tmp_path} is the folder of a grid (launch/grid.py): pass one of its points, a run " \
                               f"folder {tmp_path}/POINT"


def test_load_backbone_on_a_stopped_run_says_how_to_get_its_backbone(stopped_run):
    run, _ = stopped_run
    step = run / "checkpoints" / "step-00000002"
    for where, resume in ((run, f"--output-dir {run} --resume)"), (step, f"--output-dir {run} --resume {step})"),
                          (run / "checkpoints", f"--output-dir {run} --resume)")):
        with pytest.raises(UserError, match="resume it to the end") as error:
            maskcon.load_backbone(where)
        assert resume in str(error.value) and f"python launch/eval.py {where}" in str(error.value)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("features, says", [("out", "is a folder"), ("nodir/f.pt", "does not exist"),
                                            ("notes.txt/f.pt", "notes.txt is a file, not a folder"),
                                            ("notes.txt", "exists and is not a features file written by eval.py")])
def test_eval_features_checks_its_file_before_evaluating_and_leaves_nothing(stopped_run, tmp_path, capsys, features,
                                                                           says):
    from maskcon.cli import run_eval

    run, _ = stopped_run
    (tmp_path / "out").mkdir()
    (tmp_path / "notes.txt").write_text("my notes\n")
    before = sorted(tmp_path.rglob("*"))
    # shards that do not exist: an evaluation that ran first would fail on them instead
    assert run_eval([str(run), "--shards", str(tmp_path / "no-shards"), "--features", str(tmp_path / features)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --features {tmp_path / features}") and says in error, error
    assert error.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "notes.txt").read_text() == "my notes\n"


@pytest.mark.slow
def test_eval_replaces_its_own_features_file_which_no_loader_takes_for_a_network(stopped_run, digits_shards,
                                                                                 tmp_path):
    from maskcon.cli import run_eval
    from maskcon.evaluation import load_network

    run, _ = stopped_run
    (tmp_path / "out").mkdir()
    written = tmp_path / "out" / "features.pt"
    for _ in range(2):    # the second run replaces the features file the first wrote
        assert run_eval([str(run), "--shards", str(digits_shards), "--loader", "torch",
                         "--features", str(written)]) == 0
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["features.pt"]
    table = torch.load(written)
    assert table["features"].shape == (360, 512) and len(table["keys"]) == 360
    # the labels' names, as the shards' manifest holds them: the digits under their two coarse classes
    manifest = json.loads((digits_shards / "manifest.json").read_text())
    assert table["fine_classes"] == manifest["fine_classes"] and len(table["fine_classes"]) == 10
    assert [table["coarse_classes"][manifest["fine_to_coarse"][fine]] for fine in table["fine"].tolist()] == [
        table["coarse_classes"][coarse] for coarse in table["coarse"].tolist()]
    for load in (maskcon.load_backbone, load_network):
        with pytest.raises(UserError, match="is a features file written by launch/eval.py --features, not a network"):
            load(written)


def test_ctrl_c_while_eval_loads_is_one_line_and_writes_no_features(stopped_run, tmp_path):
    from tests.conftest import stop_while_loading

    run, _ = stopped_run
    status, _, err = stop_while_loading(["launch/eval.py", str(run), "--features", str(tmp_path / "f.pt")])
    assert status == 130 and err.strip().splitlines() == [
        "stopped by SIGINT: the evaluation wrote nothing; run the same command again"], err
    assert list(tmp_path.iterdir()) == []


def test_load_backbone_on_a_run_stopped_before_its_first_checkpoint_asks_for_resume_auto(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)     # a checkpoint cut off before its record
    (run / "config.yaml").write_text("dataset: digits\nmethod: maskcon\n")
    with pytest.raises(UserError) as error:
        maskcon.load_backbone(run)
    assert str(error.value) == (f"{run.absolute()} holds no backbone.pt: the run has not finished and holds no intact "
                                f"checkpoint; run it again (the command that started it, with --output-dir "
                                f"{run.absolute()} --resume auto)")


@pytest.mark.slow
def test_eval_notes_test_images_alone_in_their_fine_class(stopped_run, digits_shards, tmp_path, capsys):
    import json

    from maskcon.cli import run_eval
    from maskcon.datasets.synthetic import write_synthetic_imagenet32

    run, _ = stopped_run
    assert run_eval([str(run), "--shards", str(digits_shards), "--loader", "torch", "--json"]) == 0
    assert "note:" not in capsys.readouterr().err           # 360 test digits, 36 of each class
    lonely = write_synthetic_imagenet32(tmp_path / "lonely", num_train=40, num_test=30)   # 30 classes, one image each
    assert run_eval([str(run), "--shards", str(lonely), "--loader", "torch", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["R@100"] == 0.0
    assert f"note: 30 of 30 test images are the only one of their fine class in {lonely}: each counts as a miss " \
           f"at every K" in err.splitlines()
    # and R@50, R@100 rank all 29 others: as the trainer's plan says, eval says so too
    assert "note: the test split has 30 images: R@50 and R@100 rank all the others, so they say nothing of the " \
           "network; judge the run by the smaller K" in err.splitlines()


def test_any_bytes_that_are_not_a_network_are_one_line(tmp_path):
    """The weights-only unpickler meets random bytes with UnpicklingError, IndexError, KeyError or
    UnicodeDecodeError: each is the same one line, for load_backbone and for eval's features-file check."""
    import random

    from maskcon.evaluation import check_features_file

    for seed in range(300):
        noise = tmp_path / f"noise-{seed}.pt"
        noise.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(UserError, match="it is not a maskcon backbone"):
            maskcon.load_backbone(noise)
        with pytest.raises(UserError, match="not a features file"):
            check_features_file(noise)
