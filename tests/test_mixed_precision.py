"""--hmp on CPU/CUDA: the ops named in the lists really run in the listed dtypes."""
import os
from collections import defaultdict

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, TINY_IMAGES, run_script

import devices
import utils

OPS = {name: os.path.join(REPO, f'ops_{name}.txt') for name in
       ('bf16_Resnet', 'fp32_Resnet', 'bf16_Mobilenet', 'fp32_Mobilenet', 'bf16_googlenet', 'fp32_googlenet')}


class DtypeRecorder(TorchDispatchMode):
    """Notes the dtype of the first tensor argument of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.seen = defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is not None:
            self.seen[func.overloadpacket.__name__].add(tensor.dtype)
        return func(*args, **(kwargs or {}))


def step_dtypes(dev, model):
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with DtypeRecorder() as recorder:
        with dev.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return recorder.seen, loss


def test_resnet_lists_run_convolution_and_linear_in_bf16_and_the_loss_in_fp32():
    dev = devices.create('cpu', hmp=devices.HmpConfig(OPS['bf16_Resnet'], OPS['fp32_Resnet']))
    model = torchvision.models.resnet18(num_classes=4)
    seen, loss = step_dtypes(dev, model)
    assert seen['convolution'] == {torch.bfloat16}
    assert seen['addmm'] == {torch.bfloat16}                   # linear
    assert seen['_log_softmax'] == {torch.float32}             # cross_entropy
    assert seen['nll_loss_forward'] == {torch.float32}
    assert seen['native_batch_norm'] == {torch.bfloat16}       # unlisted: follows its input
    assert loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_the_lists_decide_not_a_built_in_policy(tmp_path):
    swapped_bf16, swapped_fp32 = tmp_path / 'bf16.txt', tmp_path / 'fp32.txt'
    swapped_bf16.write_text('linear\n# comments and blank lines are allowed\n\n')
    swapped_fp32.write_text('conv2d\ncross_entropy\n')
    dev = devices.create('cpu', hmp=devices.HmpConfig(str(swapped_bf16), str(swapped_fp32)))
    seen, _ = step_dtypes(dev, torchvision.models.resnet18(num_classes=4))
    assert seen['convolution'] == {torch.float32}
    assert seen['addmm'] == {torch.bfloat16}


def test_mobilenet_relu6_runs_in_bf16():
    dev = devices.create('cpu', hmp=devices.HmpConfig(OPS['bf16_Mobilenet'], OPS['fp32_Mobilenet']))
    seen, _ = step_dtypes(dev, torchvision.models.mobilenet_v2(num_classes=4))
    assert seen['hardtanh'] | seen['hardtanh_'] == {torch.bfloat16}  # nn.ReLU6 is hardtanh(0, 6)
    assert seen['convolution'] == {torch.bfloat16}


def test_without_hmp_everything_stays_fp32():
    seen, _ = step_dtypes(devices.create('cpu'), torchvision.models.resnet18(num_classes=4))
    assert seen['convolution'] == {torch.float32} and seen['addmm'] == {torch.float32}


def test_op_list_files_of_the_original_are_all_present_and_valid():
    import mixed_precision
    for name, path in OPS.items():
        ops = mixed_precision.read_op_list(path, '--hmp-' + name[:4])
        mixed_precision.resolve_ops(ops, '--hmp-' + name[:4], path)
        assert len(ops) == (11 if name.startswith('bf16') else 5)


@pytest.mark.parametrize('content, message', [
    (None, "--hmp-bf16: op list file '.*' does not exist"),
    ('conv2d\nconv2dd\n', "--hmp-bf16: 'conv2dd' in .* is not a torch op"),
])
def test_op_list_mistakes_are_clear_errors(tmp_path, content, message):
    path = tmp_path / 'ops.txt'
    if content is not None:
        path.write_text(content)
    with pytest.raises(utils.UsageError, match=message):
        devices.create('cpu', hmp=devices.HmpConfig(str(path), OPS['fp32_Resnet']))


def test_train_py_with_hmp_trains_on_cpu(jpeg_dataset, tmp_path):
    result = run_script(['train.py', '--data-path', jpeg_dataset, '--output-dir', str(tmp_path), '--device', 'cpu',
                         '--model', 'resnet18', '--batch-size', '8', '--workers', '0', '--epochs', '1',
                         '--num-train-steps', '2', '--dl-worker-type', 'MP', '--hmp', '--hmp-bf16', OPS['bf16_Resnet'],
                         '--hmp-fp32', OPS['fp32_Resnet'], *TINY_IMAGES])
    assert result.returncode == 0, result.stderr[-2000:]
    assert ' * Acc@1 ' in result.stdout
