"""The one entry point of the input pipelines: `build` turns a dataset folder and the loader settings into
the training and validation loaders of the asked --dl-worker-type (MP, HABANA, FAST or DALI), with their
samplers.

MP is torch's DataLoader with the reference PIL transforms; FAST the fast JPEG pipeline (fast_jpeg.py),
whose uint8 batches are normalised on the device; HABANA Habana's habana_dataloader, or FAST where that
package is not installed; DALI NVIDIA DALI's pipeline (dali.py: on the GPU on CUDA, its CPU operators
elsewhere), fed with the same samplers' batches as FAST, its batches normalised already. `--data-path
synthetic` (SYNTHETIC) reads no files: one random uint8 batch made once on the device, normalised there as FAST's, for measuring compute alone. Every loader yields (images, targets)
ready for the device layer; on CUDA each but DALI's (which runs a batch ahead on its own) is wrapped in
prefetch.Prefetcher (LoaderSettings.prefetch), which copies (and normalises) the next batch on a side stream while
the current step computes.
"""
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import dali, data, fast_jpeg, prefetch, samplers, schedules
from .cli import UsageError

SYNTHETIC = 'synthetic'              # the --data-path that selects synthetic data (DLE's --data-backend name)
SYNTHETIC_CLASSES = 1000             # ImageNet-1k's
IMAGENET_VAL_IMAGES = 50000


class Loaders(NamedTuple):
    classes: list          # class names, in label order (the training split's)
    train_sampler: object  # set_epoch(epoch, position) before each epoch; position_after() after a stop
    train: object          # training loader
    val: object            # validation loader
    kind: str              # the loader that really runs: MP, HABANA, FAST, DALI or SYNTHETIC


def habana_dataloader_class():
    """HabanaDataLoader when the habana_dataloader package is installed, else None."""
    try:
        import habana_dataloader
    except ImportError:
        return None
    return habana_dataloader.HabanaDataLoader


def check_kind(requested, data_path=None):
    """Refuse, before any work starts, a loader whose optional package is missing where nothing can stand in
    for it (DALI; HABANA falls back to FAST). Synthetic data runs no loader."""
    if requested == 'DALI' and data_path != SYNTHETIC:
        dali.import_dali()


def resolve_kind(requested, say=True):
    """The loader that will really run for --dl-worker-type: HABANA needs the habana_dataloader package."""
    if requested == 'HABANA' and habana_dataloader_class() is None:
        if say:
            print('habana_dataloader is not installed: --dl-worker-type HABANA uses the fast JPEG pipeline (FAST)')
        return 'FAST'
    return requested


class Augmentation(NamedTuple):
    """The MP pipeline's training augmentation beyond the reference crop and flip (torchvision's flags)."""
    auto_augment: str = None
    random_erase: float = 0.0
    ra_magnitude: int = 9
    augmix_severity: int = 3

    def fast_refusal(self):
        """The flag the FAST pipeline cannot honour (it decodes, crops and flips in its workers), else None."""
        if self.auto_augment:
            return '--auto-augment'
        if self.random_erase:
            return '--random-erase'
        return None


NO_AUGMENTATION = Augmentation()


def load_datasets(data_path, *, train_crop_size, val_resize_size, val_crop_size, cache_dir=None, is_main=True,
                  augmentation=NO_AUGMENTATION):
    """(training ImageFolder, validation ImageFolder) of data_path/train and data_path/val, with upstream's
    progress lines. Validation takes the training split's labels; a validation class training lacks is an
    error, found before any file is listed."""
    train_dir = data.check_split_dir(data_path, 'train')
    val_dir = data.check_split_dir(data_path, 'val')
    print('Loading data')
    data.check_class_lists(train_dir, val_dir)
    print('Loading training data')
    started = time.time()
    dataset = data.image_folder(train_dir, data.train_transform(train_crop_size, *augmentation), cache_dir=cache_dir,
                                is_main=is_main)
    print('Took', time.time() - started)
    print('Loading validation data')
    dataset_test = data.image_folder(val_dir, data.eval_transform(val_resize_size, val_crop_size),
                                     labels_from=dataset, cache_dir=cache_dir, is_main=is_main)
    return dataset, dataset_test


def check_augmentation(kind, augmentation, plain_crop_epochs, progressive=False):
    """Refuse, before any file is listed, augmentation the loader that will run cannot do."""
    refused = augmentation.fast_refusal()
    if kind != 'MP' and refused:
        raise UsageError(f'{refused} runs in the MP pipeline\'s PIL transforms; --dl-worker-type {kind} '
                         'does RandomResizedCrop and flip (and mixup/cutmix on the device): use --dl-worker-type MP')
    if kind == 'HABANA' and plain_crop_epochs:
        raise UsageError('--dl-worker-type HABANA: habana_dataloader cannot turn off scale/aspect augmentation for '
                         'the schedule\'s noaug phase; use --dl-worker-type FAST or MP')
    if kind == 'HABANA' and progressive:
        raise UsageError('--dl-worker-type HABANA: habana_dataloader cannot change the training resolution per '
                         'epoch (--min-res/--max-res); use --dl-worker-type FAST or MP')


