"""The HPU path, driven through a recording test double of Habana's SDK (tests/fake_habana).

The double stands in for habana_frameworks only; everything under test (devices.HPUDevice,
train.train_one_epoch, the permutation helpers) is the project's real code.
"""
import os

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import REPO, TINY_IMAGES, HPUDeviceOnCPU, run_script

from classification import cli, devices, training
import train

BF16_OPS = os.path.join(REPO, 'ops_bf16_Resnet.txt')
FP32_OPS = os.path.join(REPO, 'ops_fp32_Resnet.txt')


class RecordingLoss(nn.CrossEntropyLoss):
    """Cross entropy that notes in the SDK's call record when backward reaches the loss."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, output, target):
        loss = super().forward(output, target)
        loss.register_hook(lambda grad: self.calls.append('backward') or grad)
        return loss


def one_step_calls(sdk, model_name, distributed, lazy_mode=True):
    """The SDK calls and model events of one training step, in order."""
    dev = HPUDeviceOnCPU(channels_last=False, lazy_mode=lazy_mode)
    dev.mark_points = devices.reference_mark_points(model_name, distributed)
    model = torchvision.models.resnet18(num_classes=4)
    model.register_forward_pre_hook(lambda m, i: sdk.CALLS.append('forward'))
    optimizer = dev.make_optimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    sdk.CALLS.clear()
    train.train_one_epoch(model, RecordingLoss(sdk.CALLS), optimizer, loader, dev, 0, 1, num_train_steps=1)
    return list(sdk.CALLS)


@pytest.mark.parametrize('model_name, distributed, expected', [
    ('resnet50', False, ['forward', 'backward', 'mark_step', 'optimizer_step', 'mark_step']),
    ('mobilenet_v2', False, ['forward', 'mark_step', 'backward', 'mark_step', 'optimizer_step', 'mark_step']),
    ('resnet152', False, ['mark_step', 'forward', 'backward', 'mark_step', 'optimizer_step', 'mark_step']),
    ('resnext101_32x4d', False, ['mark_step', 'forward', 'backward', 'mark_step', 'optimizer_step', 'mark_step']),
    ('resnet50', True, ['forward', 'backward', 'optimizer_step']),
    ('mobilenet_v2', True, ['forward', 'backward', 'optimizer_step']),
    ('resnet152', True, ['mark_step', 'forward', 'backward', 'optimizer_step']),
])
def test_mark_step_order_per_step_follows_the_reference(sdk, model_name, distributed, expected):
    assert one_step_calls(sdk, model_name, distributed) == expected


def test_eager_mode_never_marks_steps_and_uses_torch_sgd(sdk):
    dev = HPUDeviceOnCPU(lazy_mode=False)
    assert os.environ['PT_HPU_LAZY_MODE'] == '2'
    optimizer = dev.make_optimizer([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, weight_decay=0)
    assert type(optimizer) is torch.optim.SGD
    calls = one_step_calls(sdk, 'resnet152', distributed=False, lazy_mode=False)
    assert 'mark_step' not in calls


def test_lazy_mode_is_set_before_the_bridge_loads_and_fused_sgd_is_chosen(sdk):
    dev = HPUDeviceOnCPU(lazy_mode=True)
    assert ('load_habana_module', {'PT_HPU_LAZY_MODE': '1'}) in sdk.CALLS
    assert os.environ['MAX_WAIT_ATTEMPTS'] == '50' and os.environ['HCL_CPU_AFFINITY'] == '1'
    optimizer = dev.make_optimizer([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9, weight_decay=0)
    from habana_frameworks.torch.hpex.optimizers import FusedSGD
    assert isinstance(optimizer, FusedSGD)


def test_hmp_convert_gets_the_op_lists_and_the_step_runs_without_casts(sdk):
    hmp = devices.HmpConfig(BF16_OPS, FP32_OPS, opt_level='O1', verbose=True)
    dev = HPUDeviceOnCPU(hmp=hmp)
    assert ('hmp.convert', {'opt_level': 'O1', 'bf16_file_path': BF16_OPS, 'fp32_file_path': FP32_OPS,
                            'isVerbose': True}) in sdk.CALLS
    sdk.CALLS.clear()
    with dev.optimizer_step_context():
        sdk.CALLS.append('step')
    assert sdk.CALLS == ['hmp.disable_casts:enter', 'step', 'hmp.disable_casts:exit']


def test_hmp_op_list_is_checked_before_the_bridge_sees_it(sdk, tmp_path):
    bad = tmp_path / 'ops.txt'
    bad.write_text('conv2d\nnot_an_op\n')
    with pytest.raises(cli.UsageError, match="--hmp-bf16: 'not_an_op'"):
        HPUDeviceOnCPU(hmp=devices.HmpConfig(str(bad), FP32_OPS))
    assert not any(c[0] == 'hmp.convert' for c in sdk.CALLS if isinstance(c, tuple))


def test_hccl_init_sets_the_local_rank_and_registers_the_backend(sdk):
    dev = HPUDeviceOnCPU()
    assert dev.init_distributed(3) == 'hccl'
    assert ('hccl_registered', {'ID': '3', 'LOCAL_RANK': '3'}) in sdk.CALLS


def trained_model_and_optimizer(dev):
    """A resnet18 with one real SGD step done, so momentum buffers exist (KCRS layout)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    optimizer = dev.make_optimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    optimizer.step()
    return model, optimizer


