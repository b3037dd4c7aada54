"""train.py's benchmark modes (--mode benchmark-training | benchmark-inference, NVIDIA DLE ConvNets' semantics):
for each batch size, `--bench-warmup` steps that are not measured, then `--bench-iterations` measured ones.

Each measured step is timed from the moment the loader hands its batch over to the moment the device has
finished it: the training step is training.train_step (the device layer's lazy-graph cuts, --hmp, channels-last,
fused SGD), the inference step a forward under torch.no_grad() and the device's autocast; both end with
dev.synchronize() (CUDA: torch.cuda.synchronize; hpu: mark_step and the bridge's synchronize; CPU ops are
synchronous). Latency (ms): mean, p90, p95, p99 of those step times (numpy.percentile, linear interpolation);
img/s: measured images over the measured window's wall-clock time, waiting for data included (with
--data-path synthetic there is nothing to wait for). With several ranks each rank measures its own steps (DDP
keeps training ranks in step); the report gives rank 0's latency and img/s, and the sum of img/s over ranks.
Each batch size's entry also holds the measured window (`window_s`: its wall time less the steps' sum is the
wait for data) and, on CUDA, the peak device memory of its warm-up and measured steps (`peak_memory_bytes`:
torch.cuda.max_memory_allocated, reset before each batch size; None elsewhere).
The results go to stdout as a table and to a JSON file (rank 0).
"""
import json
import os
import time
from typing import NamedTuple

import numpy as np
import torch

from . import training
from .cli import UsageError

MODES = ('training', 'benchmark-training', 'benchmark-inference')
PERCENTILES = (90, 95, 99)
SYNC_NOTE = {
    'benchmark-training': 'latency: one training step (forward, loss, backward, optimizer step), from the batch '
                          'handed over to the device synchronised after the optimizer step',
    'benchmark-inference': 'latency: one forward pass under no_grad, from the batch handed over to the device '
                           'synchronised after it',
}


def check(mode, warmup, iterations, batch_sizes, compiled=False):
    """Refuse benchmark values that cannot give a measurement, in one line."""
    if mode not in MODES:
        raise UsageError(f"--mode: unknown mode '{mode}'; choose one of: " + ', '.join(MODES))
    if warmup < 0:
        raise UsageError(f'--bench-warmup must be at least 0, got {warmup}')
    if iterations < 1:
        raise UsageError(f'--bench-iterations must be at least 1, got {iterations} (no measured step, no figure)')
    for size in batch_sizes or ():
        if size < 1:
            raise UsageError(f'--benchmark-batch-sizes must all be at least 1, got {size}')
    if compiled and mode != 'training' and warmup < 1:
        raise UsageError('--compile compiles in the first step of each batch size: give --bench-warmup 1 or more '
                         'so that compiling is not measured')


def summarise(step_seconds, batch_size, window_seconds=None):
    """img/s and latency (ms: mean and PERCENTILES) of measured steps of `batch_size` images; img/s over
    `window_seconds` (default: the steps' sum)."""
    latency_ms = np.asarray(step_seconds, dtype=np.float64) * 1000.0
    window = sum(step_seconds) if window_seconds is None else window_seconds
    stats = {'mean': float(latency_ms.mean())}
    stats.update({f'p{p}': float(v) for p, v in zip(PERCENTILES, np.percentile(latency_ms, PERCENTILES))})
    return {'batch_size': batch_size, 'iterations': len(latency_ms),
            'img_per_s': len(latency_ms) * batch_size / max(window, 1e-12), 'latency_ms': stats}


def endless(make_loader):
    """The loader's batches, from the start again whenever it runs out (a small dataset, a short epoch)."""
    while True:
        empty = True
        for batch in make_loader():
            empty = False
            yield batch
        if empty:
            raise UsageError('--mode benchmark: the loader has no batch at this batch size (too few images?)')


class Measured(NamedTuple):
    first_step_s: float   # the first warm-up step (None without warm-up): with --compile, compiling
    step_s: list          # each measured step
    window_s: float       # wall-clock time of the measured steps, waiting for data included
    cpu_s: float          # CPU time of this process over the same window


def measure(step, batches, warmup, iterations, dev):
    """Measured times of `step(image, target)` over `warmup` unmeasured and `iterations` measured batches of
    `batches`."""
    first_step = None
    for _ in range(warmup):
        image, target = next(batches)
        started = time.perf_counter()
        step(image, target)
        dev.synchronize()
        first_step = time.perf_counter() - started if first_step is None else first_step
    times = []
    window_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        image, target = next(batches)
        started = time.perf_counter()
        step(image, target)
        dev.synchronize()
        times.append(time.perf_counter() - started)
    return Measured(first_step, times, time.perf_counter() - window_start, time.process_time() - cpu_start)


