"""Habana-style mixed precision from op lists (`--hmp --hmp-bf16 F --hmp-fp32 F`) for CPU and CUDA.

On Gaudi, hmp.convert() makes every op named in the bf16 list run in bfloat16 and every op in the
fp32 list run in float32; any other op runs in the dtype of its inputs. Here a TorchFunctionMode does
the same above autograd: it casts the floating-point inputs of listed ops, so backward flows through
ordinary cast nodes and gradients reach the fp32 weights in fp32.

On a CPU without bf16 instructions those casts make training slower than fp32, and several times slower
where torch has no oneDNN bf16 kernels at all (no AVX-512 either): `cpu_bf16_support()` tells how this
CPU runs bf16, and the CPU device warns when it is not native.
"""
import os
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .cli import UsageError

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


# /proc/cpuinfo flags of instructions that compute in bf16 (x86: AVX-512 BF16, AMX, AVX-NE-CONVERT;
# aarch64: FEAT_BF16 and its SVE form).
BF16_FLAGS = {'x86': ('avx512_bf16', 'amx_bf16', 'avx_ne_convert'), 'arm': ('bf16', 'svebf16')}
# ONEDNN_MAX_CPU_ISA values that keep oneDNN below its ISAs with bf16 instructions.
ONEDNN_ISAS_WITHOUT_BF16 = {'SSE41', 'AVX', 'AVX2', 'AVX2_VNNI', 'AVX512_CORE', 'AVX512_CORE_VNNI'}


@dataclass(frozen=True)
class CpuBf16Support:
    native: bool       # torch's oneDNN computes bf16 with the CPU's bf16 instructions
    fast: bool         # torch runs bf16 convolutions and matmuls in oneDNN at all (natively, or on AVX-512
                       # by widening to fp32); otherwise in its reference kernel, many times slower
    lacks: str         # what is missing for native bf16 ('' when native)
    description: str   # the facts it was decided from


def cpu_flags(cpuinfo_path='/proc/cpuinfo'):
    """The CPU's feature flags (x86 'flags', aarch64 'Features'); None where /proc/cpuinfo is unreadable."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() in ('flags', 'Features'):
                    return set(value.split())
    except OSError:
        return None
    return None


def cpu_model(cpuinfo_path='/proc/cpuinfo'):
    """The CPU's model name ('model name' in /proc/cpuinfo), else what platform knows."""
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def cpu_family(machine=None):
    machine = (machine or platform.machine()).lower()
    if machine in ('x86_64', 'amd64', 'i386', 'i686'):
        return 'x86'
    return 'arm' if machine.startswith(('aarch64', 'arm')) else machine


def torch_cpu_capability():
    """ATen's vector ISA for CPU kernels ('AVX512', 'AVX2', 'DEFAULT', ...; ATEN_CPU_CAPABILITY lowers it)."""
    get = getattr(getattr(torch.backends, 'cpu', None), 'get_cpu_capability', None)
    return get() if get is not None else 'unknown'


def onednn_bf16_supported():
    """torch's own test before it hands a bf16 convolution to oneDNN: oneDNN's ISA (ONEDNN_MAX_CPU_ISA caps
    it) is AVX-512 or has bf16 instructions. When it fails, bf16 convolutions run in torch's slow reference
    kernel (aten::_slow_conv2d)."""
    check = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    return bool(check()) if check is not None and torch.backends.mkldnn.is_available() else False


def cpu_bf16_support(environ=None):
    """How this CPU runs bf16, and the facts that decided it."""
    return decide_bf16_support(cpu_flags(), cpu_family(), onednn_bf16_supported(), torch_cpu_capability(),
                               (os.environ if environ is None else environ).get('ONEDNN_MAX_CPU_ISA', '').strip())


def decide_bf16_support(flags, family, onednn, capability, isa_cap=''):
    """flags: the CPU's feature flags (None: unknown); onednn: torch's oneDNN bf16 test."""
    present = [f for f in BF16_FLAGS.get(family, ()) if f in flags] if flags is not None else None
    capped = isa_cap.upper() in ONEDNN_ISAS_WITHOUT_BF16
    native = onednn and not capped and (bool(present) if present is not None else True)
    if native:
        lacks = ''
    elif present and capped:
        lacks = 'ONEDNN_MAX_CPU_ISA keeps oneDNN off its bf16 instructions'
    elif present:
        lacks = "torch's oneDNN has no bf16 kernels for it"
    elif family == 'x86':
        lacks = 'no ' + ('' if onednn else 'AVX-512, ') + 'AVX-512 BF16, AMX or AVX-NE-CONVERT'
    else:
        lacks = 'no FEAT_BF16 instructions' if family == 'arm' else 'no bf16 instructions'
    facts = [f'torch capability {capability}',
             'bf16 flags: ' + ('unknown' if present is None else ', '.join(present) or 'none'),
             f"oneDNN bf16: {'yes' if onednn else 'no'}"] + ([f'ONEDNN_MAX_CPU_ISA={isa_cap}'] if isa_cap else [])
    return CpuBf16Support(native=native, fast=onednn, lacks=lacks, description=', '.join(facts))


def slow_bf16_warning(support):
    """One line telling a CPU user that --hmp will be slower than fp32 here; None where bf16 is native."""
    if support.native:
        return None
    why = ("oneDNN emulates bf16 with fp32 AVX-512 instructions, so a training step is slower than fp32 "
           '(resnet50: about 2x)' if support.fast else
           "bf16 convolutions run in torch's reference kernel, so a training step is several times slower "
           'than fp32 (resnet50: 6x to 15x)')
    return (f'warning: --hmp: this CPU has no native bf16 ({support.lacks}; {support.description}): {why}; '
            'to train in fp32 leave out --hmp (demo scripts: --data-type fp32)')
