"""The DALI pipeline (dali.py) with DALI's CPU operators: the batches against FAST's and the reference
transforms, the samplers' order and shards, bad files, DALI's threads, and real runs of both trainers (stopped
and resumed, on 2 ranks through mpirun and the demo wrapper; the single-process stops are test_preemption's, which
run every loader). The GPU variant differs only in its device
strings; benchmarks/gpu_check.py measures it where DALI is installed next to a GPU.

DALI is an optional package: without it these tests skip, except on CI (CI=true), where .ci/run installs it and
a missing DALI fails them. The line a run without it gives is tested whatever is installed."""
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch
from torchvision import transforms

import main as googlenet
import train
from conftest import TINY_IMAGES, mpirun_prefix, read_until, require_dali, run_in_process, run_script, start_process
from test_fast_jpeg import CROP, RESIZE, VAL_CROP, expected_train_pixels, folders, ks_statistic, reference_val_pixels
from test_data import claim_size, mp_pixels
from test_demos import dry_run, printed_command
from test_preemption import STOPPED, assert_clean, finish, trained_per_rank

from classification import dali, data, devices, distributed, fast_jpeg, loaders, samplers

CPU = torch.device('cpu')
ONE_RANK = distributed.Ranks(0, 1, 0, False)


needs_dali = pytest.mark.usefixtures('installed_dali')


@pytest.fixture
def installed_dali():
    require_dali()


def built(root, kind, batch_size=8, workers=None, ranks=ONE_RANK, **settings):
    """The loaders of `kind`; DALI with 2 threads, FAST in this process unless `workers` says otherwise."""
    workers = (2 if kind == 'DALI' else 0) if workers is None else workers
    settings = loaders.LoaderSettings(kind=kind, batch_size=batch_size, workers=workers, seed=3, loader_seed=5,
                                      train_crop_size=CROP, val_resize_size=RESIZE, val_crop_size=VAL_CROP, **settings)
    return loaders.build(root, settings, ranks, devices.create('cpu').loader_placement())


def epoch(loaders_, number, augment=True):
    loaders_.train_sampler.set_epoch(number, augment=augment)
    return list(loaders_.train)


