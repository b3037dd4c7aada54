"""Data loading: ImageFolder datasets, the reference transforms, samplers and the choice of loader.

Loaders yield (images, targets). Images are either float and normalised (the reference MP pipeline)
or uint8 (the fast pipeline); the device layer normalises uint8 batches on the device.
"""
import atexit
import hashlib
import itertools
import math
import os
import random
import signal

import numpy as np
import torch
import torchvision
from torch.utils.data import BatchSampler, DataLoader, Sampler
from torchvision import transforms

from cli import STOP_SIGNALS, UsageError, end_loader_workers, stop_signals_blocked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(crop_size=224):
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def eval_transform(resize_size=256, crop_size=224):
    return transforms.Compose([
        transforms.Resize(resize_size),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


class UnreadableImage(UsageError):
    """An image file that cannot be decoded; the message names the file.

    DataLoader re-raises a worker's exception as `type(exc)(long text with the worker traceback)`;
    keeping only the last line of that text gives the user the same one line either way.
    """

    def __init__(self, message):
        lines = [line for line in str(message).splitlines() if line.strip()]
        last = lines[-1] if lines else ''
        super().__init__(last.split(f'{type(self).__name__}: ', 1)[-1])

    @classmethod
    def for_file(cls, path, reason):
        return cls(f"--data-path: cannot decode image '{path}' ({reason}); remove or replace the file")


def checked_pil_loader(path):
    """ImageFolder's PIL loader, with decode failures reported as UnreadableImage naming the file."""
    from PIL import Image, UnidentifiedImageError
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UnreadableImage.for_file(path, f'{type(err).__name__}: {err}') from None


def check_split_dir(data_path, split):
    """The folder of one split, or a clear error when it is missing."""
    path = os.path.join(data_path, split)
    if not os.path.isdir(data_path):
        raise UsageError(f"--data-path: '{data_path}' does not exist; it must hold train/ and val/ "
                         'folders with one sub-folder of images per class')
    if not os.path.isdir(path):
        raise UsageError(f"--data-path: '{path}' does not exist; expected {split}/<class>/<image> "
                         f"under '{data_path}'")
    return path


class CachedImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder whose file list comes from --cache-dataset's file instead of a directory scan.

    Only the list is cached, never the transforms, so a changed augmentation always takes effect.
    """

    def __init__(self, root, transform, listing):
        self._listing = listing
        super().__init__(root, transform=transform, loader=checked_pil_loader)

    def find_classes(self, directory):
        return self._listing['classes'], self._listing['class_to_idx']

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return [tuple(s) for s in self._listing['samples']]


def _cache_path(root):
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:10]
    return os.path.join(os.path.expanduser('~'), '.torch', 'vision', 'datasets', 'imagefolder', digest + '.pt')


def image_folder(root, transform, cache=False, is_main=True):
    """ImageFolder over `root`, with a clear error for empty class folders or an empty split."""
    cache_file = _cache_path(root) if cache else None
    if cache_file and os.path.exists(cache_file):
        print(f'Loading file list of {root} from {cache_file}')
        return CachedImageFolder(root, transform, torch.load(cache_file, weights_only=True))
    try:
        dataset = torchvision.datasets.ImageFolder(root, transform=transform, loader=checked_pil_loader)
    except FileNotFoundError as err:
        raise UsageError(f"--data-path: {err} (under '{root}'); every class folder needs at least one "
                         'image (.jpg, .jpeg, .png, ...)') from None
    if cache_file and is_main:
        print(f'Saving file list of {root} to {cache_file}')
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        import utils
        utils.atomic_save({'classes': dataset.classes, 'class_to_idx': dataset.class_to_idx,
                           'samples': [list(s) for s in dataset.samples]}, cache_file)
    return dataset


def sample_seed(seed, epoch, index):
    """A 63-bit seed that depends only on (seed, epoch, sample index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SeededAugmentation(torch.utils.data.Dataset):
    """Dataset whose items are keyed (epoch, index): each sample's random augmentation is seeded by
    (seed, epoch, index), so it does not depend on how many workers load it or in which order."""

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]

    def __getattr__(self, name):  # classes, samples, ... of the wrapped ImageFolder
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochIndexSampler(Sampler):
    """Yields (epoch, index) pairs from a TrainSampler, for SeededAugmentation."""

    def __init__(self, sampler):
        self.sampler = sampler

    @property
    def epoch(self):
        return self.sampler.epoch

    @property
    def dataset_len(self):
        return self.sampler.dataset_len

    @property
    def num_replicas(self):
        return self.sampler.num_replicas

    def set_epoch(self, epoch, start=0):
        self.sampler.set_epoch(epoch, start)

    def position_after(self, batches, batch_size):
        return self.sampler.position_after(batches, batch_size)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


class ShardedEvalSampler(Sampler):
    """Rank r of w takes samples r, r+w, r+2w, ...: no padding, no shuffling, so every
    validation image is counted exactly once whatever the world size."""

    def __init__(self, dataset_len, num_replicas=1, rank=0):
        self.indices = range(rank, dataset_len, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_batches(samples, batch_size):
    """Training batches of `samples` samples: the last batch may be short, but a trailing batch of a single
    sample is left out (BatchNorm cannot train on one value per channel)."""
    return math.ceil(samples / batch_size) - int(samples % batch_size == 1)


class TrainBatchSampler(BatchSampler):
    """Batches of the training sampler, as many as train_batches() counts."""

    def __init__(self, sampler, batch_size):
        super().__init__(sampler, batch_size, drop_last=False)

    def __iter__(self):
        return itertools.islice(super().__iter__(), len(self))

    def __len__(self):
        return train_batches(len(self.sampler), self.batch_size)


class TrainSampler(Sampler):
    """This rank's share of an epoch's shuffled order of the training set, from a position in that order.

    The epoch order is DistributedSampler's: a permutation drawn from seed + epoch, the same on every rank,
    padded with its first samples to a multiple of the world size; rank r of w takes every w-th sample
    from r. A run stopped mid-epoch records its position as the number of samples of that order all ranks
    together have trained on (`position_after`), not as a step number, so a resume with another world size
    or batch size continues at the same place; with the same ones it continues exactly. Every epoch's
    start is set explicitly (`set_epoch`), so no position outlives the epoch it was meant for.
    """

    def __init__(self, dataset_len, num_replicas, rank, seed):
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Iterate epoch `epoch` from position `start` (samples of its order already trained on)."""
        self.epoch = epoch
        self.start = min(max(start, 0), self.dataset_len)

    def epoch_order(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_len, generator=g).tolist()

    def _remaining_order(self):
        """The epoch order from `start`, padded (with the order's first samples) to a multiple of the world size."""
        order = self.epoch_order()
        remaining = order[self.start:]
        if not remaining:
            return []
        padding = -len(remaining) % self.num_replicas
        return remaining + list(itertools.islice(itertools.cycle(order), padding))

    def __iter__(self):
        return iter(self._remaining_order()[self.rank::self.num_replicas])

    def __len__(self):
        return math.ceil((self.dataset_len - self.start) / self.num_replicas)

    def position_after(self, batches, batch_size):
        """The epoch position once every rank has trained `batches` batches of `batch_size` from `start`:
        the whole epoch after its last batch (a left-out single sample included)."""
        if batches >= train_batches(len(self), batch_size):
            return self.dataset_len
        return min(self.start + batches * batch_size * self.num_replicas, self.dataset_len)


def train_sampler(dataset, world_size, rank, seed, deterministic):
    sampler = TrainSampler(len(dataset), num_replicas=world_size, rank=rank, seed=seed)
    return EpochIndexSampler(sampler) if deterministic else sampler


class SignalSafeLoader(DataLoader):
    """A DataLoader whose worker processes (and the forkserver they come from) start with the stop signals
    blocked: a SIGTERM sent to the whole process group, as clusters send it, must reach only the trainer,
    which finishes its step and saves. Before, the forkserver died of it and took every worker with it
    ('DataLoader worker exited unexpectedly'), losing the run."""

    def __iter__(self):
        with stop_signals_blocked():
            return super().__iter__()


def seed_worker(worker_id):
    """Give Python's and numpy's RNGs in each loader worker the seed torch chose for that worker, and
    leave the stop signals to the main process, which finishes the step and saves before anything exits."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    worker_seed = torch.initial_seed() % 2 ** 32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def habana_dataloader_class():
    """HabanaDataLoader when the habana_dataloader package is installed, else None."""
    try:
        import habana_dataloader
    except ImportError:
        return None
    return habana_dataloader.HabanaDataLoader


def worker_options(workers, start_method=None):
    """DataLoader options for `workers` persistent worker processes, which ignore SIGTERM (seed_worker).

    multiprocessing's own clean-up at exit ends workers with SIGTERM and then waits for them, so an exit
    hook that runs before it (atexit runs hooks in reverse order) ends any that are left.
    """
    if workers <= 0:
        return dict(num_workers=0)
    atexit.unregister(end_loader_workers)  # registered once, whatever the number of loaders
    atexit.register(end_loader_workers)
    return dict(num_workers=workers, worker_init_fn=seed_worker, persistent_workers=True,
                multiprocessing_context=start_method)


def make_loader(dataset, batch_size, sampler, workers, pin_memory, train, start_method=None, seed=0):
    """A torch DataLoader as the reference uses it, plus worker seeding and persistent workers.

    The loader draws its worker seeds from its own generator, never from the global RNG, so the
    global RNG (dropout) runs the same whether an epoch starts workers afresh or reuses them.
    """
    extra = dict(pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                 **worker_options(workers, start_method))
    if train:
        return SignalSafeLoader(dataset, batch_sampler=TrainBatchSampler(sampler, batch_size), **extra)
    return SignalSafeLoader(dataset, batch_size=batch_size, sampler=sampler, **extra)


def epoch_seed(seed, epoch):
    """Seed for the main process's RNG at the start of an epoch (dropout etc.), so resuming repeats it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def resolve_loader_kind(requested):
    """The loader that will really run for --dl-worker-type: HABANA needs the habana_dataloader package."""
    if requested == 'HABANA' and habana_dataloader_class() is None:
        print('habana_dataloader is not installed: --dl-worker-type HABANA uses the fast JPEG pipeline (FAST)')
        return 'FAST'
    return requested


def build_loaders(kind, dataset, dataset_test, train_sampler, test_sampler, batch_size, workers, dev,
                  crop_size=224, resize_size=256, val_crop_size=224, seed=0):
    """(train loader, validation loader) of the given kind (MP, HABANA or FAST).

    `seed` drives the fast pipeline's per-sample augmentation; the MP pipeline gets its seeding from
    SeededAugmentation / EpochIndexSampler instead.
    """
    if kind == 'HABANA':
        loader_cls = habana_dataloader_class()
        return tuple(loader_cls(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                pin_memory=True, drop_last=drop_last)
                     for ds, sampler, drop_last in ((dataset, train_sampler, True),
                                                    (dataset_test, test_sampler, False)))
    if kind == 'FAST':
        import fast_jpeg
        return fast_jpeg.build_loaders(dataset, dataset_test, train_sampler, test_sampler, batch_size, workers,
                                       dev, crop_size, resize_size, val_crop_size, seed)
    pin = dev.pin_memory()
    return (make_loader(dataset, batch_size, train_sampler, workers, pin, True, dev.worker_start_method, seed),
            make_loader(dataset_test, batch_size, test_sampler, workers, pin, False, dev.worker_start_method, seed))
