"""Training images/s through the project's own step (train.train_one_epoch with the device layer) for
fp32 contiguous, --channels-last True, --hmp and both, each against a bare PyTorch loop that does
the same work (same model, SGD, memory format, op-list precision, uint8 batches normalised on the
device) with no logging, no device hooks and no metrics.

Batches are synthetic by default: one uint8 batch laid out as the fast pipeline hands it over, reused
every step. With --data the fast JPEG pipeline reads real JPEGs (train/ of an ImageFolder; 'auto'
writes an ImageNet-like one). Rounds alternate the project's step and the bare loop; medians of
wall-clock img/s and, on CPU, of images per CPU-second of this process (less disturbed by other
processes on a shared machine; use --threads 1 there, so idle OpenMP threads spinning do not count).
On CPU the header and every result row name the CPU, torch's vector ISA and whether bf16 is native:
without bf16 instructions the --hmp settings run several times slower than fp32.

    python benchmarks/train_step.py --device cpu --batch-size 32
    python benchmarks/train_step.py --device cuda                    # batch 256, synthetic
    python benchmarks/train_step.py --device cuda --data auto        # batch 256, fast pipeline on JPEGs
"""
import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from classification import data, devices, fast_jpeg, optimizers, samplers, training  # noqa: E402
import model as models  # noqa: E402
import sample_data  # noqa: E402
import train  # noqa: E402
from machine import cpu_capability, cpu_capability_tag, describe  # noqa: E402  (benchmarks/machine.py)

# name: (channels_last, hmp)
SETTINGS = {'fp32 contiguous': (False, False), 'fp32 channels-last': (True, False),
            'hmp contiguous': (False, True), 'hmp channels-last': (True, True)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--batch-size', type=int, help='default: 32 on cpu, 256 on cuda')
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--steps', type=int, help='timed steps per round (default: 1 on cpu, 20 on cuda)')
    parser.add_argument('--rounds', type=int, default=3, help='timed rounds of each loop, after a warm-up one')
    parser.add_argument('--settings', default=','.join(SETTINGS), help='comma-separated subset of: '
                        + ', '.join(SETTINGS))
    parser.add_argument('--data', help="ImageFolder root for real JPEGs through the fast pipeline ('auto': "
                                       'write an ImageNet-like one); default: synthetic batches')
    parser.add_argument('--workers', type=int, default=os.cpu_count(), help='fast pipeline workers with --data')
    parser.add_argument('--threads', type=int, help='torch CPU threads (default: torch\'s)')
    parser.add_argument('--autocast', action='store_true',
                        help='also time a bare loop under torch.autocast(bfloat16) instead of the op lists')
    args = parser.parse_args()
    args.batch_size = args.batch_size or (256 if args.device == 'cuda' else 32)
    args.steps = args.steps or (20 if args.device == 'cuda' else 1)
    return args


def op_lists():
    return devices.HmpConfig(os.path.join(REPO, 'ops_bf16_Resnet.txt'), os.path.join(REPO, 'ops_fp32_Resnet.txt'))


def synthetic_batches(args):
    """One uint8 batch as the fast pipeline hands it over (NCHW view of NHWC), forever."""
    generator = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=torch.uint8,
                         generator=generator)
    target = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    return itertools.repeat((nhwc.permute(0, 3, 1, 2), target))


def jpeg_batches(root, args, dev):
    """uint8 training batches of the fast pipeline over root/train, epoch after epoch."""
    dataset = data.image_folder(os.path.join(root, 'train'), None)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = fast_jpeg.batch_loader(fast_jpeg.TrainBatches(list(dataset.samples), args.image_size, seed=0),
                                    samplers.EpochBatchSampler(sampler, args.batch_size), args.workers,
                                    dev.pin_memory(), dev.worker_start_method)
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


class Steps:
    """`count` batches from an endless batch iterator, with the len() that MetricLogger reads."""

    def __init__(self, batches, count):
        self.batches = batches
        self.count = count

    def __len__(self):
        return self.count

    def __iter__(self):
        return itertools.islice(self.batches, self.count)


def synchronize(dev):
    if dev.kind == 'cuda':
        torch.cuda.synchronize(dev.torch_device)