def training_step(model, criterion, optimizer, dev):
    model.train()

    def step(image, target):
        image, target = dev.to_device(image, target)
        training.train_step(model, criterion, optimizer, dev, image, target)
    return step


def inference_step(model, dev):
    model.eval()

    def step(image, target):
        image, target = dev.to_device(image, target)
        dev.mark_step('eval_input')
        with torch.no_grad(), dev.autocast():
            model(image)
    return step


def reset_peak_memory(dev):
    """Start counting the peak device memory afresh (CUDA; nothing elsewhere)."""
    if dev.kind == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev.torch_device)


def peak_memory(dev):
    """Bytes of device memory allocated at most since reset_peak_memory (CUDA), else None."""
    return torch.cuda.max_memory_allocated(dev.torch_device) if dev.kind == 'cuda' else None


def gather(value):
    """[value of each rank] (one element without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


class Plan(NamedTuple):
    """What a benchmark mode measures: `mode` (MODES), the batch sizes, the warm-up and measured steps at each,
    and where rank 0 writes the report (None: nowhere)."""
    mode: str
    batch_sizes: tuple
    warmup: int
    iterations: int
    json_path: str = None


def run(plan, step, make_loader, dev, description):
    """Measure `step` (training_step or inference_step) as `plan` (Plan) says, on `make_loader(batch_size)`'s
    batches; print the table, write plan.json_path (rank 0, when given) and return the report (a dict)."""
    mode, warmup, iterations, json_path = plan.mode, plan.warmup, plan.iterations, plan.json_path
    results = []
    for batch_size in plan.batch_sizes:
        reset_peak_memory(dev)
        measured = measure(step, endless(lambda: make_loader(batch_size)), warmup, iterations, dev)
        result = summarise(measured.step_s, batch_size, measured.window_s)
        per_rank = gather(result['img_per_s'])
        result.update(img_per_s_per_rank=per_rank, img_per_s_all_ranks=sum(per_rank),
                      first_step_s=measured.first_step_s, window_s=measured.window_s,
                      peak_memory_bytes=peak_memory(dev))
        results.append(result)
    report = dict(description, mode=mode, warmup_steps=warmup, measured_steps=iterations,
                  world_size=len(results[0]['img_per_s_per_rank']) if results else 1,
                  synchronised=SYNC_NOTE[mode] + f' ({dev.kind}: {dev.synchronize_means})',
                  img_per_s='measured images / wall-clock time of the measured steps (data wait included)',
                  results=results)
    print(format_table(report))
    if json_path and is_first_rank():
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, 'w') as f:
            json.dump(report, f, indent=1)
        print(f'Benchmark results written to {json_path}')
    return report


def is_first_rank():
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def format_table(report):
    """The report as a few header lines and a Markdown table, one row per batch size (on CUDA with the peak
    device memory as a last column)."""
    world = report['world_size']
    peaks = any(r.get('peak_memory_bytes') is not None for r in report['results'])
    head = (f"{report['mode']}: {report.get('model', '?')} on {report.get('device', '?')}, "
            f"{report.get('data', '?')} data, {world} rank(s); {report['warmup_steps']} warm-up step(s) left out, "
            f"{report['measured_steps']} measured per batch size")
    lines = [head, report['synchronised'], f"img/s: {report['img_per_s']}; latency of rank 0"
             + (f'; all ranks: the sum of the {world} ranks\' img/s' if world > 1 else ''),
             '| batch | img/s | img/s all ranks | latency mean ms | p90 ms | p95 ms | p99 ms | first step s |'
             + (' peak memory MiB |' if peaks else ''),
             '|---:|---:|---:|---:|---:|---:|---:|---:|' + ('---:|' if peaks else '')]
    for r in report['results']:
        lat = r['latency_ms']
        first = '-' if r['first_step_s'] is None else f"{r['first_step_s']:.2f}"
        peak = r.get('peak_memory_bytes')
        lines.append(f"| {r['batch_size']} | {r['img_per_s']:.1f} | {r['img_per_s_all_ranks']:.1f} | "
                     f"{lat['mean']:.2f} | {lat['p90']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {first} |"
                     + ((' - |' if peak is None else f' {peak / 2 ** 20:.0f} |') if peaks else ''))
    return '\n'.join(lines)
