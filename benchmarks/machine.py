"""One line naming the machine a benchmark ran on, for benchmarks/RESULTS.md."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classification import mixed_precision  # noqa: E402


def cpu_capability():
    """The CPU facts that decide CPU training speed: model, torch's vector ISA, native bf16 or not."""
    support = mixed_precision.cpu_bf16_support()
    native = 'yes' if support.native else f'no ({support.lacks})'
    kernels = 'oneDNN' if support.fast else "torch's reference kernel"
    return f'CPU: {mixed_precision.cpu_model()}; {support.description}; native bf16: {native}; bf16 convolutions in {kernels}'



def cpu_capability_tag():
    """The same facts, short enough to end every result row."""
    support = mixed_precision.cpu_bf16_support()
    return (f"[{mixed_precision.cpu_model()}, {mixed_precision.torch_cpu_capability()}, native bf16 "
            f"{'yes' if support.native else 'no'}{'' if support.fast else ', bf16 in reference kernels'}]")


def describe(device='cpu'):
    if device == 'cuda':
        return f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}'
    return f'{mixed_precision.cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}'