@dataclass(frozen=True)
class TrainTransforms:
    """The MP pipeline's training transform for a key's (augment, resolution) (samplers.train_key): None where
    the dataset's own (RandomResizedCrop(crop_size) + flip + `augmentation`) applies; a plain crop of the image
    resized to plain_resize_size (or to the crop, if larger) where augment is False; the same augmentation at
    another crop size for progressive resizing. A picklable value: spawned workers receive it."""
    crop_size: int
    plain_resize_size: int
    augmentation: Augmentation = NO_AUGMENTATION

    def __call__(self, augment, resolution):
        size = resolution or self.crop_size
        if not augment:
            return data.plain_crop_transform(max(self.plain_resize_size, size), size)
        if size == self.crop_size:
            return None
        return data.train_transform(size, *self.augmentation)


@dataclass(frozen=True)
class LoaderSettings:
    """What the trainers' data flags ask of the input pipelines, as one value.

    seed: the training order's (DistributedSampler's) seed. seeded: each sample's augmentation is drawn from
    (seed, epoch, index), so runs repeat (the FAST pipeline always does this, from loader_seed). cache_dataset:
    keep the file lists under output_dir (--cache-dataset). augmentation: --auto-augment and --random-erase (MP
    only). plain_crop_epochs: some epochs train without scale/aspect augmentation (train_sampler.set_epoch's
    `augment`; an LR-collapse phase), so the MP samples are keyed with the setting. synthetic_images: the
    training images of a synthetic epoch (default: ImageNet-1k's 1,281,167). prefetch: on CUDA, copy and
    normalise the next batch on a side stream while the current step computes (prefetch.py; --prefetch).
    """
    kind: str = 'MP'
    batch_size: int = 32
    workers: int = 0
    seed: int = 0
    seeded: bool = False
    loader_seed: int = 0
    train_crop_size: int = 224
    val_resize_size: int = 256
    val_crop_size: int = 224
    cache_dataset: bool = False
    output_dir: str = ''
    augmentation: Augmentation = NO_AUGMENTATION
    plain_crop_epochs: bool = False
    progressive: bool = False
    synthetic_images: int = None
    prefetch: bool = True

    @property
    def plain_resize_size(self):
        """The resize before a plain (unaugmented) training crop: the validation resize, or the crop if larger."""
        return max(self.val_resize_size, self.train_crop_size)


def build(data_path, settings, ranks, placement, force_prefetch=False):
    """Loaders for data_path (train/ and val/ class folders) as `settings` (LoaderSettings) ask, for this rank of
    `ranks` (distributed.Ranks: rank, world_size), on the device layer's `placement` (devices.LoaderPlacement:
    FAST normalises on the device), prefetched on CUDA (see prefetched; `force_prefetch`: on any device).
    data_path 'synthetic': build_synthetic's loaders (--dl-worker-type and the file options do not apply)."""
    if data_path == SYNTHETIC:
        return prefetched(build_synthetic(settings, ranks, placement.device), settings, placement, force_prefetch)
    kind = resolve_kind(settings.kind)
    check_kind(kind, data_path)
    check_augmentation(kind, settings.augmentation, settings.plain_crop_epochs, settings.progressive)
    cache_dir = data.dataset_cache_dir(settings.output_dir) if settings.cache_dataset else None
    dataset, dataset_test = load_datasets(data_path, train_crop_size=settings.train_crop_size,
                                          val_resize_size=settings.val_resize_size,
                                          val_crop_size=settings.val_crop_size, cache_dir=cache_dir,
                                          is_main=ranks.rank == 0, augmentation=settings.augmentation)
    print('Creating data loaders')
    keyed_mp = kind == 'MP' and (settings.seeded or settings.plain_crop_epochs or settings.progressive)
    train_sampler = samplers.train_sampler(dataset, ranks.world_size, ranks.rank, settings.seed, keyed_mp)
    test_sampler = samplers.ShardedEvalSampler(len(dataset_test), ranks.world_size, ranks.rank)
    classes = list(dataset.classes)
    if keyed_mp:
        dataset = samplers.SeededAugmentation(dataset, settings.seed if settings.seeded else None,
                                              TrainTransforms(settings.train_crop_size, settings.plain_resize_size,
                                                              settings.augmentation))
    splits = ((dataset, train_sampler, True), (dataset_test, test_sampler, False))
    if kind == 'HABANA':
        loader_class = habana_dataloader_class()
        train, val = (loader_class(ds, batch_size=settings.batch_size, sampler=sampler, num_workers=settings.workers,
                                   pin_memory=True, drop_last=is_train)
                      for ds, sampler, is_train in splits)
    elif kind == 'FAST':
        train, val = fast_jpeg.build_loaders(dataset, dataset_test, train_sampler, test_sampler, settings, placement)
    elif kind == 'DALI':
        train, val = dali.build_loaders(dataset, dataset_test, train_sampler, test_sampler, settings, placement.device)
        return Loaders(classes, train_sampler, train, val, kind)  # on the device already, a batch ahead
    else:
        train, val = (data.make_loader(ds, sampler, train=is_train, batch_size=settings.batch_size,
                                       workers=settings.workers, placement=placement, seed=settings.loader_seed)
                      for ds, sampler, is_train in splits)
    return prefetched(Loaders(classes, train_sampler, train, val, kind), settings, placement, force_prefetch)


