"""Our model/ is interchangeable with torchvision.models: same keys, shapes, init and outputs."""
import copy
import functools

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

import model as models
from model import resnet

CASES = {
    'resnet50': lambda: torchvision.models.resnet50(),
    'resnet152': lambda: torchvision.models.resnet152(),
    'resnext101_32x4d': lambda: ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4),
}


@functools.lru_cache(maxsize=None)
def built(name):
    """(ours, torchvision's) of one model, each built once for the module: building the big ones is most of the
    cost (deep copies are taken where a test changes them)."""
    torch.manual_seed(0)
    return getattr(resnet, name)(), CASES[name]()


@pytest.fixture(scope='module', autouse=True)
def free_the_built_models():
    yield
    built.cache_clear()  # about 1 GB of weights


@pytest.mark.parametrize('name', list(CASES))
def test_same_state_dict_keys_and_shapes_as_torchvision(name):
    ours, theirs = (model.state_dict() for model in built(name))
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours)


@pytest.mark.parametrize('name', list(CASES))
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_same_outputs_as_torchvision_with_the_same_weights(name, mode):
    ours, theirs = (copy.deepcopy(model) for model in built(name))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    getattr(ours, mode)()
    getattr(theirs, mode)()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    if mode == 'train':  # BatchNorm running statistics moved the same way
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)


def test_resnext101_32x4d_size_and_stage_widths():
    net = resnet.resnext101_32x4d()
    assert sum(p.numel() for p in net.parameters()) == 44_177_704
    assert [getattr(net, f'layer{i}')[0].conv2.in_channels for i in range(1, 5)] == [128, 256, 512, 1024]
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)  # v1.5


def test_initialisation_follows_torchvision():
    torch.manual_seed(0)
    net = resnet.resnet50()
    conv = net.layer3[0].conv2
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    expected_std = (2.0 / fan_out) ** 0.5  # kaiming_normal_, mode='fan_out', relu gain
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    assert torch.all(net.bn1.weight == 1) and torch.all(net.bn1.bias == 0)
    zero = resnet.resnet50(zero_init_residual=True)
    assert torch.all(zero.layer1[0].bn3.weight == 0)


def test_factory_builds_local_resnets_and_torchvision_models_with_the_dataset_head():
    assert isinstance(models.create_model('resnext101_32x4d', num_classes=10), resnet.ResNet)
    assert models.create_model('resnet50', num_classes=10).fc.out_features == 10
    assert models.create_model('mobilenet_v2', num_classes=7).classifier[1].out_features == 7
    with pytest.raises(models.ModelError, match="unknown model 'resnet5'"):
        models.create_model('resnet5')


def test_pretrained_without_network_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))  # empty cache: must download
    monkeypatch.setattr(torch.hub, 'download_url_to_file', _no_network)
    with pytest.raises(models.ModelError, match='could not fetch pretrained weights for resnet50'):
        models.create_model('resnet50', pretrained=True)
    with pytest.raises(models.ModelError, match='no pretrained weights for resnext101_32x4d'):
        models.create_model('resnext101_32x4d', pretrained=True)


def _no_network(url, *args, **kwargs):
    import urllib.error
    raise urllib.error.URLError('network is unreachable')
