"""Deterministic CUDA runs (classification/determinism.py): the settings, the documented non-deterministic ops
against the installed torch's docstring, the op audit of our models (recorded on the CPU) and GoogLeNet's
auxiliary classifiers' deterministic pooling against torchvision's. What only a GPU shows (the same weights
twice, the cost in img/s) is in benchmarks/gpu_check.py."""
import copy
import functools
import os
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.googlenet import InceptionAux

import main as googlenet_trainer
import model as models
from classification import determinism, training
from classification.cli import UsageError

AUDITED_MODELS = ('resnet18', 'resnet50', 'resnext101_32x4d', 'mobilenet_v2', 'googlenet')
CLASSES = 10
# The ops recorded do not depend on the input size (an adaptive pooling to 1x1 runs as a mean at any size; one to
# 4x4 as aten._adaptive_avg_pool2d, even from 4x4). 96 px gives GoogLeNet's aux heads 6x6: overlapping windows.
IMAGE_SIZE = 64
GOOGLENET_IMAGE_SIZE = 96


@functools.lru_cache(maxsize=None)
def built(name):
    """The model as the trainers build it (googlenet as main.py does: with its auxiliary classifiers), built once
    for the module; tests that change it take a deep copy."""
    torch.manual_seed(0)
    if name == 'googlenet':
        return googlenet_trainer.build_model(name, CLASSES, pretrained=False, aux_logits=True, resuming=False)
    return models.create_model(name, num_classes=CLASSES)


@pytest.fixture(scope='module', autouse=True)
def one_thread_and_the_built_models_freed():
    """The steps here are tiny: one thread runs them faster than torch's pool, which spins on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    built.cache_clear()


def main_py_loss(label_smoothing=0.1):
    """The loss of a training step as main.py's training_loss computes it (aux heads included for googlenet)."""
    criterion = training.make_criterion(label_smoothing)
    return functools.partial(googlenet_trainer.training_loss, criterion)


def image_size(name):
    return GOOGLENET_IMAGE_SIZE if name == 'googlenet' else IMAGE_SIZE


def training_step_ops(model, size, mix=None):
    """The aten ops of a forward, main.py's loss and a backward of `model` in training mode on the CPU, a batch of
    2 (`mix`: mixup or cutmix applied to it first, its ops recorded too)."""
    model.train()
    torch.manual_seed(0)
    images, targets = torch.randn(2, 3, size, size), torch.tensor([1, 2])
    with determinism.OpRecorder() as recorder:
        if mix is not None:
            images, targets = mix(images, targets)
        main_py_loss()(model(images), targets).backward()
    model.zero_grad(set_to_none=True)
    return recorder.ops


# --- the documented list, against the installed torch -------------------------------------------------------------

def raising_entries(docstring):
    """The names of the entries of torch.use_deterministic_algorithms' list "will throw a RuntimeError" (each
    entry starts a line with ``* :class:`name``` or ``* :func:`name```)."""
    section = re.split(r'operations\s+will\s+throw\s+a', docstring, maxsplit=1)[1].split('In addition', 1)[0]
    return set(re.findall(r'^\s*\* :(?:class|func):`([\w.]+)`', section, flags=re.MULTILINE))


def test_every_entry_torch_documents_as_raising_is_mapped_to_aten_ops():
    # Entries without a device in their condition (MaxUnpool*, resize_ of a quantized tensor) raise on CUDA too,
    # so every entry of the list is a CUDA entry. A torch upgrade that adds or drops one fails here.
    entries = raising_entries(torch.use_deterministic_algorithms.__doc__)
    assert len(entries) > 20  # the list was found and parsed
    assert entries == set(determinism.NONDETERMINISTIC_ON_CUDA)


def test_every_mapped_op_is_an_aten_op_of_this_torch():
    ops = {op for ops in determinism.NONDETERMINISTIC_ON_CUDA.values() for op in ops}
    assert all(op.startswith('aten.') and hasattr(torch.ops.aten, op[len('aten.'):]) for op in ops), sorted(ops)


def test_the_recorder_names_the_backward_of_adaptive_average_pooling_as_the_list_does():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    with determinism.OpRecorder() as recorder:
        F.adaptive_avg_pool2d(x, (4, 4)).sum().backward()
    assert determinism.nondeterministic_on_cuda(recorder.ops) == ['aten._adaptive_avg_pool2d_backward']
    assert determinism.documented_entry_of('aten._adaptive_avg_pool2d_backward') == 'torch.nn.AdaptiveAvgPool2d'


