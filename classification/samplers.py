"""What each training step reads, and with which random seed: the training and evaluation samplers, the
epoch position a mid-epoch stop records, and per-sample, per-epoch and per-worker seeding.

Every random draw of the input pipeline depends only on (seed, epoch, sample index), never on the number
of loader workers or the order in which they run, so that a run repeats and a resumed run continues
exactly (docs/data.md, *Determinism*, and docs/guarantees.md, *Where a resume continues*).
"""
import itertools
import math
import random
import signal

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

from .cli import STOP_SIGNALS


def sample_seed(seed, epoch, index):
    """A 63-bit seed that depends only on (seed, epoch, sample index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def train_key(key):
    """(epoch, item, augment, resolution) of a training key as the samplers below yield it: item is a sample
    index or a batch's indices; augment False: no scale/aspect augmentation (an LR-collapse phase); resolution:
    the epoch's training crop size (progressive resizing), None for the loader's own. Shorter keys (epoch,
    item[, augment]) mean augment True and the loader's resolution."""
    epoch, item, augment, resolution = (*key, *(True, None)[len(key) - 2:])
    return epoch, item, augment, resolution


class SeededAugmentation(torch.utils.data.Dataset):
    """Dataset whose items are keyed (epoch, index, augment, resolution) (see train_key): with a seed, each
    sample's random augmentation is seeded by (seed, epoch, index), so it does not depend on how many workers
    load it or in which order; `transform_for(augment, resolution)` (picklable: workers may be spawned) gives the
    transform of a key's setting, None for the dataset's own. The key travels with the sample, so persistent
    workers follow the epoch's setting."""

    def __init__(self, dataset, seed, transform_for=None):
        self.dataset = dataset
        self.seed = seed
        self.transform_for = transform_for

    def __len__(self):
        return len(self.dataset)

    def _load(self, index, augment, resolution):
        transform = self.transform_for(augment, resolution) if self.transform_for else None
        if transform is None:
            return self.dataset[index]
        path, target = self.dataset.samples[index]
        return transform(self.dataset.loader(path)), target

    def __getitem__(self, key):
        epoch, index, augment, resolution = train_key(key)
        if self.seed is None:
            return self._load(index, augment, resolution)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self._load(index, augment, resolution)

    def __getattr__(self, name):  # classes, samples, ... of the wrapped ImageFolder
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)


class EpochIndexSampler(Sampler):
    """Yields (epoch, index, augment, resolution) from a TrainSampler, for SeededAugmentation."""

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

    def set_epoch(self, epoch, start=0, augment=True, resolution=None):
        self.sampler.set_epoch(epoch, start, augment, resolution)

    def position_after(self, batches, batch_size):
        return self.sampler.position_after(batches, batch_size)

    def __iter__(self):
        epoch, augment, resolution = self.epoch, self.sampler.augment, self.sampler.resolution
        return ((epoch, index, augment, resolution) for index in self.sampler)

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
        self.augment = True
        self.resolution = None

    def set_epoch(self, epoch, start=0, augment=True, resolution=None):
        """Iterate epoch `epoch` from position `start` (samples of its order already trained on), with or without
        scale/aspect augmentation, at a training resolution (None: the loader's --train-crop-size); the loaders
        read both from the keys this sampler's wrappers yield."""
        self.epoch = epoch
        self.start = min(max(start, 0), self.dataset_len)
        self.augment = augment
        self.resolution = resolution

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


class EpochBatchSampler:
    """(epoch, indices, augment, resolution) for each training batch of the sampler's current epoch, batched like
    TrainBatchSampler (a trailing batch of one sample is left out)."""

    def __init__(self, sampler, batch_size):
        self.sampler = getattr(sampler, 'sampler', sampler)  # EpochIndexSampler wraps the real one
        self.batches = TrainBatchSampler(self.sampler, batch_size)

    def __iter__(self):
        epoch, augment = self.sampler.epoch, getattr(self.sampler, 'augment', True)
        resolution = getattr(self.sampler, 'resolution', None)
        return ((epoch, batch, augment, resolution) for batch in self.batches)

    def __len__(self):
        return len(self.batches)


def train_sampler(dataset, world_size, rank, seed, keyed):
    """The training sampler; `keyed`: yielding (epoch, index, augment, resolution) for SeededAugmentation."""
    sampler = TrainSampler(len(dataset), num_replicas=world_size, rank=rank, seed=seed)
    return EpochIndexSampler(sampler) if keyed else sampler


def epoch_seed(seed, epoch):
    """Seed for the main process's RNG at the start of an epoch (dropout etc.), so resuming repeats it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_worker(worker_id):
    """Give Python's and numpy's RNGs in each loader worker the seed torch chose for that worker, and
    leave the stop signals to the main process, which finishes the step and saves before anything exits."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    worker_seed = torch.initial_seed() % 2 ** 32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
