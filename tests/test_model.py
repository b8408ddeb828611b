"""The learner on one process: backbone shapes, momentum copy, memory bank, gradients, pretrained weights."""

import pytest
import torch
import torch.nn as nn
import torchvision

from maskcon import losses
from maskcon.errors import UserError
from maskcon.model import MaskConModel


def tiny_model(**options) -> MaskConModel:
    torch.manual_seed(0)
    return MaskConModel(**{"arch": "resnet18", "image_size": 8, "queue_size": 10, **options})


def test_small_images_get_a_3x3_stem_and_pooled_features():
    model = tiny_model(num_coarse=5)
    assert model.encoder.conv1.kernel_size == (3, 3) and model.encoder.conv1.stride == (1, 1)
    assert isinstance(model.encoder.maxpool, nn.Identity) and isinstance(model.encoder.fc, nn.Identity)
    out = model(torch.randn(4, 3, 8, 8))
    assert out["q"].shape == (4, 128) and out["logits_coarse"].shape == (4, 5)
    torch.testing.assert_close(out["q"].norm(dim=1), torch.ones(4))
    assert model.features(torch.randn(4, 3, 8, 8)).shape == (4, 512)
    assert model.training and model.encoder.training          # features() ran in eval mode and came back
    assert tiny_model()(torch.randn(2, 3, 8, 8))["logits_coarse"] is None
    assert tiny_model().classifier is None


@pytest.mark.parametrize("arch, width", [("resnet34", 512), ("resnet50", 2048)])
def test_feature_width_of_each_arch(arch, width):
    model = tiny_model(arch=arch, proj_hidden=16, proj_dim=4)
    assert model.features(torch.randn(2, 3, 8, 8)).shape == (2, width)
    assert model.projector[0].in_features == width and model.projector[2].out_features == 4


def test_large_images_keep_the_imagenet_stem():
    model = MaskConModel(image_size=96, queue_size=4)
    assert model.encoder.conv1.kernel_size == (7, 7) and model.encoder.conv1.stride == (2, 2)
    assert isinstance(model.encoder.maxpool, nn.MaxPool2d)


def test_the_projectors_are_512_relu_128_as_the_supplement_gives_them():
    """Section A of the supplement: a 512-512-128 MLP with a ReLU between; q = the normalised output."""
    model = tiny_model()
    for projector in (model.projector, model.key_projector):
        layers = list(projector)
        assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear]
        assert [(layers[i].in_features, layers[i].out_features) for i in (0, 2)] == [(512, 512), (512, 128)]
    images = torch.randn(3, 3, 8, 8)
    first, second = model.projector[0], model.projector[2]
    with torch.no_grad():
        pooled = model.encoder(images)
        hand = torch.relu(pooled @ first.weight.T + first.bias) @ second.weight.T + second.bias
        q = model(images)["q"]
    torch.testing.assert_close(q, hand / hand.norm(dim=1, keepdim=True))
    assert (q < 0).any()                       # no ReLU after the last layer


def test_the_momentum_update_builds_no_autograd_graph():
    model = tiny_model()
    model(torch.randn(2, 3, 8, 8))["q"].sum().backward()
    model.momentum_update()
    for key in [*model.key_encoder.parameters(), *model.key_projector.parameters()]:
        assert key.is_leaf and key.grad_fn is None and not key.requires_grad


def test_key_encoder_is_a_frozen_momentum_copy():
    model = tiny_model()
    query_parameters = [*model.encoder.parameters(), *model.projector.parameters()]
    key_parameters = [*model.key_encoder.parameters(), *model.key_projector.parameters()]
    assert all(not p.requires_grad for p in key_parameters)
    for query, key in zip(query_parameters, key_parameters):
        torch.testing.assert_close(query, key)
    with torch.no_grad():
        for query in query_parameters:
            query.add_(1.0)
    before = [key.clone() for key in key_parameters]
    model.momentum_update()
    for query, key, old in zip(query_parameters, key_parameters, before):
        torch.testing.assert_close(key, 0.99 * old + 0.01 * query)


def test_gradients_reach_only_the_query_encoder():
    model = tiny_model(num_coarse=3)
    out = model(torch.randn(4, 3, 8, 8))
    k = model.encode_keys(torch.randn(4, 3, 8, 8), shuffle_seed=0)
    assert not k.requires_grad
    coarse = torch.tensor([0, 1, 2, 0])
    model.enqueue(k, coarse, coarse)
    loss = losses.maskcon_loss(q=out["q"], k=k, queue=model.queue, queue_coarse=model.queue_coarse,
                               coarse=coarse, t0=0.1, t=0.05, w=0.5)
    loss = loss + losses.coins_loss(q=out["q"], k=k, queue=model.queue, logits_coarse=out["logits_coarse"],
                                    coarse=coarse, t0=0.1, w=0.5)
    loss.backward()
    for module in (model.encoder, model.projector, model.classifier):
        assert all(p.grad is not None for p in module.parameters())
    for module in (model.key_encoder, model.key_projector):
        assert all(p.grad is None for p in module.parameters())