def grey_levels(normalised):
    """Normalised CHW images back to 0-255 pixels."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    return (normalised * std + mean) * 255


# --- without DALI ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('trainer', [train, googlenet], ids=['train.py', 'main.py'])
def test_without_dali_the_flag_is_one_line_naming_the_package_and_exit_2(trainer, jpeg_dataset, tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.setitem(sys.modules, 'nvidia.dali', None)  # what an import finds where the package is missing
    out = tmp_path / 'out'
    size_flags = TINY_IMAGES if trainer is train else ['--train-crop-size', '32', '--val-crop-size', '32',
                                                       '--val-resize-size', '40']
    status = run_in_process(trainer, ['--data-path', jpeg_dataset, '--device', 'cpu', '--dl-worker-type', 'dali',
                                      '--output-dir', str(out), *size_flags])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if 'error:' in line]
    assert status == 2 and len(errors) == 1, captured.err[-2000:]
    assert '--dl-worker-type DALI needs NVIDIA DALI' in errors[0] and f'pip install {dali.PACKAGE}' in errors[0]
    assert 'Loading data' not in captured.out and not out.exists()  # before any work


@pytest.mark.parametrize('script', ['demo_resnet.py', 'demo_mobilenet.py', 'demo_googlenet.py'])
def test_the_demo_wrappers_pass_the_flag_on(script):
    assert ' --dl-worker-type=DALI ' in printed_command(dry_run(script, '--dl-worker-type', 'dali', '--device', 'cpu'))


# --- batches --------------------------------------------------------------------------------------------

@needs_dali
def test_batches_are_normalised_float_channels_last_in_fasts_batch_counts(jpeg_dataset):
    dali_loaders, fast_loaders = built(jpeg_dataset, 'DALI', batch_size=47), built(jpeg_dataset, 'FAST', batch_size=47)
    assert dali_loaders.kind == 'DALI'
    assert [len(t) for _, t in epoch(dali_loaders, 0)] == [len(t) for _, t in epoch(fast_loaders, 0)] == [47]
    dali_loaders = built(jpeg_dataset, 'DALI', batch_size=8)
    batches = list(dali_loaders.val)
    assert [len(t) for _, t in batches] == [8, 8, 4] and len(dali_loaders.train) == 6
    images, targets = batches[0]
    assert images.dtype == torch.float32 and images.shape == (8, 3, VAL_CROP, VAL_CROP)
    assert images.is_contiguous(memory_format=torch.channels_last) and targets.dtype == torch.int64


@needs_dali
def test_an_epoch_trains_fasts_samples_crops_and_flips_for_the_same_seed(jpeg_dataset):
    """Same order, labels and windows as FAST; the pixels are torchvision's resized_crop (+ flip) of FAST's box for
    each sample within DALI's resampling (a fraction of a grey level on average): a wrong window or flip would be
    tens of grey levels off."""
    dali_batches, fast_batches = epoch(built(jpeg_dataset, 'DALI'), 2), epoch(built(jpeg_dataset, 'FAST'), 2)
    assert [t.tolist() for _, t in dali_batches] == [t.tolist() for _, t in fast_batches]
    train_set, _ = folders(jpeg_dataset)
    sampler = samplers.TrainSampler(len(train_set), 1, 0, 3)
    sampler.set_epoch(2)
    order = [i for batch in samplers.TrainBatchSampler(sampler, 8) for i in batch]
    images = torch.cat([images for images, _ in dali_batches])
    diffs = [(grey_levels(images[slot]) - expected_train_pixels(train_set.samples[index][0], 5, 2, index, CROP)[0])
             .abs().mean().item() for slot, index in enumerate(order)]
    assert max(diffs) < 0.5, max(diffs)


@needs_dali
def test_validation_and_plain_crop_pixels_are_the_references(jpeg_dataset):
    _, val_set = folders(jpeg_dataset)
    built_ = built(jpeg_dataset, 'DALI', batch_size=len(val_set))
    (images, targets), = list(built_.val)
    for slot, (path, label) in enumerate(val_set.samples):
        diff = (grey_levels(images[slot]) - reference_val_pixels(path)).abs()
        assert targets[slot] == label and diff.max() <= 1.01 and diff.mean() < 0.3
    plain = built(jpeg_dataset, 'DALI', plain_crop_epochs=True), built(jpeg_dataset, 'FAST', plain_crop_epochs=True)
    dali_batches, fast_batches = (epoch(loaders_, 1, augment=False) for loaders_ in plain)
    for (ours, _), (fasts, _) in zip(dali_batches, fast_batches):
        assert ((ours - fasts).abs() * 255 * 0.229).flatten(1).mean(1).max() < 0.5  # FAST: the reference's pixels


@needs_dali
def test_flips_and_crop_windows_are_fasts_draws_distributed_as_mps():
    """The windows and flips are FAST's draws; the windows are distributed as torchvision's RandomResizedCrop's (MP),
    half the images are flipped."""
    plans = dali.TrainPlans(CROP, seed=7, plain_resize_size=RESIZE)((4, list(range(4000)), True), [(375, 500)] * 4000)
    for index, plan in enumerate(plans[:200]):
        box, flip = fast_jpeg.augmented_crop(375, 500, fast_jpeg.sample_rng(7, 4, index))
        assert (plan.window, plan.mirror) == (box, flip) and plan.resize == (CROP, CROP)
    share = np.mean([plan.mirror for plan in plans])
    assert abs(share - 0.5) < 3 * 0.5 / np.sqrt(len(plans))
    torch.manual_seed(0)
    theirs = np.array([transforms.RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in plans])
    ours = np.array([plan.window for plan in plans])
    for column, name in enumerate(('top', 'left', 'height', 'width')):  # MP's crop sizes and places
        assert ks_statistic(ours[:, column], theirs[:, column]) < 1.95 * np.sqrt(2 / len(plans)), name


@needs_dali
def test_two_ranks_train_disjoint_shards_and_evaluate_every_image_once(jpeg_dataset):
    per_rank = [built(jpeg_dataset, 'DALI', batch_size=5, ranks=distributed.Ranks(rank, 2, rank, True))
                for rank in range(2)]
    trained = [sum(len(t) for _, t in epoch(loaders_, 1)) for loaders_ in per_rank]
    evaluated = [sum(len(t) for _, t in loaders_.val) for loaders_ in per_rank]
    assert trained == [24, 24] and evaluated == [10, 10]
    labels = sorted(label for loaders_ in per_rank for _, t in loaders_.val for label in t.tolist())
    assert labels == sorted(label for _, label in folders(jpeg_dataset)[1].samples)


@needs_dali
def test_workers_are_dalis_threads(jpeg_dataset):
    for workers, threads in ((2, 2), (0, 1)):
        built_ = built(jpeg_dataset, 'DALI', workers=workers)
        next(iter(built_.val))
        assert built_.val.pipe.num_threads == threads


@needs_dali
def test_an_epoch_left_early_leaves_the_next_one_whole(jpeg_dataset):
    """A stop or --num-train-steps leaves a scheduled batch in the pipeline; the next epoch must not see it."""
    left, fresh = built(jpeg_dataset, 'DALI'), built(jpeg_dataset, 'DALI')
    left.train_sampler.set_epoch(0)
    for step, _ in enumerate(left.train):
        if step == 1:
            break
    for (a, a_targets), (b, b_targets) in zip(epoch(left, 1), epoch(fresh, 1)):
        assert torch.equal(a, b) and torch.equal(a_targets, b_targets)


def rewrite_first_val_image(root, kind):
    """Replace the first validation image by the same picture as another kind of file; return its path."""
    from PIL import Image
    path = folders(root)[1].samples[0][0]
    with Image.open(path) as img:
        img = img.convert('RGB')
    os.remove(path)
    if kind == 'png':
        path = path[:-len('.JPEG')] + '.png'
        img.save(path)
    elif kind == '16-bit png':
        path = path[:-len('.JPEG')] + '.png'
        Image.fromarray(np.asarray(img.convert('L')).astype(np.uint16) * 257).save(path)
    elif kind == 'exif rotated':
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to view": torchvision's loader ignores it, so must DALI
        img.save(path, format='JPEG', quality=90, exif=exif)
    else:
        converted = {'cmyk': img.convert('CMYK'), 'grey': img.convert('L')}.get(kind, img)
        converted.save(path, format='JPEG', quality=90, progressive=kind == 'progressive')
    return path


@needs_dali
@pytest.mark.parametrize('kind', ['png', '16-bit png', 'cmyk', 'grey', 'progressive', 'exif rotated'])
def test_other_image_files_decode_like_the_reference(fresh_dataset, kind):
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=2)
    path = rewrite_first_val_image(root, kind)
    (images, _), = list(built(root, 'DALI', batch_size=4).val)
    slot = [p for p, _ in folders(root)[1].samples].index(path)
    diff = (grey_levels(images[slot]) - mp_pixels(path)).abs()  # the MP pipeline's: 16-bit images keep their high byte
    assert diff.mean() < 0.5, (diff.max().item(), diff.mean().item())


def truncate(path):
    with open(path, 'rb') as f:
        content = f.read()
    with open(path, 'wb') as f:
        f.write(content[:len(content) * 2 // 3])


def undefined_quantisation_table(path):
    """A header simplejpeg reads whose first component names a quantisation table the file lacks: only the
    decoder itself (DALI's, in the pipeline) finds out."""
    with open(path, 'rb') as f:
        content = bytearray(f.read())
    at = content.index(b'\xff\xc0')
    content[at + 12] = 3
    with open(path, 'wb') as f:
        f.write(bytes(content))


def text(path):
    with open(path, 'w') as f:
        f.write('this is not an image')


@needs_dali
@pytest.mark.parametrize('damage', [truncate, undefined_quantisation_table, text])
def test_an_unreadable_file_is_fasts_one_line_naming_it(fresh_dataset, damage):
    root = fresh_dataset(classes=2, train_per_class=4, val_per_class=2)
    path = os.path.join(root, 'train', 'class_01', sorted(os.listdir(os.path.join(root, 'train', 'class_01')))[1])
    damage(path)
    messages = []
    for kind in ('DALI', 'FAST'):
        with pytest.raises(fast_jpeg.ImageDecodeError) as raised:
            epoch(built(root, kind, batch_size=4, workers=0), 0)
        messages.append(str(raised.value))
    assert messages[0].startswith(f"--data-path: cannot decode image '{path}'"), messages
    assert messages[0].endswith('remove or replace the file') and '\n' not in messages[0]
    if damage is not truncate:  # truncated: DALI's line says so from the file's end, FAST's from PIL's words
        assert re.sub('0x[0-9a-f]+', '0x', messages[0]) == re.sub('0x[0-9a-f]+', '0x', messages[1])


@needs_dali
def test_a_huge_image_is_refused_from_its_header_as_mp_and_fast_refuse_it(fresh_dataset):
    root = fresh_dataset(classes=1, train_per_class=2, val_per_class=1)
    path = os.path.join(root, 'val', 'class_00', 'val_00_00000.JPEG')
    with open(path, 'rb') as f:
        content = claim_size(f.read(), 14000, 14000)
    with open(path, 'wb') as f:
        f.write(content)
    with pytest.raises(data.ImageTooLarge) as raised:
        list(built(root, 'DALI', workers=0).val)
    assert str(raised.value) == (f"--data-path: image '{path}' is 14000x14000 (196,000,000 pixels), more than the "
                                 'limit of 89,478,485 pixels; shrink or remove it')


# --- real runs ----------------------------------------------------------------------------------------------

def run_flags(batch_size=4):
    return ['--device', 'cpu', '--model', 'resnet18', '--batch-size', str(batch_size), '--workers', '2',
            '--print-freq', '2', '--dl-worker-type', 'DALI']


RUN = run_flags()


@pytest.mark.slow
@pytest.mark.mpi
@needs_dali
def test_two_ranks_through_the_demo_wrapper_stopped_and_resumed_under_plain_mpirun_with_another_batch_size(
        jpeg_dataset, tmp_path):
    """demo_resnet.py --world-size 2 with DALI, SIGTERM to its group in epoch 1; plain mpirun resumes with batches
    of 3: the rest of epoch 1 and all of epoch 2 trained, every validation image evaluated once per epoch."""
    out = tmp_path / 'out'
    proc = start_process(['demo_resnet.py', '--world-size', '2', *RUN, '--epochs', '2', '--deterministic',
                          '--data-path', jpeg_dataset, '--output-dir', str(out)])
    log = read_until(proc, r'^Epoch: \[1\]  \[0/6\]')
    os.killpg(proc.pid, signal.SIGTERM)
    log += finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert_clean(log)
    assert re.findall(r'^Test: evaluated (\d+) images$', log, flags=re.M) == ['20']  # epoch 0's, over both ranks
    stopped = STOPPED.search(log)
    assert stopped and stopped.group(2) == '1', log[-3000:]
    position = int(stopped.group(4))
    resumed = run_script(mpirun_prefix(2) + ['train.py', '--data-path', jpeg_dataset, *run_flags(batch_size=3),
                                             '--epochs', '3', '--output-dir', str(out), '--resume', stopped.group(6)])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rest_per_rank = -(-(48 - position) // 2)
    rest_per_rank -= rest_per_rank % 3 == 1  # a trailing single sample is left out
    assert trained_per_rank(resumed.stdout) == [rest_per_rank + 24] * 2, resumed.stdout[-3000:]
    assert re.findall(r'^Test: evaluated (\d+) images$', resumed.stdout, flags=re.M) == ['20', '20']


@pytest.mark.slow
@needs_dali
def test_main_py_trains_and_evaluates_with_dali(jpeg_dataset, tmp_path):
    result = run_script(['main.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--batch-size', '4',
                         '--workers', '2', '--print-interval', '2', '--dl-worker-type', 'DALI', '--epochs', '1',
                         '--train-crop-size', '32', '--val-crop-size', '32', '--val-resize-size', '40',
                         '--output-dir', str(tmp_path / 'out')], timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    assert re.search(r'^Test: evaluated 20 images$', result.stdout, flags=re.M), result.stdout[-2000:]