def prefetched(built, settings, placement, force=False):
    """`built` (Loaders) with both loaders wrapped in prefetch.Prefetcher where settings.prefetch is on and
    placement.device is CUDA, or on any device with `force` (the tests run the same class on the CPU, without
    streams); on cpu and hpu the loaders as they are (Habana's own ones included)."""
    if not settings.prefetch or not (force or placement.device.type == 'cuda'):
        return built
    return built._replace(train=prefetch.onto_device(built.train, placement),
                          val=prefetch.onto_device(built.val, placement))


class SyntheticBatches:
    """`len(sampler)` samples of this rank in batches of `batch_size` (the last one shorter; for training, as
    samplers.train_batches counts them), all cut from one random uint8 NCHW batch (a channels_last view of an
    NHWC buffer, as FAST's) and its labels, made once on `device` (once per training resolution where the
    sampler's epoch sets one: progressive resizing). Iterating yields views: nothing is copied."""

    def __init__(self, sampler, batch_size, crop_size, device, seed, train, num_classes=SYNTHETIC_CLASSES):
        self.sampler = sampler
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.device = device
        self.seed = seed
        self.train = train
        self.batches = {}
        generator = torch.Generator().manual_seed(seed)
        self.images(crop_size, generator)
        self.targets = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)

    def images(self, size, generator=None):
        """The random batch of size x size images (made on first use)."""
        if size not in self.batches:
            generator = generator or torch.Generator().manual_seed(self.seed)
            nhwc = torch.randint(0, 256, (self.batch_size, size, size, 3), dtype=torch.uint8, generator=generator)
            self.batches[size] = nhwc.to(self.device).permute(0, 3, 1, 2)
        return self.batches[size]

    def __len__(self):
        samples = len(self.sampler)
        return samplers.train_batches(samples, self.batch_size) if self.train else math.ceil(samples / self.batch_size)

    def __iter__(self):
        samples = len(self.sampler)
        images = self.images(getattr(self.sampler, 'resolution', None) or self.crop_size)
        for step in range(len(self)):
            size = min(self.batch_size, samples - step * self.batch_size)
            yield images[:size], self.targets[:size]


def build_synthetic(settings, ranks, device, val_images=IMAGENET_VAL_IMAGES):
    """Loaders of synthetic data on `device`: each rank of `ranks` its share of an epoch of
    settings.synthetic_images training images (ImageNet's 1,281,167 by default; --num-train-steps shortens it
    as for real data) and of `val_images` validation ones, in batches of settings.batch_size at the settings'
    crop sizes, through the samplers real data uses (so resume and the step counts behave the same), labels in
    [0, 1000). The uint8 batches are normalised on the device as FAST's (fast_jpeg.NormalizedOnDevice)."""
    train_images = settings.synthetic_images or schedules.IMAGENET_TRAIN_IMAGES
    print(f'Synthetic data: {train_images} training and {val_images} validation images per epoch, '
          f'{SYNTHETIC_CLASSES} classes, one random batch made once on {device}; no files are read (so '
          '--dl-worker-type, --workers, --cache-dataset and the augmentation flags do not apply)')
    train_sampler = samplers.TrainSampler(train_images, ranks.world_size, ranks.rank, settings.seed)
    val_sampler = samplers.ShardedEvalSampler(val_images, ranks.world_size, ranks.rank)
    train = SyntheticBatches(train_sampler, settings.batch_size, settings.train_crop_size, device, settings.seed,
                             train=True)
    val = SyntheticBatches(val_sampler, settings.batch_size, settings.val_crop_size, device, settings.seed + 1,
                           train=False)
    classes = [f'synthetic_{i}' for i in range(SYNTHETIC_CLASSES)]
    return Loaders(classes, train_sampler, fast_jpeg.NormalizedOnDevice(train, device),
                   fast_jpeg.NormalizedOnDevice(val, device), 'SYNTHETIC')
