"""Repeatable CUDA runs (train.py --deterministic, main.py --seed): cuDNN's and torch's deterministic settings,
made before the first CUDA call; the operations torch documents as having no deterministic CUDA kernel, as aten
ops; a recorder of the aten ops a training step runs; and a deterministic route for the one such op our models
use, the 4x4 adaptive average pooling of GoogLeNet's auxiliary classifiers (docs/devices.md, Deterministic CUDA
runs)."""
import os

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.googlenet import InceptionAux

from .cli import UsageError

CUBLAS_WORKSPACE_VARIABLE = 'CUBLAS_WORKSPACE_CONFIG'
# The two workspace configurations with which cuBLAS picks the same reduction order on every call (CUDA >= 10.2).
DETERMINISTIC_CUBLAS_WORKSPACES = (':4096:8', ':16:8')

# main.py's warning for --seed, as pytorch/examples gives one (in our words): what seeding turns on and costs.
SEED_WARNING = ('warning: --seed: deterministic cuDNN and torch kernels are on, which can make training noticeably '
                'slower; a resumed run repeats the uninterrupted one when it resumes with the same settings')

# torch.use_deterministic_algorithms' docstring, the list "will throw a RuntimeError when mode=True", each entry
# (the name it documents) with the aten ops (overload packets) whose CUDA kernel raises. For most entries only the
# backward raises: the op named is the backward the autograd formula calls, e.g. AdaptiveAvgPool2d's
# aten._adaptive_avg_pool2d_backward, whose CUDA kernel raises as "adaptive_avg_pool2d_backward_cuda". The mapping
# is by op, not by the entry's condition (reduce='prod', mode='max', a quantized tensor): an op listed may still
# run deterministically with other arguments, never the reverse. tests/test_determinism.py holds it against the
# docstring of the installed torch.
NONDETERMINISTIC_ON_CUDA = {
    'torch.nn.AvgPool3d': ('aten.avg_pool3d_backward',),
    'torch.nn.AdaptiveAvgPool2d': ('aten._adaptive_avg_pool2d_backward',),
    'torch.nn.AdaptiveAvgPool3d': ('aten._adaptive_avg_pool3d_backward',),
    'torch.nn.AdaptiveMaxPool2d': ('aten.adaptive_max_pool2d_backward',),
    'torch.nn.FractionalMaxPool2d': ('aten.fractional_max_pool2d_backward',),
    'torch.nn.FractionalMaxPool3d': ('aten.fractional_max_pool3d_backward',),
    'torch.nn.MaxUnpool1d': ('aten.max_unpool2d',),  # F.max_unpool1d runs max_unpool2d on an unsqueezed tensor
    'torch.nn.MaxUnpool2d': ('aten.max_unpool2d',),
    'torch.nn.MaxUnpool3d': ('aten.max_unpool3d',),
    'torch.nn.functional.interpolate': ('aten.upsample_linear1d_backward', 'aten.upsample_bilinear2d_backward',
                                        'aten.upsample_bicubic2d_backward', 'aten.upsample_trilinear3d_backward',
                                        'aten._upsample_bilinear2d_aa_backward',
                                        'aten._upsample_bicubic2d_aa_backward'),
    'torch.nn.ReflectionPad1d': ('aten.reflection_pad1d_backward',),
    'torch.nn.ReflectionPad2d': ('aten.reflection_pad2d_backward',),
    'torch.nn.ReflectionPad3d': ('aten.reflection_pad3d_backward',),
    # Only the spatial kernel raises (NLLLoss2d.cu, "nll_loss2d_forward_out_cuda_template"); the (N, C) loss of a
    # classifier runs nll_loss_forward, whose CUDA reduction is one block in a fixed order (Loss.cu).
    'torch.nn.NLLLoss': ('aten.nll_loss2d_forward',),
    'torch.nn.CTCLoss': ('aten._ctc_loss_backward',),
    'torch.nn.EmbeddingBag': ('aten._embedding_bag_backward', 'aten._embedding_bag_dense_backward'),
    'torch.Tensor.put_': ('aten.put_', 'aten.put'),
    'torch.histc': ('aten.histc',),
    'torch.bincount': ('aten.bincount',),
    'torch.median': ('aten.median', 'aten.nanmedian'),
    'torch.nn.functional.grid_sample': ('aten.grid_sampler_2d_backward', 'aten.grid_sampler_3d_backward',
                                        'aten.cudnn_grid_sampler_backward'),
    'torch.Tensor.scatter_reduce': ('aten.scatter_reduce', 'aten.scatter_reduce_'),
    'torch.Tensor.resize_': ('aten.resize_',),
}


def documented_entry_of(op_name):
    """The docstring entry (e.g. 'torch.nn.AdaptiveAvgPool2d') under which `op_name` is listed, or None."""
    return next((entry for entry, ops in NONDETERMINISTIC_ON_CUDA.items() if op_name in ops), None)


def nondeterministic_on_cuda(op_names):
    """The ops of `op_names` that NONDETERMINISTIC_ON_CUDA lists, sorted."""
    listed = {op for ops in NONDETERMINISTIC_ON_CUDA.values() for op in ops}
    return sorted(listed.intersection(op_names))


# --- the settings -------------------------------------------------------------------------------------------------

def check_cublas_workspace(environ):
    """A CUBLAS_WORKSPACE_CONFIG the user set must be one of the deterministic ones."""
    value = environ.get(CUBLAS_WORKSPACE_VARIABLE)
    if value is not None and value not in DETERMINISTIC_CUBLAS_WORKSPACES:
        raise UsageError(f'{CUBLAS_WORKSPACE_VARIABLE}={value!r}: deterministic cuBLAS needs '
                         f"{' or '.join(map(repr, DETERMINISTIC_CUBLAS_WORKSPACES))}; unset it or set one of those")


