"""The CUDA input prefetcher (classification/prefetch.py), run on the CPU: loaders.build(..., force_prefetch=True)
wraps the loaders in the same Prefetcher class as on CUDA, there without streams, one batch ahead all the same.
Checked: the same batches (order and content, bit for bit; the same count) with and without it, for FAST, MP and
synthetic data, through short last batches, a loader of no batch, an epoch left early and in-process loader
workers. What only a GPU shows (the copy overlapping the step, and its speed) is not tested here; the last test
runs the real streams where CUDA is visible."""
import dataclasses
import itertools

import pytest
import torch

from classification import devices, distributed, fast_jpeg, loaders, prefetch

RANKS = distributed.Ranks(rank=0, world_size=1, local_rank=0, distributed=False)
BATCH = 7  # 48 training images: six batches of 7 and a short one of 6; 20 validation images: 7, 7 and 6


def loader_settings(kind, workers=0, batch_size=BATCH, **extra):
    return loaders.LoaderSettings(kind=kind, batch_size=batch_size, workers=workers, seed=3, seeded=True,
                                  loader_seed=3, train_crop_size=32, val_resize_size=40, val_crop_size=32, **extra)


def cpu_placement():
    """The CPU device layer's placement: unpinned memory, forkserver workers, channels_last images."""
    return devices.create('cpu', channels_last=True).loader_placement()


def data_path(kind, root):
    return loaders.SYNTHETIC if kind == 'SYNTHETIC' else root


def without_and_with(path, settings, placement):
    """(the loaders as the CPU runs them, the same loaders through the prefetcher)."""
    plain = loaders.build(path, settings, RANKS, placement)
    ahead = loaders.build(path, settings, RANKS, placement, force_prefetch=True)
    assert not isinstance(plain.train, prefetch.Prefetcher)
    assert isinstance(ahead.train, prefetch.Prefetcher) and isinstance(ahead.val, prefetch.Prefetcher)
    return plain, ahead


def assert_same_batches(expected, got, memory_format=torch.channels_last):
    """Both iterables hand over the same batches, in the same order, bit for bit; `got`'s images already in
    `memory_format`. Returns the batch sizes."""
    sizes = []
    for want, batch in itertools.zip_longest(expected, got):
        assert want is not None and batch is not None, 'not the same number of batches'
        (want_images, want_targets), (images, targets) = want, batch
        assert images.dtype == want_images.dtype == torch.float32 and images.shape == want_images.shape
        assert torch.equal(images, want_images) and torch.equal(targets, want_targets)
        assert images.is_contiguous(memory_format=memory_format)
        sizes.append(len(targets))
    return sizes


def train_epoch(built, epoch, start=0):
    built.train_sampler.set_epoch(epoch, start)
    return iter(built.train)


def check_epochs_and_validation(plain, ahead):
    """Two training epochs and the validation split, as the trainers read them (set_epoch first)."""
    assert len(ahead.train) == len(plain.train) and len(ahead.val) == len(plain.val)
    for epoch in (0, 1):
        expected = list(train_epoch(plain, epoch))
        assert assert_same_batches(expected, train_epoch(ahead, epoch)) == [len(t) for _, t in expected]
    return assert_same_batches(plain.val, ahead.val)


@pytest.mark.parametrize('kind', ['FAST', 'MP', 'SYNTHETIC'])
def test_the_prefetcher_hands_over_the_same_batches_in_the_same_order(jpeg_dataset, kind):
    settings = loader_settings(kind, synthetic_images=48)
    plain, ahead = without_and_with(data_path(kind, jpeg_dataset), settings, cpu_placement())
    val_sizes = check_epochs_and_validation(plain, ahead)
    plain.train_sampler.set_epoch(0)
    assert [len(t) for _, t in plain.train] == [7] * 6 + [6]  # the short last batch went through too
    assert val_sizes[-1] < BATCH
    if kind in ('FAST', 'SYNTHETIC'):  # the prefetcher normalises the uint8 batches itself, once
        assert not isinstance(ahead.train.loader, fast_jpeg.NormalizedOnDevice)
        assert ahead.train.prepare.__func__ is fast_jpeg.NormalizedOnDevice.normalise


@pytest.mark.slow  # loader worker processes
@pytest.mark.parametrize('kind', ['FAST', 'MP'])
def test_with_two_loader_workers_the_prefetcher_hands_over_the_same_batches(jpeg_dataset, kind):
    plain, ahead = without_and_with(jpeg_dataset, loader_settings(kind, workers=2), cpu_placement())
    check_epochs_and_validation(plain, ahead)
    check_a_stop_and_the_next_epochs(plain, ahead)