class Workload:
    """Model, optimizer and device object of one setting, plus its batches."""

    def __init__(self, args, channels_last, hmp, batches_for):
        self.dev = devices.create(args.device, channels_last=channels_last, hmp=op_lists() if hmp else None)
        torch.manual_seed(0)
        self.model = training.place_model(self.dev, models.create_model(args.model, num_classes=1000))
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = training.make_optimizer(self.dev, self.model, optimizers.OptimizerSettings(lr=0.01))
        self.batches = batches_for(self.dev)
        self.batch_size = args.batch_size

    def project_steps(self, steps):
        """`steps` steps of train.train_one_epoch, on batches normalised on the device as the fast pipeline
        does it, its log lines silenced."""
        batches = fast_jpeg.NormalizedOnDevice(Steps(self.batches, steps), self.dev.torch_device)
        with open(os.devnull, 'w') as sink, contextlib.redirect_stdout(sink):
            train.train_one_epoch(self.model, self.criterion, self.optimizer, batches, self.dev, 0, 10 ** 9,
                                  num_train_steps=steps)

    def bare_steps(self, steps, precision=None):
        """The same steps as a plain PyTorch loop: normalise on the device, forward, backward, SGD."""
        device, memory_format = self.dev.torch_device, self.dev.memory_format
        mean = torch.tensor(data.IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        inv_std = 1 / (torch.tensor(data.IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255)
        precision = precision if precision is not None else self.dev.autocast()
        self.model.train()
        for image, target in Steps(self.batches, steps):
            image = image.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            image = ((image.float() - mean) * inv_std).contiguous(memory_format=memory_format)
            with precision:
                loss = self.criterion(self.model(image), target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()

    def rate(self, run, steps):
        """(img/s, img per CPU-second of this process) over `steps` steps of `run`."""
        synchronize(self.dev)
        start, cpu_start = time.perf_counter(), time.process_time()
        run(steps)
        synchronize(self.dev)
        images = steps * self.batch_size
        return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def loops_of(workload, args):
    loops = {'project step': workload.project_steps, 'bare loop': workload.bare_steps}
    if args.autocast:
        autocast = torch.autocast(workload.dev.torch_device.type, dtype=torch.bfloat16)
        loops['bare loop, torch.autocast bf16'] = lambda steps: workload.bare_steps(steps, autocast)
    return loops


def measure(workload, args):
    """{loop: [(img/s, img per CPU-s) per round]}; rounds alternate the loops' order."""
    loops = loops_of(workload, args)
    for run in loops.values():
        run(1)  # warm-up: allocator, oneDNN primitives, cudnn autotuning
    rates = {name: [] for name in loops}
    for round_index in range(args.rounds):
        names = list(loops) if round_index % 2 == 0 else list(reversed(loops))
        for name in names:
            rates[name].append(workload.rate(loops[name], args.steps))
    return rates


def medians(rounds, column):
    return {loop: statistics.median(r[column] for r in values) for loop, values in rounds.items()}


def run(args, batches_for):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'{args.model}, batch {args.batch_size}, {args.image_size}px, {args.steps} steps x {args.rounds} rounds, '
          f'on {describe(args.device)}; data: {args.data or "synthetic"}')
    print(cpu_capability())
    tag = cpu_capability_tag() if args.device == 'cpu' else ''
    wall, cpu = {}, {}
    for name in args.settings.split(','):
        name = name.strip()
        channels_last, hmp = SETTINGS[name]
        rounds = measure(Workload(args, channels_last, hmp, batches_for), args)
        wall[name], cpu[name] = medians(rounds, 0), medians(rounds, 1)
        for loop in rounds:
            runs = ' '.join(f'{r[0]:.1f}' for r in rounds[loop])
            print(f'{name:18s} {loop:31s}: {wall[name][loop]:7.2f} img/s  {cpu[name][loop]:7.2f} img/CPU-s'
                  f'  (img/s by round: {runs})  {tag}', flush=True)
        print(f'{name:18s} project step / bare loop: {wall[name]["project step"] / wall[name]["bare loop"]:.3f} '
              f'wall, {cpu[name]["project step"] / cpu[name]["bare loop"]:.3f} CPU  {tag}')
    report_ratios(wall, 'wall', tag)
    report_ratios(cpu, 'CPU', tag)


def report_ratios(results, measure_name, tag):
    """Each setting against fp32 contiguous: the project's step against its own, bare loops against the
    plain fp32 bare loop."""
    base = results.get('fp32 contiguous')
    if base is None:
        return
    for name, rates in results.items():
        line = ', '.join(f'{loop} {rate / base["project step" if loop == "project step" else "bare loop"]:.2f}x'
                         for loop, rate in rates.items())
        print(f'{name:18s} vs fp32 contiguous ({measure_name}): {line}  {tag}')


def main():
    args = parse_args()
    if not args.data:
        run(args, lambda dev: synthetic_batches(args))
    elif args.data != 'auto':
        run(args, lambda dev: jpeg_batches(args.data, args, dev))
    else:
        with tempfile.TemporaryDirectory(prefix='imagenet_like_') as root:
            sample_data.make_dataset(root, classes=10, train_per_class=max(args.batch_size // 4, 8), val_per_class=1,
                                     imagenet_like=True)
            run(args, lambda dev: jpeg_batches(root, args, dev))


if __name__ == '__main__':
    main()
