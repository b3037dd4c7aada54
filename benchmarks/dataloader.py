"""Images per second per loader worker: the fast JPEG pipeline and NVIDIA DALI's against the reference MP pipeline.

All read the same ImageFolder with the same number of workers and batch size; the reference is the
project's MP loader (PIL + torchvision transforms, float normalised batches), the fast one is
fast_jpeg (uint8 batches, normalised later on the device), DALI is --dl-worker-type DALI's pipeline with
its CPU operators (normalised float channels_last batches; --workers is its CPU threads, 0 meaning 1),
left out with a line saying why where nvidia.dali cannot be imported. With --to-device each batch also goes
through the device layer's to_device on the CPU, as in CPU training, so all end as normalised float
channels_last batches. Epochs of the pipelines alternate; medians are reported, as wall-clock img/s
per worker and as images per CPU-second of the loader workers (the figure that other processes on a
shared machine disturb least). DALI decodes in its own threads inside this process, so its CPU-seconds
are the whole process's (its threads and the main thread, which reads the files and their headers).

    python benchmarks/dataloader.py                       # writes an ImageNet-like folder itself
    python benchmarks/dataloader.py --data DIR --workers 1 --repeats 5
    python benchmarks/dataloader.py --shrunk-copy 500      # also FAST on a copy shrunk as shrink_dataset.py writes it

With --shrunk-copy MAX_SIDE the folder is first copied by shrink_dataset.py's writer (classification/shrink.py,
longer side at most MAX_SIDE, quality 90) into a temporary folder, and a 'fast, shrunk copy' row reads the copy's
files in the same order with the same crops; its line ends with its ratio to the 'fast' row on the original.
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.data import BatchSampler
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from classification import dali, data, devices, fast_jpeg, loaders, samplers  # noqa: E402
from classification.cli import UsageError  # noqa: E402
import sample_data  # noqa: E402
from machine import describe  # noqa: E402  (benchmarks/machine.py)

DALI_ROW = 'DALI, CPU ops'


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--data', help='ImageFolder root with train/ and val/ (default: write an ImageNet-like one)')
    parser.add_argument('--workers', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=5, help='timed epochs of each pipeline')
    parser.add_argument('--split', choices=('train', 'val', 'both'), default='both')
    parser.add_argument('--to-device', action='store_true',
                        help='also run the device layer\'s to_device (CPU) on every batch in the main process')
    parser.add_argument('--classes', type=int, default=10, help='for the generated folder')
    parser.add_argument('--per-class', type=int, default=48, help='train images per class of the generated folder')
    parser.add_argument('--shrunk-copy', type=int, metavar='MAX_SIDE',
                        help='also time FAST on a copy of the folder shrunk to this longer side (FFCV rn50: 500)')
    return parser.parse_args()


SHRUNK_ROW = 'fast, shrunk copy'


def fast_loaders(train_samples, val_samples, train_sampler, val_sampler, args, dev):
    """(train, val) FAST loaders over these samples with these samplers (224 px crops; val: 256 resize)."""
    options = dict(pin_memory=dev.pin_memory(), start_method=dev.worker_start_method)
    return (fast_jpeg.batch_loader(fast_jpeg.TrainBatches(list(train_samples), 224, seed=0),
                                   samplers.EpochBatchSampler(train_sampler, args.batch_size), args.workers, **options),
            fast_jpeg.batch_loader(fast_jpeg.EvalBatches(list(val_samples), 256, 224),
                                   BatchSampler(val_sampler, args.batch_size, drop_last=False), args.workers, **options))


def add_shrunk_copy(pipelines, copy_root, args, dev, train_sampler, val_sampler):
    """The FAST pipeline over the shrunk copy's files, with the original's samplers (same order, same crops)."""
    train = data.image_folder(os.path.join(copy_root, 'train'), None)
    val = data.image_folder(os.path.join(copy_root, 'val'), None)
    shrunk = fast_loaders(train.samples, val.samples, train_sampler, val_sampler, args, dev)
    pipelines['train'][SHRUNK_ROW] = (shrunk[0], train_sampler)
    pipelines['val'][SHRUNK_ROW] = (shrunk[1], val_sampler)


def build(root, args, dev, copy_root=None):
    """{split: {pipeline: (loader, sampler)}} over the same files. 'fast, whole decode' is the fast
    pipeline without the region decoder (shown only where csrc/build.sh has built it); DALI_ROW where DALI
    can be imported."""
    train = data.image_folder(os.path.join(root, 'train'), data.train_transform(224))
    val = data.image_folder(os.path.join(root, 'val'), data.eval_transform(256, 224))
    train_sampler = DistributedSampler(train, num_replicas=1, rank=0, shuffle=True, seed=0)
    val_sampler = samplers.ShardedEvalSampler(len(val))
    options = dict(pin_memory=dev.pin_memory(), start_method=dev.worker_start_method)
    reference = tuple(data.make_loader(ds, sampler, train=is_train, batch_size=args.batch_size, workers=args.workers,
                                       placement=dev.loader_placement())
                      for ds, sampler, is_train in ((train, train_sampler, True), (val, val_sampler, False)))
    fast = fast_loaders(train.samples, val.samples, train_sampler, val_sampler, args, dev)
    if args.to_device:  # the fast pipeline's uint8 batches become normalised float on the device, as in training
        fast = tuple(fast_jpeg.NormalizedOnDevice(loader, dev.torch_device) for loader in fast)
    pipelines = {'train': {'reference': (reference[0], train_sampler), 'fast': (fast[0], train_sampler)},
                 'val': {'reference': (reference[1], val_sampler), 'fast': (fast[1], val_sampler)}}
    if fast_jpeg.REGION_DECODER is not None:
        whole = fast_jpeg.TrainBatches(train.samples, 224, seed=0, region_decode=False)
        batches = samplers.EpochBatchSampler(train_sampler, args.batch_size)
        pipelines['train']['fast, whole decode'] = (fast_jpeg.batch_loader(whole, batches, args.workers, **options),
                                                    train_sampler)
    dali_loaders = build_dali(train, val, train_sampler, val_sampler, args, dev)
    if dali_loaders is not None:
        pipelines['train'][DALI_ROW] = (dali_loaders[0], train_sampler)
        pipelines['val'][DALI_ROW] = (dali_loaders[1], val_sampler)
    if copy_root is not None:
        add_shrunk_copy(pipelines, copy_root, args, dev, train_sampler, val_sampler)
    return pipelines



def build_dali(train, val, train_sampler, val_sampler, args, dev):
    """(train, val) DALI loaders over the same files and samplers (--workers: its CPU threads), or None, said in
    one line, where nvidia.dali cannot be imported."""
    try:
        dali.import_dali()
    except UsageError as err:
        print(f"the '{DALI_ROW}' row is left out: {err}")
        return None
    settings = loaders.LoaderSettings(kind='DALI', batch_size=args.batch_size, workers=args.workers,
                                      train_crop_size=224, val_resize_size=256, val_crop_size=224)
    return dali.build_loaders(train, val, train_sampler, val_sampler, settings, dev.torch_device)


def workers_cpu_seconds():
    """CPU time (user + system) used so far by this process's live child processes (loader workers)."""
    total = 0
    for child in multiprocessing.active_children():
        try:
            with open(f'/proc/{child.pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf('SC_CLK_TCK')


def cpu_clock(loader):
    """Where a loader's CPU time shows: its worker processes' (workers_cpu_seconds), or this whole process's
    (time.process_time) with no workers, and for DALI, whose threads run in this process."""
    workers = getattr(getattr(loader, 'loader', loader), 'num_workers', 0)  # NormalizedOnDevice wraps a DataLoader
    return workers_cpu_seconds if workers else time.process_time


def epoch_rate(loader, sampler, epoch, dev):
    """(img/s, img per worker CPU-second) over one epoch; each batch goes through dev.to_device when
    dev is given. With no workers, the main process's CPU time stands in for the workers'."""
    if hasattr(sampler, 'set_epoch'):
        sampler.set_epoch(epoch)
    images = 0
    clock = cpu_clock(loader)
    start, cpu_start = time.perf_counter(), clock()
    for image, target in loader:
        if dev is not None:
            image, target = dev.to_device(image, target)
        images += image.shape[0]
    wall = time.perf_counter() - start
    return images / wall, images / max(clock() - cpu_start, 1e-9)


def compare(pipelines, args, dev=None):
    """img/s of each pipeline per epoch, epochs interleaved (after one warm-up epoch each)."""
    rates = {name: [] for name in pipelines}
    for epoch in range(args.repeats + 1):
        order = list(pipelines) if epoch % 2 == 0 else list(reversed(pipelines))
        for name in order:
            rate = epoch_rate(*pipelines[name], epoch, dev)
            if epoch > 0:
                rates[name].append(rate)
    return rates


def report(split, rates, workers):
    wall = {name: statistics.median(r[0] for r in runs) for name, runs in rates.items()}
    cpu = {name: statistics.median(r[1] for r in runs) for name, runs in rates.items()}
    for name in rates:
        runs = ' '.join(f'{r[0]:.0f}' for r in rates[name])
        against_original = (f'; {cpu[name] / cpu["fast"]:.2f}x the original\'s fast img per worker CPU-s'
                            if name == SHRUNK_ROW else '')
        print(f'{split:5s} {name:18s}: {wall[name] / max(workers, 1):6.1f} img/s per worker '
              f'{wall[name] / wall["reference"]:5.2f}x | {cpu[name]:6.1f} img per worker CPU-s '
              f'{cpu[name] / cpu["reference"]:5.2f}x  (img/s by epoch: {runs}){against_original}')


def shrunk_copy(root, max_side, workers):
    """A shrunk copy of root written by shrink_dataset.py's writer into a temporary folder; its path."""
    from classification import shrink
    copy_root = os.path.join(tempfile.mkdtemp(prefix='shrunk_copy_'), 'copy')
    if shrink.run(root, copy_root, max_side, 90, max(workers, 1)) != 0:
        sys.exit(f'the shrunk copy of {root} failed')
    return copy_root


def run(root, args):
    copy_root = shrunk_copy(root, args.shrunk_copy, args.workers) if args.shrunk_copy else None
    torch.set_num_threads(1)  # the main process only receives batches; keep its cores for the workers
    dev = devices.create('cpu', channels_last=True)
    pipelines = build(root, args, dev, copy_root)
    print(f'machine: {describe()}; data: {root}; workers {args.workers}, batch {args.batch_size}, '
          f'{args.repeats} timed epochs each, medians, to_device {"on" if args.to_device else "off"}')
    if copy_root is not None:
        print(f'{SHRUNK_ROW}: {copy_root}, longer side at most {args.shrunk_copy} px, quality 90; '
              f'{folder_megabytes(root):.1f} MB original, {folder_megabytes(copy_root):.1f} MB copy')
    if DALI_ROW in pipelines['train']:
        print(f'{DALI_ROW}: "worker" is one of its {max(args.workers, 1)} CPU threads; its CPU-s are the whole '
              "process's (its threads decode in it; the main thread reads the files)")
    for split in (('train', 'val') if args.split == 'both' else (args.split,)):
        report(split, compare(pipelines[split], args, dev if args.to_device else None), args.workers)


def folder_megabytes(root):
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(root) for name in names) / 1e6


def main():
    args = parse_args()
    if args.data:
        run(args.data, args)
        return
    with tempfile.TemporaryDirectory(prefix='imagenet_like_') as root:
        count = sample_data.make_dataset(root, args.classes, args.per_class, max(args.per_class // 4, 1),
                                         imagenet_like=True)
        print(f'wrote {count} ImageNet-like JPEGs under {root}')
        run(root, args)


if __name__ == '__main__':
    main()
