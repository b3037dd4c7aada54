"""--blurpool (classification/blurpool.py): FFCV's fixed 3x3 blur before every conv of stride > 1 on at least 16
channels. The filter and the rule on their own; the model without the flag is torchvision's; the device layer
carries the filter (channels-last, the HPU permutation, the EMA); a round trip on real JPEGs (train, resume,
inference.py) in-process; the refusals (exit 2, one line). The one slow test runs the scripts as processes."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from conftest import TINY_IMAGES, HPUDeviceOnCPU, run_in_process, run_script

from classification import blurpool, checkpoints, cli, data, training
from classification.blurpool import BlurPool2d
import inference
import main as googlenet
import train

CLASSES = [f'class_{c:02d}' for c in range(4)]  # jpeg_dataset
RESIZE, CROP = 40, 32  # TINY_IMAGES
TRAIN = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '2',
         '--dl-worker-type', 'MP', '--epochs', '1', '--lr', '0.01', *TINY_IMAGES]


def the_rule(module):
    """FFCV's rule written out again: a Conv2d that subsamples on at least 16 input channels."""
    return type(module) is nn.Conv2d and (module.stride[0] > 1 or module.stride[1] > 1) and module.in_channels >= 16


def run_inference(argv):
    """inference.py's __main__ in this process: the exit status (0 when main returns)."""
    try:
        cli.run_cli(inference.main, inference.get_args_parser().parse_args(argv))
        return 0
    except SystemExit as exit_:
        return exit_.code


def error_lines(err):
    return [line for line in err.splitlines() if line.strip()]


# --- the filter and the rule ------------------------------------------------------------------------------------

def test_the_filter_is_1_2_1_outer_itself_over_16_in_a_buffer_the_optimizer_never_sees():
    layer = BlurPool2d(5)
    expected = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16
    assert layer.filter.shape == (5, 1, 3, 3)
    assert all(torch.equal(layer.filter[c, 0], expected) for c in range(5))
    assert list(layer.parameters()) == [] and dict(layer.named_buffers()) == {'filter': layer.filter}
    assert list(layer.state_dict()) == ['filter']

    model = nn.Sequential(BlurPool2d(16), nn.Conv2d(16, 4, 3, stride=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    assert sum(len(group['params']) for group in optimizer.param_groups) == 2  # the conv's weight and bias
    model(torch.randn(2, 16, 8, 8)).sum().backward()
    optimizer.step()
    assert torch.equal(model[0].filter[3, 0], expected) and not model[0].filter.requires_grad


def test_the_blur_keeps_the_size_and_blurs_each_channel_on_its_own_with_zero_padding():
    layer = BlurPool2d(3)
    x = torch.zeros(1, 3, 7, 9)
    x[0, 1, 3, 4] = 16.0  # an impulse on channel 1 only
    y = layer(x)
    assert y.shape == x.shape
    assert torch.equal(y[0, 1, 2:5, 3:6], torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]))
    assert y[0, 0].abs().sum() == 0 and y[0, 2].abs().sum() == 0 and y[0, 1].sum() == 16
    ones = layer(torch.ones(1, 3, 5, 5))
    assert torch.allclose(ones[0, :, 1:-1, 1:-1], torch.ones(3, 3, 3))  # sums to 1 inside
    assert torch.allclose(ones[0, :, 0, 0], torch.full((3,), 9 / 16))  # padding 1 with zeros at the corners
    reference = F.conv2d(F.pad(x, (1, 1, 1, 1)), layer.filter, groups=3)
    assert torch.equal(y, reference)


def test_resnet50_gets_exactly_the_convs_the_rule_picks_each_behind_its_blur():
    reference = torchvision.models.resnet50()
    picked = {name: module for name, module in reference.named_modules() if the_rule(module)}
    assert sorted(picked) == sorted(f'layer{i}.0.{conv}' for i in (2, 3, 4) for conv in ('conv2', 'downsample.0'))

    model = torchvision.models.resnet50()
    convs = dict(model.named_modules())
    assert blurpool.apply_blurpool(model) == len(picked) == 6
    modules = dict(model.named_modules())
    for name in picked:
        wrapper = modules[name]
        assert type(wrapper) is nn.Sequential and len(wrapper) == 2
        assert type(wrapper[0]) is BlurPool2d and wrapper[0].channels == convs[name].in_channels
        assert wrapper[1] is convs[name]  # the same conv, weights and all
    untouched = [name for name, module in reference.named_modules() if type(module) is nn.Conv2d and name not in picked]
    assert all(type(modules[name]) is nn.Conv2d for name in untouched)  # the stem (3 channels), the stride-1 convs
    assert sum(type(m) is BlurPool2d for m in model.modules()) == 6 and blurpool.has_blurpool(model)