# --- the audit of our models --------------------------------------------------------------------------------------
# Recorded on the CPU: the TorchDispatchMode sees the aten ops after autograd, with composite ops decomposed the
# same way as on CUDA (the resnets', MobileNetV2's and GoogLeNet's 1x1 global pooling becomes aten.mean on both;
# the aux heads' 4x4 pooling aten._adaptive_avg_pool2d, whose backward aten._adaptive_avg_pool2d_backward is the
# op whose CUDA kernel raises as "adaptive_avg_pool2d_backward_cuda"). The ops that differ by device are backend
# choices below one name (cudnn_batch_norm for native_batch_norm, cuDNN convolutions under aten.convolution),
# none of them in the list. The list is compared by aten op, not by the CUDA kernel's alert name.

def test_without_the_swap_googlenets_aux_heads_run_the_one_listed_op():
    model = copy.deepcopy(built('googlenet'))
    ops = training_step_ops(model, GOOGLENET_IMAGE_SIZE)
    assert determinism.nondeterministic_on_cuda(ops) == ['aten._adaptive_avg_pool2d_backward']


@pytest.mark.parametrize('name', AUDITED_MODELS)
def test_after_make_deterministic_no_model_runs_a_listed_op(name):
    model = copy.deepcopy(built(name))
    changed = determinism.make_deterministic(model)
    assert changed == (['aux1', 'aux2'] if name == 'googlenet' else [])
    ops = training_step_ops(model, image_size(name))
    assert 'aten.convolution_backward' in ops  # the backward was recorded
    assert determinism.nondeterministic_on_cuda(ops) == []


def test_mixup_cutmix_probabilities_and_label_smoothing_run_no_listed_op():
    model = copy.deepcopy(built('resnet18'))
    ops = set()
    for mix in training.make_batch_mix(0.2, 0.0, CLASSES), training.make_batch_mix(0.0, 1.0, CLASSES):
        ops |= training_step_ops(model, IMAGE_SIZE, mix=mix)
    assert 'aten.nll_loss_forward' not in ops  # the loss took probabilities
    assert determinism.nondeterministic_on_cuda(ops) == []


def test_the_meta_device_records_the_ops_the_cpu_runs():
    model = copy.deepcopy(built('googlenet')).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    on_meta = determinism.ops_on_meta(model, GOOGLENET_IMAGE_SIZE, main_py_loss())
    # the model is untouched: weights, BatchNorm statistics, no gradients, still in evaluation mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert on_meta == training_step_ops(model, GOOGLENET_IMAGE_SIZE)


# --- the settings -------------------------------------------------------------------------------------------------

@pytest.fixture
def global_settings():
    """Restores cuDNN's flags, torch's deterministic mode and CUBLAS_WORKSPACE_CONFIG after the test."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             os.environ.get(determinism.CUBLAS_WORKSPACE_VARIABLE))
    os.environ.pop(determinism.CUBLAS_WORKSPACE_VARIABLE, None)
    yield
    cudnn.benchmark, cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    os.environ.pop(determinism.CUBLAS_WORKSPACE_VARIABLE, None)
    if saved[4] is not None:
        os.environ[determinism.CUBLAS_WORKSPACE_VARIABLE] = saved[4]


def test_enabling_sets_cudnn_torch_and_cublas_and_says_so_in_one_line(global_settings, capsys):
    torch.backends.cudnn.benchmark = True
    determinism.enable_cuda_determinism()
    assert determinism.settings() == dict(cudnn_benchmark=False, cudnn_deterministic=True,
                                          deterministic_algorithms=True, warn_only=False,
                                          cublas_workspace_config=':4096:8')
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and 'CUBLAS_WORKSPACE_CONFIG=:4096:8' in out


def test_a_users_deterministic_cublas_workspace_is_kept(global_settings, capsys):
    os.environ[determinism.CUBLAS_WORKSPACE_VARIABLE] = ':16:8'
    determinism.enable_cuda_determinism()
    assert determinism.settings()['cublas_workspace_config'] == ':16:8'


def test_another_cublas_workspace_is_a_usage_error_naming_the_variable_and_changes_nothing(global_settings):
    os.environ[determinism.CUBLAS_WORKSPACE_VARIABLE] = ':0:0'
    before = determinism.settings()
    with pytest.raises(UsageError, match=r"^CUBLAS_WORKSPACE_CONFIG=':0:0': deterministic cuBLAS needs ':4096:8' "
                                         r"or ':16:8'"):
        determinism.enable_cuda_determinism()
    assert determinism.settings() == before


def test_check_model_warns_instead_of_raising_only_where_an_op_is_left(global_settings, capsys):
    determinism.enable_cuda_determinism()
    capsys.readouterr()
    model = copy.deepcopy(built('googlenet'))
    assert determinism.check_model(model, GOOGLENET_IMAGE_SIZE, main_py_loss(), '--seed') == \
        ['aten._adaptive_avg_pool2d_backward']
    line = capsys.readouterr().out
    assert line.count('\n') == 1 and line.startswith('note: --seed: no deterministic CUDA kernel for '
                                                     'aten._adaptive_avg_pool2d_backward (torch.nn.AdaptiveAvgPool2d);')
    assert determinism.settings()['warn_only']
    torch.use_deterministic_algorithms(True)
    determinism.make_deterministic(model)
    assert determinism.check_model(model, GOOGLENET_IMAGE_SIZE, main_py_loss(), '--seed') == []
    assert capsys.readouterr().out == '' and not determinism.settings()['warn_only']


class ReadsAValue(torch.nn.Module):
    """A model whose forward reads a tensor's value, which the meta device cannot give."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, CLASSES)

    def forward(self, x):
        return self.fc(x.mean((2, 3))) * (1.0 if x.sum().item() else 0.0)


