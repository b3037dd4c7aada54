"""Habana-style mixed precision from op lists (`--hmp --hmp-bf16 F --hmp-fp32 F`) for CPU and CUDA.

On Gaudi, hmp.convert() makes every op named in the bf16 list run in bfloat16 and every op in the
fp32 list run in float32; any other op runs in the dtype of its inputs. Here a TorchFunctionMode does
the same above autograd: it casts the floating-point inputs of listed ops, so backward flows through
ordinary cast nodes and gradients reach the fp32 weights in fp32.
"""
import os

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from utils import UsageError

# Where an op's name in a list can be found as a callable that the mode will be handed.
NAMESPACES = (torch, F, torch.Tensor, torch._C._nn)
# nn.ReLU6 is implemented with F.hardtanh(0, 6), so that is what the mode sees for 'relu6'.
ALIASES = {'relu6': ('relu6', 'hardtanh')}


def read_op_list(path, flag):
    """Op names from a list file: one per line, blank lines and '#' comments ignored."""
    if not path:
        raise UsageError(f'{flag}: --hmp needs an op list file, e.g. {flag} ops_bf16_Resnet.txt')
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: op list file '{path}' does not exist")
    with open(path) as f:
        return [line.split('#')[0].strip() for line in f if line.split('#')[0].strip()]


def resolve_ops(names, flag, path):
    """Map op names to the set of torch callables that implement them; unknown names are an error."""
    funcs = set()
    for name in names:
        found = [getattr(ns, attr) for attr_base in ALIASES.get(name, (name,))
                 for attr in (attr_base, attr_base + '_') for ns in NAMESPACES
                 if callable(getattr(ns, attr, None))]
        if not found:
            raise UsageError(f"{flag}: '{name}' in {path} is not a torch op")
        funcs.update(found)
    return funcs


def _cast(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    return obj


class OpListPrecision(TorchFunctionMode):
    """While active, listed ops get their floating-point inputs cast to bf16 or fp32."""

    def __init__(self, bf16_funcs, fp32_funcs, low_dtype=torch.bfloat16):
        super().__init__()
        self.target = {func: torch.float32 for func in fp32_funcs}
        self.target.update({func: low_dtype for func in bf16_funcs})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.target.get(func)
        if dtype is not None:
            args = _cast(args, dtype)
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def from_op_files(bf16_path, fp32_path):
    bf16 = resolve_ops(read_op_list(bf16_path, '--hmp-bf16'), '--hmp-bf16', bf16_path)
    fp32 = resolve_ops(read_op_list(fp32_path, '--hmp-fp32'), '--hmp-fp32', fp32_path)
    return OpListPrecision(bf16, fp32)