def test_without_the_flag_the_model_is_torchvisions_and_with_it_the_output_shape_is_the_same():
    torch.manual_seed(0)
    plain = training.build_model('resnet50', 10)
    assert list(plain.state_dict()) == list(torchvision.models.resnet50(num_classes=10).state_dict())
    assert not blurpool.has_blurpool(plain)

    torch.manual_seed(0)
    blurred = training.build_model('resnet50', 10, blurpool=True)
    assert [p.shape for p in blurred.parameters()] == [p.shape for p in plain.parameters()]  # no new parameter
    keys = set(blurred.state_dict())
    assert 'layer2.0.conv2.1.weight' in keys and 'layer2.0.conv2.0.filter' in keys and 'layer2.0.conv2.weight' not in keys
    with pytest.raises(RuntimeError):  # such weights do not load into torchvision's class (docs/recipes.md)
        torchvision.models.resnet50(num_classes=10).load_state_dict(blurred.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert blurred.eval()(x).shape == plain.eval()(x).shape == (2, 10)


def test_channels_last_and_the_hpu_weight_permutation_carry_the_filter_like_the_conv_weights(sdk):
    model = training.build_model('resnet18', 4, blurpool=True)
    laid_out = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(laid_out(x.to(memory_format=torch.channels_last)), model(x), atol=1e-5)
    assert laid_out.layer2[0].conv1[0].filter.is_contiguous(memory_format=torch.channels_last)

    dev = HPUDeviceOnCPU(channels_last=True)  # Habana's manual filters-last permutation of every 4-D tensor
    model = training.build_model('resnet18', 4, blurpool=True)
    kcrs = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = dev.make_optimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    dev.after_optimizer_created(model, optimizer)
    assert model.layer2[0].conv1[0].filter.shape == (3, 3, 1, 64)  # RSCK, as the conv weights
    assert model.layer2[0].conv1[1].weight.shape == (3, 3, 64, 128)
    with dev.checkpoint_state(model, optimizer) as (model_state, _):
        assert all(torch.equal(model_state[k], kcrs[k]) for k in kcrs)  # torchvision layout in the checkpoint
    ema = training.make_ema(model, decay=0.999, steps=1, global_batch=8, epochs=1)
    ema.update_parameters(model)
    saved = dev.module_state(ema)
    assert torch.equal(saved['module.layer2.0.conv1.0.filter'], kcrs['layer2.0.conv1.0.filter'])
    fresh = training.make_ema(model, decay=0.999, steps=1, global_batch=8, epochs=1)
    dev.load_module_state(fresh, saved)
    assert torch.equal(fresh.module.layer2[0].conv1[0].filter, model.layer2[0].conv1[0].filter)


def test_a_model_where_the_rule_finds_no_conv_is_refused_naming_the_flag_and_the_model():
    squeezenet = torchvision.models.squeezenet1_0()
    assert not any(the_rule(m) for m in squeezenet.modules())
    assert blurpool.apply_blurpool(squeezenet) == 0
    for name in ('squeezenet1_0', 'googlenet'):
        with pytest.raises(cli.UsageError, match=f'^--blurpool: {name} has no convolution with stride > 1'):
            training.check_blurpool(name, True)
        with pytest.raises(cli.UsageError, match=f'^--blurpool: {name} '):
            training.build_model(name, 4, blurpool=True)
    training.check_blurpool('squeezenet1_0', False)
    training.check_blurpool('regnet_x_400mf', True)  # its initialisation needs data: checked on the CPU


@pytest.mark.parametrize('trainer, model_name', [(train, 'squeezenet1_0'), (googlenet, 'googlenet')],
                         ids=['train.py', 'main.py'])
def test_the_trainers_refuse_it_in_one_line_exit_2_before_any_data_is_read(tmp_path, capsys, trainer, model_name):
    missing = tmp_path / 'no-such-data'
    argv = ['--data-path', str(missing), '--device', 'cpu', '--model', model_name, '--blurpool',
            '--output-dir', str(tmp_path / 'out')]
    assert run_in_process(trainer, argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f'error: --blurpool: {model_name} has no convolution'), lines
    assert not (tmp_path / 'out').exists()


# --- the round trip on real JPEGs -------------------------------------------------------------------------------

def top5(out):
    """{image path: {class name: probability}} from inference.py's stdout."""
    rows = [line.split(': ', 1) for line in out.splitlines() if ': ' in line and 'Acc@1' not in line]
    return {path: {name: float(p) for name, p in (pair.rsplit(' ', 1) for pair in ranked.split(', '))}
            for path, ranked in rows}


def test_train_resume_and_inference_rebuild_the_blurpool_model(jpeg_dataset, tmp_path, capsys):
    first, second = tmp_path / 'first', tmp_path / 'second'
    short = ['--num-train-steps', '3', '--num-eval-steps', '1', '--save-checkpoint']
    assert run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(first), *TRAIN, '--blurpool',
                                  *short]) == 0, capsys.readouterr().err
    saved = torch.load(first / 'model_0.pth', weights_only=True)
    assert saved['blurpool'] is True and saved['args']['blurpool'] is True
    assert torch.equal(saved['model']['layer2.0.conv1.0.filter'][0, 0], blurpool.blur_kernel())  # never trained
    assert sum(k.endswith('.filter') for k in saved['model']) == 6

    capsys.readouterr()
    assert run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(second), *TRAIN, '--blurpool',
                                  *short, '--epochs', '2', '--resume',
                                  str(first / 'checkpoint.pth')]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert 'Epoch: [1]' in out and 'Epoch: [0]' not in out  # resumed after epoch 0
    resumed = torch.load(second / 'model_1.pth', weights_only=True)
    assert resumed['blurpool'] is True and resumed['epoch'] == 1

    model = training.build_model('resnet18', len(CLASSES), blurpool=True)
    model.load_state_dict(resumed['model'])
    model.eval()
    images = [os.path.join(jpeg_dataset, 'val', name, sorted(os.listdir(os.path.join(jpeg_dataset, 'val', name)))[0])
              for name in CLASSES]
    batch = torch.stack([data.eval_transform(RESIZE, CROP)(Image.open(path).convert('RGB')) for path in images])
    with torch.no_grad():
        expected = torch.softmax(model(batch), dim=1)
    assert run_inference(['--checkpoint', str(second / 'model_1.pth'), *images, '--workers', '0',
                                      '--channels-last', 'True']) == 0, capsys.readouterr().err
    got = top5(capsys.readouterr().out)
    for i, path in enumerate(images):
        assert got[path] == pytest.approx({name: expected[i, j].item() for j, name in enumerate(CLASSES)}, abs=2e-4)


