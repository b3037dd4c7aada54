"""train.py's benchmark modes on this machine: img/s and per-step latency (mean, p90, p95, p99) of
benchmark-training and benchmark-inference (benchmark_modes.py: the device layer's step on --data-path synthetic
batches), each against a bare PyTorch loop measured in the same run (same model, memory format and one float
batch made once; a plain forward under no_grad, or forward, backward and SGD), and with --compile also the
torch.compile'd project step against the eager one, compile time reported on its own (the first warm-up step,
cold cache: a fresh TORCHINDUCTOR_CACHE_DIR).

Rounds alternate the order of the variants; img/s is the median over rounds (min-max shown), img/CPU-s the
median of measured images per CPU-second of this process (on a shared machine the steadier figure; use
--threads 1 there, as idle OpenMP threads spinning count), latencies are over all measured steps of all
rounds. Ratios, not absolute figures, are what carries from run to run on a shared machine.

    python benchmarks/modes.py --threads 1                                   # resnet18 + resnet50, batch 1 and 8
    python benchmarks/modes.py --threads 1 --models resnet18 --batch-sizes 8 --compile
    python benchmarks/modes.py --device cuda --batch-sizes 1 64 256 --warmup 20 --iterations 100
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', tempfile.mkdtemp(prefix='inductor_cold_'))  # before torch loads

import torch  # noqa: E402

from classification import benchmark_modes, data, devices, distributed, loaders, optimizers, training  # noqa: E402
from machine import cpu_capability, describe  # noqa: E402  (benchmarks/machine.py)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--models', nargs='+', default=['resnet18', 'resnet50'])
    parser.add_argument('--modes', nargs='+', default=['benchmark-inference', 'benchmark-training'],
                        choices=('benchmark-inference', 'benchmark-training'))
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8])
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--warmup', type=int, default=2, help='unmeasured steps per round and variant')
    parser.add_argument('--iterations', type=int, default=5, help='measured steps per round and variant')
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument('--compile', action='store_true', help='also the torch.compile\'d project step')
    parser.add_argument('--json', help='write every figure here')
    return parser.parse_args()


class Bare:
    """The baseline: a plain PyTorch loop on one normalised float batch made once, no device layer."""

    def __init__(self, model, optimizer, criterion, dev, batch_size, size):
        generator = torch.Generator().manual_seed(0)
        raw = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
        mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
        self.image = ((raw.float() / 255 - mean) / std).to(dev.torch_device).contiguous(memory_format=dev.memory_format)
        self.target = torch.randint(0, 1000, (batch_size,), generator=generator).to(dev.torch_device)
        self.model, self.optimizer, self.criterion = model, optimizer, criterion

    def batches(self):
        while True:
            yield self.image, self.target

    def inference(self, image, target):
        with torch.no_grad():
            self.model(image)

    def training(self, image, target):
        loss = self.criterion(self.model(image), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def synthetic_batches(dev, mode, batch_size, size):
    with contextlib.redirect_stdout(open(os.devnull, 'w')):
        settings = loaders.LoaderSettings(batch_size=batch_size, train_crop_size=size, val_crop_size=size)
        dataset = loaders.build(loaders.SYNTHETIC, settings, distributed.Ranks(0, 1, 0, False), dev.loader_placement())
    return benchmark_modes.endless(lambda: dataset.train if mode == 'benchmark-training' else dataset.val)


def variants(model_name, mode, batch_size, args):
    """{name: (step, batches)} of one model, mode and batch size."""
    dev = devices.create(args.device, channels_last=True)
    torch.manual_seed(0)
    model = training.place_model(dev, training.build_model(model_name, 1000))
    optimizer = training.make_optimizer(dev, model, optimizers.OptimizerSettings(lr=1e-4))
    criterion = training.make_criterion()
    bare = Bare(model, optimizer, criterion, dev, batch_size, args.image_size)
    if mode == 'benchmark-training':
        found = {'bare loop': (bare.training, bare.batches()),
                 'project step': (benchmark_modes.training_step(model, criterion, optimizer, dev), None)}
    else:
        found = {'bare loop': (bare.inference, bare.batches()),
                 'project step': (benchmark_modes.inference_step(model, dev), None)}
    if args.compile:
        compiled = dev.compile(model)
        found['compiled step'] = (benchmark_modes.training_step(compiled, criterion, optimizer, dev)
                                  if mode == 'benchmark-training' else benchmark_modes.inference_step(compiled, dev),
                                  None)
    return dev, model, {name: (step, batches or synthetic_batches(dev, mode, batch_size, args.image_size))
                        for name, (step, batches) in found.items()}


def measure_case(model_name, mode, batch_size, args):
    dev, model, steps = variants(model_name, mode, batch_size, args)
    rounds = {name: [] for name in steps}
    pooled = {name: [] for name in steps}
    first_steps = {name: [] for name in steps}
    cpu_rates = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            step, batches = steps[name]
            if mode == 'benchmark-inference':
                model.eval()  # the bare loop runs the model as it is
            else:
                model.train()
            measured = benchmark_modes.measure(step, batches, args.warmup, args.iterations, dev)
            rounds[name].append(benchmark_modes.summarise(measured.step_s, batch_size, measured.window_s)['img_per_s'])
            cpu_rates[name].append(len(measured.step_s) * batch_size / measured.cpu_s)
            pooled[name] += measured.step_s
            first_steps[name].append(measured.first_step_s)
    results = {}
    for name in steps:
        summary = benchmark_modes.summarise(pooled[name], batch_size)
        summary.update(img_per_s=statistics.median(rounds[name]), img_per_s_rounds=rounds[name],
                       img_per_cpu_s=statistics.median(cpu_rates[name]), first_step_s=first_steps[name])
        results[name] = summary
    return results


def report(model_name, mode, batch_size, results, tag):
    """One line per variant; ratios against the bare loop (and the eager project step) of wall img/s and of
    img per CPU-second of the process (the figure least disturbed by other processes)."""
    base, eager = results['bare loop'], results['project step']
    for name, r in results.items():
        lat, spread = r['latency_ms'], r['img_per_s_rounds']
        ratio = f"{r['img_per_s'] / base['img_per_s']:.3f}x bare wall, {r['img_per_cpu_s'] / base['img_per_cpu_s']:.3f}x CPU"
        if name == 'compiled step':
            ratio += (f"; vs eager {r['img_per_s'] / eager['img_per_s']:.3f}x wall, "
                      f"{r['img_per_cpu_s'] / eager['img_per_cpu_s']:.3f}x CPU; compile (first warm-up step, cold "
                      f"cache) {r['first_step_s'][0]:.1f} s")
        print(f"{model_name:9s} {mode:19s} b{batch_size:<4d} {name:13s} {r['img_per_s']:8.2f} img/s "
              f"({min(spread):.2f}-{max(spread):.2f}) {r['img_per_cpu_s']:7.2f} img/CPU-s  latency ms mean "
              f"{lat['mean']:.1f} p90 {lat['p90']:.1f} p95 {lat['p95']:.1f} p99 {lat['p99']:.1f}  {ratio}  {tag}",
              flush=True)


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe(args.device)
    print(f'{machine}; {args.image_size}px, synthetic data, {args.warmup} warm-up + {args.iterations} measured steps '
          f'x {args.rounds} rounds per variant')
    tag = ''
    if args.device == 'cpu':
        print(cpu_capability())
        tag = f'[{torch.get_num_threads()} threads]'
    everything = []
    for model_name in args.models:
        for mode in args.modes:
            for batch_size in args.batch_sizes:
                results = measure_case(model_name, mode, batch_size, args)
                report(model_name, mode, batch_size, results, tag)
                everything.append(dict(model=model_name, mode=mode, batch_size=batch_size, results=results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=machine, cpu=cpu_capability() if args.device == 'cpu' else None, args=vars(args),
                           cases=everything), f, indent=1)


if __name__ == '__main__':
    main()