def test_a_model_the_meta_device_cannot_run_is_taken_as_not_repeating(global_settings, capsys):
    determinism.enable_cuda_determinism()
    capsys.readouterr()
    assert determinism.check_model(ReadsAValue(), IMAGE_SIZE, main_py_loss(), '--deterministic') is None
    line = capsys.readouterr().out
    assert line.count('\n') == 1 and line.startswith('note: --deterministic: its ops could not be checked')
    assert 'Tensor.item() cannot be called on meta tensors' in line and determinism.settings()['warn_only']


# --- GoogLeNet's auxiliary classifiers ----------------------------------------------------------------------------

def test_the_windows_are_torchs_adaptive_pooling_windows():
    assert determinism.adaptive_windows(14, 4) == [(0, 4), (3, 7), (7, 11), (10, 14)]
    assert determinism.adaptive_windows(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert determinism.adaptive_windows(3, 4) == [(0, 1), (0, 2), (1, 3), (2, 3)]


def aux_pair(in_channels=512):
    """torchvision's InceptionAux and the deterministic one, with the same weights."""
    torch.manual_seed(0)
    theirs = InceptionAux(in_channels, CLASSES)
    ours = copy.deepcopy(theirs)
    ours.__class__ = determinism.DeterministicInceptionAux
    return theirs, ours


def close(a, b):
    """Equal within float32 rounding: relative 1e-5 of each value, or 1e-5 of the tensor's largest one."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def output_and_gradients(module, x):
    """The module's output in training mode (dropout from seed 0) and the gradients of its input and weights."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(0)
    module.train()
    out = module(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    return out, grads


# 224 px input -> 14x14 at the aux heads, 128 -> 8x8, 96 -> 6x6, 64 -> 4x4; odd and uneven sizes; fewer than 4.
@pytest.mark.parametrize('height, width', [(14, 14), (8, 8), (6, 6), (4, 4), (7, 7), (9, 13), (11, 5), (3, 2)])
def test_the_aux_route_equals_torchvisions_outputs_and_gradients(height, width):
    theirs, ours = aux_pair()
    x = torch.randn(2, 512, height, width)
    (out_a, grads_a), (out_b, grads_b) = output_and_gradients(theirs, x), output_and_gradients(ours, x)
    assert close(out_a, out_b) and all(close(a, b) for a, b in zip(grads_a, grads_b))


def test_in_float64_the_aux_route_is_torchvisions_to_the_last_bits():
    theirs, ours = aux_pair()
    x = torch.randn(2, 512, 14, 14, dtype=torch.float64)
    (out_a, grads_a), (out_b, grads_b) = (output_and_gradients(module.double(), x) for module in (theirs, ours))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip([out_a, *grads_a], [out_b, *grads_b]))


def test_the_aux_routes_backward_runs_no_listed_op():
    _, ours = aux_pair(16)
    x = torch.randn(2, 16, 14, 14, requires_grad=True)
    with determinism.OpRecorder() as recorder:
        ours(x).sum().backward()
    assert 'aten.slice_backward' in recorder.ops and determinism.nondeterministic_on_cuda(recorder.ops) == []


def test_a_swapped_googlenet_equals_torchvisions_and_keeps_its_checkpoints():
    size = 83  # 5x5 at the aux heads: overlapping windows
    torch.manual_seed(0)
    theirs = torchvision.models.googlenet(num_classes=CLASSES, aux_logits=True, init_weights=True)
    ours = copy.deepcopy(theirs)
    assert determinism.make_deterministic(ours) == ['aux1', 'aux2']
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 3, size, size)
    outputs = []
    for model in theirs, ours:
        torch.manual_seed(0)
        model.train()
        out = model(x)
        loss = googlenet_trainer.training_loss(training.make_criterion(), out, torch.tensor([1, 2]))
        outputs.append((out, torch.autograd.grad(loss, list(model.parameters()))))
    (out_a, grads_a), (out_b, grads_b) = outputs
    assert all(close(a, b) for a, b in zip(out_a, out_b)) and all(close(a, b) for a, b in zip(grads_a, grads_b))
    theirs.load_state_dict(ours.state_dict())  # checkpoints stay interchangeable
