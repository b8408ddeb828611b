"""backbone.pt: the encoder with its metadata, its model card, and maskcon.load_backbone."""

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
