"""One line naming the machine a benchmark ran on, for benchmarks/RESULTS.md."""
import os

import torch


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return 'unknown CPU'


def describe(device='cpu'):
    if device == 'cuda':
        return f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}'
    return f'{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}'