def enable_cuda_determinism():
    """Repeatable CUDA kernels, before the first CUDA call: CUBLAS_WORKSPACE_CONFIG (':4096:8' unless the user set
    ':16:8'; any other value is a UsageError naming the variable), cuDNN's autotuner off and its deterministic
    algorithms on, and torch's deterministic algorithms (an op without one raises; check_model turns that into
    a warning for the ops it finds). Prints one line."""
    check_cublas_workspace(os.environ)
    os.environ.setdefault(CUBLAS_WORKSPACE_VARIABLE, DETERMINISTIC_CUBLAS_WORKSPACES[0])
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
    print(f'deterministic CUDA kernels: cudnn.benchmark off, cudnn.deterministic on, '
          f'torch.use_deterministic_algorithms(True), {CUBLAS_WORKSPACE_VARIABLE}='
          f'{os.environ[CUBLAS_WORKSPACE_VARIABLE]} (slower; docs/devices.md)')


def settings():
    """The determinism settings in effect, for the metrics header and the tests."""
    return dict(cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_deterministic=torch.backends.cudnn.deterministic,
                deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                cublas_workspace_config=os.environ.get(CUBLAS_WORKSPACE_VARIABLE))


# --- recording the ops of a step ----------------------------------------------------------------------------------

class OpRecorder(TorchDispatchMode):
    """Collects the aten ops (overload packets, e.g. 'aten.convolution_backward') that run while it is active,
    the backward's included: the ops after autograd and after composite ops are decomposed, as the device's
    kernels see them."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def ops_on_meta(model, image_size, loss, batch=2):
    """The aten ops of a training step of `model` (in training mode, so GoogLeNet's aux heads run) on a
    (batch, 3, image_size, image_size) batch and class-index targets, run on the meta device: shapes only,
    nothing computed, and the model's tensors and mode are left as they were."""
    def meta(tensor):
        return torch.empty_like(tensor, device='meta').requires_grad_(tensor.requires_grad)
    tensors = {name: meta(p) for name, p in model.named_parameters()}
    tensors.update({name: meta(b) for name, b in model.named_buffers()})
    images = torch.empty(batch, 3, image_size, image_size, device='meta')
    targets = torch.zeros(batch, dtype=torch.long, device='meta')
    was_training = model.training
    model.train()
    try:
        with OpRecorder() as recorder:
            loss(torch.func.functional_call(model, tensors, (images,)), targets).backward()
    finally:
        model.train(was_training)
    return recorder.ops


def check_model(model, image_size, loss, flag):
    """After make_deterministic: the documented non-deterministic CUDA ops a training step of `model` still runs
    (recorded on the meta device). When there are some, and enable_cuda_determinism ran, torch warns instead of
    raising on them, and one line at start says what will not repeat. A model the meta device cannot run (one
    that reads a value, an op without a meta kernel) is treated the same way. Returns those ops ([] for none,
    None when the model could not be recorded)."""
    try:
        ops = nondeterministic_on_cuda(ops_on_meta(model, image_size, loss))
        reason = 'no deterministic CUDA kernel for ' + ', '.join(f'{op} ({documented_entry_of(op)})' for op in ops)
    except (NotImplementedError, RuntimeError) as err:
        ops, reason = None, (f'its ops could not be checked for kernels without a deterministic CUDA version '
                             f'(on the meta device: {str(err).splitlines()[0]})')
    if ops != [] and torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(True, warn_only=True)
        print(f'note: {flag}: {reason}; such results may differ between runs, so the weights may not repeat bit '
              'for bit (torch warns instead of stopping)')
    return ops


# --- GoogLeNet's auxiliary classifiers ----------------------------------------------------------------------------

def adaptive_windows(size, count):
    """The (start, end) windows of adaptive pooling from `size` to `count` cells: floor(i * size / count) to
    ceil((i + 1) * size / count), as torch's kernels."""
    return [(i * size // count, -(-(i + 1) * size // count)) for i in range(count)]


def window_means(x, dim, count):
    """The means of x over the adaptive windows of dimension `dim`, concatenated along it."""
    return torch.cat([x.narrow(dim, start, end - start).mean(dim, keepdim=True)
                      for start, end in adaptive_windows(x.shape[dim], count)], dim)


def adaptive_avg_pool2d_by_slices(x, output_size):
    """F.adaptive_avg_pool2d(x, output_size) as the means of slices: the row windows' means, then the column
    windows' means of those (a window's mean is the mean of its rows' means). Its backward is slicing, expanding
    and adding, all deterministic on CUDA; no matmul, so TF32 does not change its precision."""
    rows, cols = output_size
    return window_means(window_means(x, -2, rows), -1, cols)


class DeterministicInceptionAux(InceptionAux):
    """torchvision's InceptionAux (same parameters and state_dict keys) whose 4x4 average pooling has a
    deterministic CUDA backward: adaptive_avg_pool2d_by_slices instead of F.adaptive_avg_pool2d."""

    def forward(self, x):
        x = adaptive_avg_pool2d_by_slices(x, (4, 4))
        x = self.conv(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x), inplace=True)
        x = self.dropout(x)
        return self.fc2(x)


def make_deterministic(model):
    """Swaps the class of every torchvision InceptionAux in `model` for DeterministicInceptionAux (the module,
    its parameters and checkpoints stay as they are). Returns the names of the modules changed."""
    changed = []
    for name, module in model.named_modules():
        if type(module) is InceptionAux:
            module.__class__ = DeterministicInceptionAux
            changed.append(name)
    return changed