@pytest.mark.parametrize('kind', ['FAST', 'MP'])
def test_an_epoch_left_early_then_resumed_and_the_next_one_give_the_right_batches(jpeg_dataset, kind):
    plain, ahead = without_and_with(jpeg_dataset, loader_settings(kind), cpu_placement())
    check_a_stop_and_the_next_epochs(plain, ahead)


def check_a_stop_and_the_next_epochs(plain, ahead):
    """Two batches of epoch 0 read and the loop left (one more is prefetched and dropped); then the rest of
    epoch 0 from the stop's position, as a resume reads it, and the whole of epoch 1."""
    expected = list(train_epoch(plain, 0))
    read = list(itertools.islice(train_epoch(ahead, 0), 2))
    assert_same_batches(expected[:2], read)
    position = ahead.train_sampler.position_after(2, BATCH)
    assert_same_batches(train_epoch(plain, 0, position), train_epoch(ahead, 0, position))
    assert_same_batches(train_epoch(plain, 1), train_epoch(ahead, 1))
    stopped = iter(ahead.val)
    next(stopped)
    assert_same_batches(plain.val, ahead.val)  # a new iteration while the left one is still alive


def test_a_loader_of_no_batch_hands_over_none(fresh_dataset):
    root = fresh_dataset(classes=1, train_per_class=1, val_per_class=1)  # training leaves out a lone sample
    for kind in ('FAST', 'MP'):
        plain, ahead = without_and_with(root, loader_settings(kind), cpu_placement())
        assert len(ahead.train) == len(list(train_epoch(ahead, 0))) == 0
        assert assert_same_batches(plain.val, ahead.val) == [1]
    plain, ahead = without_and_with(loaders.SYNTHETIC, loader_settings('SYNTHETIC', synthetic_images=1),
                                    cpu_placement())
    assert len(ahead.train) == len(list(ahead.train)) == 0


def test_the_images_come_in_the_placements_memory_format(jpeg_dataset):
    placement = devices.create('cpu', channels_last=False).loader_placement()
    assert placement.memory_format == torch.contiguous_format
    for kind in ('FAST', 'MP'):  # FAST's batches are channels_last views, MP's contiguous
        plain, ahead = without_and_with(jpeg_dataset, loader_settings(kind), placement)
        assert_same_batches(plain.val, ahead.val, memory_format=torch.contiguous_format)


def test_prefetching_applies_on_cuda_only_and_where_the_setting_asks_for_it(jpeg_dataset):
    settings = loader_settings('FAST')
    built = loaders.build(jpeg_dataset, settings, RANKS, cpu_placement())
    on = {kind: loaders.prefetched(built, settings, cpu_placement()._replace(device=torch.device(kind)))
          for kind in ('cpu', 'hpu', 'cuda')}
    assert on['cpu'] is built and on['hpu'] is built  # hpu: Habana's loaders (or FAST) as they are
    assert isinstance(on['cuda'].train, prefetch.Prefetcher) and on['cuda'].train.loader is built.train.loader
    assert on['cuda'].train_sampler is built.train_sampler and on['cuda'].kind == built.kind
    off = dataclasses.replace(settings, prefetch=False)
    assert loaders.prefetched(built, off, cpu_placement(), force=True) is built
    assert loaders.build(jpeg_dataset, off, RANKS, cpu_placement(), force_prefetch=True).train.__class__ \
        is fast_jpeg.NormalizedOnDevice


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU: the side stream itself')
@pytest.mark.parametrize('kind', ['FAST', 'MP', 'SYNTHETIC'])
def test_on_cuda_the_side_stream_hands_over_the_same_batches(jpeg_dataset, kind):
    placement = devices.LoaderPlacement(torch.device('cuda', 0), pin_memory=True,
                                        worker_start_method='forkserver', memory_format=torch.channels_last)
    path = data_path(kind, jpeg_dataset)
    plain = loaders.build(path, loader_settings(kind, synthetic_images=48, prefetch=False), RANKS, placement)
    ahead = loaders.build(path, loader_settings(kind, synthetic_images=48), RANKS, placement)
    assert isinstance(ahead.train, prefetch.Prefetcher) and not isinstance(plain.train, prefetch.Prefetcher)
    for epoch in (0, 1):
        expected = [(images.contiguous(memory_format=torch.channels_last), targets)
                    for images, targets in train_epoch(plain, epoch)]
        got = [(images * 1, targets) for images, targets in train_epoch(ahead, epoch)]  # read on the compute stream
        assert_same_batches(expected, got)
    assert all(images.device.type == 'cuda' for images, _ in ahead.val)
