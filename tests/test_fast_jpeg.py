"""The fast JPEG pipeline (fast_jpeg.py): batch layout, crop distribution, determinism, pixels against
the reference transforms, bad files, and a real train.py run. No speed is asserted here."""
import math
import os
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data.distributed import DistributedSampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from conftest import TINY_IMAGES, run_script

from classification import data, devices, fast_jpeg, samplers
from classification.loaders import LoaderSettings

CROP, RESIZE, VAL_CROP = 32, 40, 32  # TINY_IMAGES


def folders(root):
    return (torchvision.datasets.ImageFolder(os.path.join(root, 'train')),
            torchvision.datasets.ImageFolder(os.path.join(root, 'val')))


def loaders(root, batch_size=8, workers=0, seed=3, num_replicas=1, rank=0, normalised=False):
    """(train loader, val loader, train sampler) of the fast pipeline; the loaders' uint8 batches, or with
    `normalised` the float batches NormalizedOnDevice makes of them, as training reads them."""
    train, val = folders(root)
    sampler = DistributedSampler(train, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
    test_sampler = samplers.ShardedEvalSampler(len(val), num_replicas, rank)
    dev = devices.create('cpu')
    settings = LoaderSettings(kind='FAST', batch_size=batch_size, workers=workers, loader_seed=seed,
                              train_crop_size=CROP, val_resize_size=RESIZE, val_crop_size=VAL_CROP)
    built = fast_jpeg.build_loaders(train, val, sampler, test_sampler, settings, dev.loader_placement())
    train_loader, val_loader = built if normalised else (loader.loader for loader in built)
    return train_loader, val_loader, sampler


def epoch_batches(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return list(loader)


def reference_val_pixels(path, resize=RESIZE, crop=VAL_CROP):
    """The reference validation transform up to the uint8 tensor (before ToTensor's scaling)."""
    to_pixels = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.PILToTensor()])
    with Image.open(path) as img:
        return to_pixels(img.convert('RGB'))


def assert_close_pixels(ours, reference, max_diff=1, mean_diff=0.05):
    """The stated tolerance: no pixel more than max_diff grey levels off, mean difference below mean_diff."""
    diff = (ours.int() - reference.int()).abs().float()
    assert diff.max() <= max_diff and diff.mean() <= mean_diff, (diff.max().item(), diff.mean().item())


# --- batch layout ------------------------------------------------------------------------------------

def test_batches_are_uint8_channels_last_with_int64_targets(jpeg_dataset):
    train_loader, val_loader, sampler = loaders(jpeg_dataset, batch_size=8)
    images, targets = epoch_batches(train_loader, sampler, 0)[0]
    assert images.dtype == torch.uint8 and images.shape == (8, 3, CROP, CROP)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert targets.dtype == torch.int64 and targets.shape == (8,)
    images, targets = next(iter(val_loader))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, VAL_CROP, VAL_CROP)
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_uint8_batches_are_normalised_on_the_device_like_the_reference(jpeg_dataset):
    _, val_loader, _ = loaders(jpeg_dataset, batch_size=4, normalised=True)
    normalised, _ = next(iter(val_loader))
    assert len(val_loader) == 5 and normalised.is_contiguous(memory_format=torch.channels_last)
    reference = data.eval_transform(RESIZE, VAL_CROP)(Image.open(folders(jpeg_dataset)[1].samples[0][0]).convert('RGB'))
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised[0], reference, atol=1.01 / 255 / 0.224)  # one grey level


def test_batch_counts_follow_the_reference_loaders(jpeg_dataset):
    # 48 train images: batch 47 leaves a trailing batch of one, which training drops; 20 val images
    # in batches of 8 end with a partial batch of 4, which validation keeps.
    train_loader, val_loader, sampler = loaders(jpeg_dataset, batch_size=47)
    assert [len(t) for _, t in epoch_batches(train_loader, sampler, 0)] == [47]
    train_loader, val_loader, sampler = loaders(jpeg_dataset, batch_size=8)
    assert [len(t) for _, t in val_loader] == [8, 8, 4]
    assert len(train_loader) == 6 and len(val_loader) == 3