def test_weights_and_momentum_go_filters_last_and_checkpoints_come_back_in_torchvision_layout(sdk):
    dev = HPUDeviceOnCPU(channels_last=True)
    model, optimizer = trained_model_and_optimizer(dev)
    kcrs_weights = {k: v.clone() for k, v in model.state_dict().items()}
    kcrs_momentum = optimizer.state[model.conv1.weight]['momentum_buffer'].clone()

    dev.after_optimizer_created(model, optimizer)
    assert model.conv1.weight.shape == (7, 7, 3, 64)  # RSCK
    assert optimizer.state[model.conv1.weight]['momentum_buffer'].shape == (7, 7, 3, 64)

    with dev.checkpoint_state(model, optimizer) as (model_state, optimizer_state):
        assert all(torch.equal(model_state[k], kcrs_weights[k]) for k in kcrs_weights)
        conv1_index = 0  # parameter order: conv1.weight first
        assert torch.equal(optimizer_state['state'][conv1_index]['momentum_buffer'], kcrs_momentum)
    assert model.conv1.weight.shape == (7, 7, 3, 64)  # back to RSCK after the save

    dev.load_training_state(model, optimizer, model_state, optimizer_state)
    assert model.conv1.weight.shape == (7, 7, 3, 64)
    devices.permute_params(model, to_filters_last=False)
    assert all(torch.equal(model.state_dict()[k], kcrs_weights[k]) for k in kcrs_weights)


def test_no_permutation_when_the_bridge_permutes_itself_or_channels_last_is_off(sdk):
    for permute_pass, channels_last in ((True, True), (False, False)):
        sdk.WEIGHT_PERMUTE_PASS[0] = permute_pass
        dev = HPUDeviceOnCPU(channels_last=channels_last)
        model, optimizer = trained_model_and_optimizer(dev)
        dev.after_optimizer_created(model, optimizer)
        assert model.conv1.weight.shape == (64, 3, 7, 7)


def test_permutation_round_trip_is_exact():
    conv = nn.Conv2d(3, 8, 3)
    original = conv.weight.detach().clone()
    devices.permute_params(conv, to_filters_last=True)
    assert conv.weight.shape == (3, 3, 3, 8)
    assert torch.equal(conv.weight.detach(), original.permute(2, 3, 1, 0))
    devices.permute_params(conv, to_filters_last=False)
    assert torch.equal(conv.weight.detach(), original)


@pytest.mark.slow
def test_device_hpu_without_the_bridge_is_one_clear_line(jpeg_dataset, tmp_path):
    result = run_script(['train.py', '--device', 'hpu', '--data-path', jpeg_dataset, '--output-dir',
                         str(tmp_path), *TINY_IMAGES])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr
    assert lines[0].startswith('error: --device hpu:') and '--device cuda or --device cpu' in lines[0]


def test_lars_in_lazy_mode_is_habanas_fused_lars_with_one_group_and_its_mask(sdk):
    from classification import optimizers
    dev = HPUDeviceOnCPU(lazy_mode=True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = optimizers.param_groups(model, 5e-5, lars=True)
    optimizer = dev.make_optimizer(groups, lr=9.0, momentum=0.9, weight_decay=5e-5, kind='lars',
                                   trust_coefficient=0.001)
    from habana_frameworks.torch.hpex.optimizers import FusedLars
    assert isinstance(optimizer, FusedLars)
    assert ('FusedResourceApplyMomentum', {'lr': 9.0, 'momentum': 0.9, 'weight_decay': 5e-5}) in sdk.CALLS
    # one group, model order by group: conv and fc weights scaled, BatchNorm weight/bias and the fc bias skipped
    assert ('FusedLars', {'skip_mask': [True, True, False, False, False], 'eeta': 0.001, 'eps': 0.0}) in sdk.CALLS
    assert len(optimizer.param_groups) == 1
    with pytest.raises(cli.UsageError, match='--nesterov'):
        dev.make_optimizer(groups, lr=9.0, momentum=0.9, weight_decay=5e-5, kind='lars', nesterov=True)


def test_lars_in_eager_mode_is_this_ports_lars(sdk):
    from classification import optimizers
    dev = HPUDeviceOnCPU(lazy_mode=False)
    model = nn.Linear(3, 2)
    optimizer = dev.make_optimizer(optimizers.param_groups(model, 1e-4, lars=True), lr=1.0, momentum=0.9,
                                   weight_decay=1e-4, kind='lars')
    assert type(optimizer) is optimizers.LARS


def test_the_ema_model_of_a_permuted_run_is_saved_in_torchvision_layout_and_loads_back(sdk):
    dev = HPUDeviceOnCPU(channels_last=True)
    model, optimizer = trained_model_and_optimizer(dev)
    kcrs_weights = {k: v.clone() for k, v in model.state_dict().items()}
    dev.after_optimizer_created(model, optimizer)
    ema = training.make_ema(model, decay=0.999, steps=1, global_batch=8, epochs=1)  # copies the RSCK weights
    ema.update_parameters(model)
    saved = dev.module_state(ema)
    assert saved['module.conv1.weight'].shape == (64, 3, 7, 7)
    assert all(torch.equal(saved['module.' + k], kcrs_weights[k].float()) for k in kcrs_weights if 'num_batches' not in k)
    fresh = training.make_ema(model, decay=0.999, steps=1, global_batch=8, epochs=1)
    dev.load_module_state(fresh, saved)
    assert fresh.module.conv1.weight.shape == (7, 7, 3, 64) and torch.equal(fresh.module.conv1.weight, model.conv1.weight)