def test_bank_starts_empty_and_identical_whatever_the_seed():
    first = tiny_model()
    torch.manual_seed(123)
    second = MaskConModel(image_size=8, queue_size=10)
    torch.testing.assert_close(first.queue, second.queue)
    torch.testing.assert_close(first.queue.norm(dim=1), torch.ones(10))
    assert (first.queue_coarse == -1).all() and (first.queue_fine == -1).all() and first.queue_ptr.item() == 0


def test_enqueue_wraps_around_the_bank():
    model = tiny_model()                                        # K = 10, batches of 4: not a multiple
    written = []
    for step in range(3):
        keys = torch.nn.functional.normalize(torch.randn(4, 128), dim=1)
        labels = torch.arange(4) + 4 * step
        model.enqueue(keys, labels, labels + 100)
        written.append(keys)
    written = torch.cat(written)                                # entries 0..11; 10 and 11 wrap to slots 0, 1
    torch.testing.assert_close(model.queue[2:], written[2:10])
    torch.testing.assert_close(model.queue[:2], written[10:])
    assert model.queue_coarse.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert model.queue_fine.tolist() == [110, 111, 102, 103, 104, 105, 106, 107, 108, 109]
    assert model.queue_ptr.item() == 2


def test_a_batch_larger_than_the_bank_keeps_its_last_entries():
    model = tiny_model()
    model.enqueue(torch.zeros(3, 128), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    keys = torch.randn(13, 128)
    labels = torch.arange(13)
    model.enqueue(keys, labels, labels)
    # pointer 3 + 13 = 16 -> 6; entries 3..12 fill the bank, the last one ends at slot 5
    assert model.queue_ptr.item() == 6
    assert model.queue_coarse.tolist() == [7, 8, 9, 10, 11, 12, 3, 4, 5, 6]
    torch.testing.assert_close(model.queue[6], keys[3])


def test_keys_come_from_the_momentum_encoder_not_the_query_encoder():
    model = tiny_model()
    with torch.no_grad():                               # the two encoders no longer agree
        for parameter in [*model.encoder.parameters(), *model.projector.parameters()]:
            parameter.add_(torch.randn_like(parameter))
    model.eval()
    key = torch.randn(4, 3, 8, 8)
    expected = torch.nn.functional.normalize(model.key_projector(model.key_encoder(key)), dim=1)
    from_query_encoder = torch.nn.functional.normalize(model.projector(model.encoder(key)), dim=1)
    keys = model.encode_keys(key, shuffle_seed=0)
    torch.testing.assert_close(keys, expected)
    assert (keys - from_query_encoder).abs().max() > 1e-2


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


@pytest.mark.parametrize("image_size", [8, 96])
def test_pretrained_weights_from_a_local_file(resnet18_weights, image_size):
    state = torch.load(resnet18_weights, weights_only=True)
    model = MaskConModel(image_size=image_size, queue_size=4, pretrained=str(resnet18_weights))
    loaded = model.encoder.state_dict()
    assert loaded.keys() == {name for name in state if not name.startswith("fc.")}
    for name, value in loaded.items():
        if name == "conv1.weight" and image_size <= 64:         # the replaced stem stays fresh
            assert value.shape == (64, 3, 3, 3)
        else:
            torch.testing.assert_close(value, state[name])
    torch.testing.assert_close(model.key_encoder.state_dict(), loaded)


def test_unusable_pretrained_weights_are_user_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        MaskConModel(image_size=8, pretrained=str(tmp_path / "missing.pth"))
    state = torchvision.models.resnet18().state_dict()
    state["layer4.1.conv2.weight"] = torch.zeros(512, 512, 1, 1)       # another architecture's shape
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(UserError, match="do not fit resnet18"):
        MaskConModel(image_size=8, pretrained=str(tmp_path / "other.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        MaskConModel(image_size=8, pretrained=str(tmp_path / "garbage.pth"))
    # no internet: an empty hub cache and a proxy that refuses connections
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(UserError, match="cannot download") as error:
        MaskConModel(image_size=8, pretrained="imagenet")
    assert "\n" not in str(error.value)
    assert "--pretrained PATH" in str(error.value) and "--pretrained none" in str(error.value)