@pytest.mark.parametrize('written_with, resumed_with, fix', [
    (['--blurpool'], [], 'add --blurpool'), ([], ['--blurpool'], 'drop --blurpool')], ids=['dropped', 'added'])
def test_a_resume_with_the_other_blurpool_setting_is_one_line_exit_2(jpeg_dataset, tmp_path, capsys, written_with,
                                                                     resumed_with, fix):
    short = ['--num-train-steps', '1', '--num-eval-steps', '0', '--save-checkpoint', '--workers', '0']
    assert run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(tmp_path / 'a'), *TRAIN, *short,
                                  *written_with]) == 0, capsys.readouterr().err
    capsys.readouterr()
    path = tmp_path / 'a' / 'checkpoint.pth'
    assert run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(tmp_path / 'b'), *TRAIN, *short,
                                  '--epochs', '2', '--resume', str(path), *resumed_with]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: --resume: '{path}' holds a model "), lines
    assert lines[0].endswith(f'{fix} to resume it')


def test_checkpoints_record_blurpool_only_when_on_and_load_checks_it(tmp_path):
    assert 'blurpool' not in checkpoints.stamp({}, 'resnet18', 4)  # default checkpoints keep their keys
    assert checkpoints.stamp({}, 'resnet18', 4, blurpool=True)['blurpool'] is True
    plain, blurred = tmp_path / 'plain.pth', tmp_path / 'blurred.pth'
    torch.save(checkpoints.stamp({'model': {}}, 'resnet18', 4), plain)
    torch.save(checkpoints.stamp({'model': {}}, 'resnet18', 4, blurpool=True), blurred)
    assert checkpoints.load(str(plain), 'resnet18', 4, ('model',), blurpool=False)
    assert checkpoints.load(str(blurred), 'resnet18', 4, ('model',), blurpool=True)
    assert checkpoints.load(str(blurred), None, None, (), flag='--checkpoint', resuming=False)  # inference: any
    with pytest.raises(cli.UsageError, match='holds a model without BlurPool .* drop --blurpool'):
        checkpoints.load(str(plain), 'resnet18', 4, ('model',), blurpool=True)


# --- as processes -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_scripts_refuse_blurpool_on_a_model_without_a_matching_conv_in_one_line(tmp_path):
    for script, model_name in (('train.py', 'squeezenet1_0'), ('main.py', 'googlenet')):
        result = run_script([script, '--data-path', str(tmp_path / 'no-such-data'), '--device', 'cpu',
                             '--model', model_name, '--blurpool', '--output-dir', str(tmp_path / 'out')])
        assert result.returncode == 2, result.stderr[-2000:]
        lines = error_lines(result.stderr)
        assert lines == [f'error: --blurpool: {model_name} has no convolution with stride > 1 and at least 16 input '
                         'channels for BlurPool to precede; drop --blurpool'], result.stderr
        assert not (tmp_path / 'out').exists()