def test_each_rank_reads_its_own_shard(jpeg_dataset):
    train, _ = folders(jpeg_dataset)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(train, num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(3)
        keys = list(samplers.EpochBatchSampler(sampler, 8))
        assert {(epoch, augment, resolution) for epoch, _, augment, resolution in keys} == {(3, True, None)}
        assert [batch for _, batch, _, _ in keys] == list(samplers.TrainBatchSampler(sampler, 8))
        shards.append({i for _, batch, _, _ in keys for i in batch})
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == len(train)


# --- crop parameters -----------------------------------------------------------------------------------

def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov distance between the empirical distributions of a and b."""
    values = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), values, side='right') / len(a)
    cdf_b = np.searchsorted(np.sort(b), values, side='right') / len(b)
    return np.abs(cdf_a - cdf_b).max()


@pytest.mark.parametrize('height,width', [(375, 500), (64, 48), (60, 400)])
def test_crop_boxes_follow_torchvision_distribution(height, width):
    n = 4000
    ours = np.array([fast_jpeg.random_resized_crop_box(height, width, np.random.default_rng(samplers.sample_seed(0, 0, i)))
                     for i in range(n)])
    torch.manual_seed(0)
    picture = torch.empty(3, height, width)
    theirs = np.array([transforms.RandomResizedCrop.get_params(picture, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)])
    critical = 1.95 * math.sqrt(2 / n)  # two-sample KS at alpha = 0.001
    for column, name in enumerate(('top', 'left', 'height', 'width')):
        assert ks_statistic(ours[:, column], theirs[:, column]) < critical, name
    areas = ours[:, 2] * ours[:, 3] / (height * width)
    assert areas.min() >= 0.08 - 0.02 and areas.max() <= 1.0
    assert np.all(ours[:, 0] + ours[:, 2] <= height) and np.all(ours[:, 1] + ours[:, 3] <= width)
    fallback = fast_jpeg.ratio_clamped_centre_box(height, width)
    share = lambda boxes: np.mean([tuple(b) == fallback for b in boxes])  # noqa: E731
    assert abs(share(ours) - share(theirs)) < 0.03


def test_fallback_box_is_torchvisions_centre_crop():
    for height, width in ((60, 400), (400, 60), (100, 110)):
        picture = torch.empty(3, height, width)
        expected = transforms.RandomResizedCrop.get_params(picture, [1.5, 1.6], [3 / 4, 4 / 3])  # no try fits
        assert fast_jpeg.ratio_clamped_centre_box(height, width) == tuple(expected)


# --- determinism -----------------------------------------------------------------------------------------

@pytest.mark.slow  # loader workers
def test_augmentation_depends_on_seed_epoch_and_index_only(jpeg_dataset):
    results = {}
    for workers in (0, 2):
        train_loader, _, sampler = loaders(jpeg_dataset, batch_size=8, workers=workers)
        results[workers] = [epoch_batches(train_loader, sampler, epoch) for epoch in (1, 2)]
    for (a_images, a_targets), (b_images, b_targets) in zip(results[0][0] + results[0][1],
                                                              results[2][0] + results[2][1]):
        assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)
    epoch_1, epoch_2 = (torch.cat([images for images, _ in batches]) for batches in results[0])
    assert not torch.equal(epoch_1, epoch_2)


def test_a_sample_gets_the_same_crop_in_any_batch(jpeg_dataset):
    train, _ = folders(jpeg_dataset)
    batches = fast_jpeg.TrainBatches(train.samples, CROP, seed=9)
    alone, _ = batches[(4, [7])]
    among, _ = batches[(4, [3, 7, 11])]
    assert torch.equal(alone[0], among[1])


# --- pixels against the reference transforms -----------------------------------------------------------------

def test_validation_pixels_equal_the_reference_within_one_grey_level(jpeg_dataset):
    _, val = folders(jpeg_dataset)
    batch, targets = fast_jpeg.EvalBatches(val.samples, RESIZE, VAL_CROP)[list(range(len(val)))]
    for slot, (path, label) in enumerate(val.samples):
        assert targets[slot] == label
        assert_close_pixels(batch[slot], reference_val_pixels(path))


def test_imagenet_sized_validation_pixels_equal_the_reference(imagenet_like):
    _, val = folders(imagenet_like)
    batch, _ = fast_jpeg.EvalBatches(val.samples, 256, 224)[list(range(len(val)))]
    for slot, (path, _) in enumerate(val.samples):
        assert_close_pixels(batch[slot], reference_val_pixels(path, 256, 224), mean_diff=0.01)


def expected_train_pixels(path, seed, epoch, index, size):
    """torchvision's resized_crop + flip of the box and flip the fast pipeline draws for this sample."""
    rng = np.random.default_rng(samplers.sample_seed(seed, epoch, index))
    with Image.open(path) as img:
        img = img.convert('RGB')
        box = fast_jpeg.random_resized_crop_box(img.height, img.width, rng)
        pixels = TF.pil_to_tensor(TF.resized_crop(img, *box, [size, size]))
    return (pixels.flip(2) if rng.random() < 0.5 else pixels), box


@pytest.mark.parametrize('region_decode', [True, False])
def test_training_pixels_equal_torchvisions_resized_crop_of_the_same_box(imagenet_like, region_decode):
    train, _ = folders(imagenet_like)
    batches = fast_jpeg.TrainBatches(train.samples, 224, seed=5, region_decode=region_decode)
    indices = list(range(len(train)))
    images, _ = batches[(2, indices)]
    compared = 0
    for index in indices:
        expected, box = expected_train_pixels(train.samples[index][0], 5, 2, index, 224)
        if fast_jpeg.dct_reduction(box[2], box[3], 224, 224) == 1:
            assert_close_pixels(images[index], expected, max_diff=2)
            compared += 1
    assert compared >= len(indices) // 2


def test_half_scale_decode_of_large_crops_stays_close(tmp_path, imagenet_like):
    # A crop at least twice the output decodes at half scale: close to torchvision, not equal.
    path = str(tmp_path / 'large.jpg')
    with Image.open(folders(imagenet_like)[0].samples[0][0]) as img:
        img.convert('RGB').resize((img.width * 2, img.height * 2), Image.BICUBIC).save(path, quality=90)
    image = fast_jpeg.EncodedImage(path)
    box = (4, 6, image.height - 10, image.width - 12)
    assert fast_jpeg.dct_reduction(box[2], box[3], 224, 224) == 2
    out = torch.empty(224, 224, 3, dtype=torch.uint8)
    fast_jpeg.resize_into(out, image.decode_box(box, 2))
    with Image.open(path) as img:
        expected = TF.pil_to_tensor(TF.resized_crop(img.convert('RGB'), *box, [224, 224]))
    assert_close_pixels(out.permute(2, 0, 1), expected, max_diff=64, mean_diff=3.0)


# --- region decoder (csrc/jpeg_region.c) ---------------------------------------------------------------------

needs_region_decoder = pytest.mark.skipif(fast_jpeg.REGION_DECODER is None,
                                          reason='region decoder not built (sh csrc/build.sh)')


@needs_region_decoder
@pytest.mark.parametrize('reduction', [1, 2])
def test_region_decoder_gives_the_full_decodes_pixels(imagenet_like, reduction):
    rng = np.random.default_rng(0)
    for path, _ in folders(imagenet_like)[0].samples:
        image = fast_jpeg.EncodedImage(path)
        full = image.decode(reduction)
        for _ in range(4):
            box = fast_jpeg.random_resized_crop_box(image.height, image.width, rng)
            scaled = fast_jpeg.scale_box(box, (image.height, image.width), full.shape[:2])
            top, left, h, w = scaled
            assert np.array_equal(image.decode_region(scaled, reduction), full[top:top + h, left:left + w])


@needs_region_decoder
def test_region_decoder_declines_bad_data_and_boxes(imagenet_like):
    image = fast_jpeg.EncodedImage(folders(imagenet_like)[0].samples[0][0])
    assert image.decode_region((image.height - 5, 0, 10, 10), 1) is None  # past the bottom
    image.encoded = image.encoded[:len(image.encoded) // 2]
    assert image.decode_region((0, 0, image.height, image.width), 1) is None  # truncated


# --- files that are not plain JPEGs -----------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['png', 'cmyk', 'grey', 'progressive'])
def test_other_image_files_decode_like_the_reference(fresh_dataset, kind):
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=2)
    _, val = folders(root)
    source = val.samples[0][0]
    with Image.open(source) as img:
        img = img.convert('RGB')
    os.remove(source)
    if kind == 'png':
        img.save(source[:-len('.JPEG')] + '.png')
    else:
        converted = {'cmyk': img.convert('CMYK'), 'grey': img.convert('L')}.get(kind, img)
        converted.save(source, format='JPEG', quality=90, progressive=kind == 'progressive')
    _, val = folders(root)
    batch, _ = fast_jpeg.EvalBatches(val.samples, RESIZE, VAL_CROP)[list(range(len(val)))]
    for slot, (path, _) in enumerate(val.samples):
        assert_close_pixels(batch[slot], reference_val_pixels(path), mean_diff=0.5)
    train_batch, _ = fast_jpeg.TrainBatches(val.samples, CROP, seed=1)[(0, list(range(len(val))))]
    assert train_batch.shape == (len(val), 3, CROP, CROP)


def damage(root, how):
    """Damage the first validation file: truncate it or replace it with text; return its path."""
    path = folders(root)[1].samples[0][0]
    with open(path, 'rb') as f:
        content = f.read()
    with open(path, 'wb') as f:
        f.write(content[:len(content) // 3] if how == 'truncated' else b'not an image at all\n')
    return path


@pytest.mark.parametrize('how', ['truncated', 'text'])
@pytest.mark.parametrize('workers', [0, pytest.param(1, marks=pytest.mark.slow)])  # 1: a loader worker process
def test_unreadable_file_raises_an_error_naming_it(fresh_dataset, how, workers):
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=2)
    path = damage(root, how)
    _, val_loader, _ = loaders(root, batch_size=4, workers=workers)
    batches = iter(val_loader)
    with pytest.raises(fast_jpeg.ImageDecodeError, match=re.escape(path)):
        list(batches)
    # A trainer ends here, and its exit hook kills the workers (cli.end_loader_workers); this test process lives
    # on, and torch's clean-up of a loader left by an error waits 10 s for a worker that ignores SIGTERM.
    for worker in getattr(batches, '_workers', []):
        worker.kill()


# --- the trainer -------------------------------------------------------------------------------------------------

def train_losses(output):
    return [re.search(r'loss: ([0-9.]+)', line).group(1) for line in output.splitlines()
            if line.startswith('Epoch: [0]') and 'loss: ' in line]


@pytest.mark.slow
def test_train_py_runs_with_the_fast_pipeline_whatever_the_workers(jpeg_dataset, tmp_path):
    runs = {}
    for workers in (0, 2):
        result = run_script(['train.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--dl-worker-type', 'FAST',
                             '--model', 'resnet18', '--epochs', '1', '--batch-size', '8', '--workers', str(workers),
                             '--num-train-steps', '3', '--print-freq', '1', '--deterministic',
                             '--output-dir', str(tmp_path), *TINY_IMAGES])
        assert result.returncode == 0, result.stderr[-3000:]
        assert 'Acc@1' in result.stdout
        runs[workers] = train_losses(result.stdout)
    assert len(runs[0]) == 3 and runs[0] == runs[2]


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def imagenet_like(tmp_path_factory):
    """2 classes, 3 train and 2 val ImageNet-sized JPEGs each."""
    import sample_data
    root = tmp_path_factory.mktemp('imagenet_like')
    sample_data.make_dataset(str(root), classes=2, train_per_class=3, val_per_class=2, imagenet_like=True, seed=4)
    return str(root)
