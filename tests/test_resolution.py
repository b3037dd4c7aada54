"""Issue 21: FFCV's training and test resolutions (progressive resizing, --tta-flip) and the ffcv-* recipes."""
import json
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import TINY_IMAGES, read_until, run_in_process, run_script, start_process
from classification import devices, distributed, loaders, recipes, resolution, samplers, training
import inference
import main as main_trainer
import train

RANKS = distributed.Ranks(rank=0, world_size=1, local_rank=0, distributed=False)

# FFCV's ffcv-imagenet rn50/rn18 configs (spec-gpu-and-time-to-accuracy.md 4), written out as the spec gives them.
FFCV_CONFIGS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}
FFCV_RN50 = dict(model='resnet50', batch_size=512, gpus=8, lr=1.7, weight_decay=1e-4)
FFCV_RN18 = dict(model='resnet18', batch_size=1024, gpus=1, lr=0.5, weight_decay=5e-5)


def ffcv_get_resolution(epoch, min_res, max_res, start_ramp, end_ramp):
    """FFCV's rule as its trainer states it, written here independently of resolution.py."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interpolated = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interpolated[0] / 32)) * 32


# --- the rule ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('epochs', sorted(FFCV_CONFIGS))
def test_the_resolution_of_every_epoch_of_each_ffcv_config_is_ffcvs(epochs):
    start_ramp, end_ramp = FFCV_CONFIGS[epochs]
    schedule = resolution.from_flags(160, 192, start_ramp, end_ramp)
    assert [schedule.at(e) for e in range(epochs)] == [ffcv_get_resolution(e, 160, 192, start_ramp, end_ramp)
                                                       for e in range(epochs)]
    wide = resolution.from_flags(128, 256, 3, 9)  # a ramp long enough to pass through several multiples of 32
    assert [wide.at(e) for e in range(12)] == [ffcv_get_resolution(e, 128, 256, 3, 9) for e in range(12)]
    assert [wide.at(e) for e in range(12)] == [128, 128, 128, 128, 160, 160, 192, 224, 224, 256, 256, 256]


def test_no_flag_is_no_schedule_and_the_rounding_can_be_finer():
    assert resolution.from_flags() is None
    fine = resolution.from_flags(16, 48, 1, 3, rounding=8)
    assert [fine.at(e) for e in range(5)] == [16, 16, 32, 48, 48]


@pytest.mark.parametrize('trainer', [train, main_trainer], ids=['train.py', 'main.py'])
@pytest.mark.parametrize('argv, message', [
    (['--min-res', '160', '--max-res', '192', '--start-ramp', '5', '--end-ramp', '3'],
     '--end-ramp (3) must not come before --start-ramp (5): the ramp would end before it starts'),
    (['--min-res', '0', '--max-res', '192', '--start-ramp', '1', '--end-ramp', '3'], '--min-res must be positive'),
    (['--min-res', '-32', '--max-res', '-16', '--start-ramp', '1', '--end-ramp', '3'], '--min-res must be positive'),
    (['--min-res', '160', '--max-res', '0', '--start-ramp', '1', '--end-ramp', '3'], '--max-res must be positive'),
    (['--min-res', '192', '--max-res', '160', '--start-ramp', '1', '--end-ramp', '3'],
     '--min-res (192) must not exceed --max-res (160)'),
    (['--min-res', '160', '--max-res', '192'], '--start-ramp, --end-ramp missing'),
    (['--min-res', '160', '--max-res', '192', '--start-ramp', '1', '--end-ramp', '3', '--res-rounding', '0'],
     '--res-rounding must be positive'),
])
def test_a_bad_ramp_or_resolution_is_one_line_exit_2_and_nothing_written(trainer, argv, message, tmp_path, capsys):
    code = run_in_process(trainer, ['--data-path', str(tmp_path / 'none'), '--output-dir', str(tmp_path / 'out'),
                                    '--device', 'cpu', *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'out').exists()


def test_print_schedule_shows_the_resolution_of_each_run_of_epochs(capsys):
    code = run_in_process(train, ['--print-schedule', '--data-path', 'x', '--epochs', '16', '--min-res', '160',
                                  '--max-res', '192', '--start-ramp', '11', '--end-ramp', '13'])
    out = capsys.readouterr().out
    assert code == 0
    assert 'Progressive resizing: 160 px to epoch 11, ramp to 192 px at epoch 13 (multiples of 32), 192 px after' in out
    assert '  epochs 0-11: train at 160 px\n  epochs 12-15: train at 192 px' in out


# --- every loader trains at the epoch's resolution ---------------------------------------------------------------

def progressive_settings(kind, workers=0, **extra):
    return loaders.LoaderSettings(kind=kind, batch_size=5, workers=workers, seed=3, seeded=True, loader_seed=3,
                                  train_crop_size=32, val_resize_size=40, val_crop_size=32, progressive=True, **extra)


def batch_sizes_per_epoch(built, resolutions, dev=None):
    """{epoch: set of (H, W) of its training batches} with the sampler set as the trainers set it; with the device
    layer `dev`, each batch also goes through its to_device, as the training step's do, and must come out
    channels-last at every resolution."""
    seen = {}
    for epoch, size in enumerate(resolutions):
        built.train_sampler.set_epoch(epoch, 0, True, size)
        seen[epoch] = set()
        for images, targets in built.train:
            if dev is not None:
                images, _ = dev.to_device(images, targets)
                assert images.is_contiguous(memory_format=torch.channels_last), (epoch, size)
            seen[epoch].add(tuple(images.shape[2:]))
    return seen


LOADER_KINDS = ['MP', 'FAST', 'HABANA', 'SYNTHETIC']


@pytest.mark.parametrize('kind', LOADER_KINDS)
def test_each_loader_trains_at_the_resolution_its_epoch_sets(kind, jpeg_dataset):
    dev = devices.create('cpu', channels_last=True)
    path = loaders.SYNTHETIC if kind == 'SYNTHETIC' else jpeg_dataset
    built = loaders.build(path, progressive_settings(kind, synthetic_images=20), RANKS, dev.loader_placement())
    assert batch_sizes_per_epoch(built, [16, 24, None, 48], dev) == {0: {(16, 16)}, 1: {(24, 24)}, 2: {(32, 32)},
                                                                3: {(48, 48)}}
    assert {tuple(images.shape[2:]) for images, _ in built.val} == {(32, 32)}  # validation keeps its own size


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['MP', 'FAST'])
def test_persistent_loader_workers_follow_the_resolution_from_epoch_to_epoch(kind, jpeg_dataset):
    """--workers 2: the workers live across epochs (persistent), so the resolution must travel in the keys."""
    placement = devices.create('cpu', channels_last=True).loader_placement()
    built = loaders.build(jpeg_dataset, progressive_settings(kind, workers=2), RANKS, placement)
    assert batch_sizes_per_epoch(built, [16, 48, 24]) == {0: {(16, 16)}, 1: {(48, 48)}, 2: {(24, 24)}}


def test_dalis_plans_crop_at_the_keys_resolution():
    dali = pytest.importorskip('classification.dali')
    plans = dali.TrainPlans(32, seed=3, plain_resize_size=40)
    for augment in (True, False):
        for size in (16, 48):
            for plan in plans((0, [0, 1, 2], augment, size), [(60, 80), (80, 60), (50, 50)]):
                assert plan.crop[2:] == (size, size) and (not augment or plan.resize == (size, size))
    assert {plan.crop[2:] for plan in plans((0, [0]), [(60, 80)])} == {(32, 32)}


def test_a_key_without_resolution_is_the_loaders_own():
    assert samplers.train_key((3, [1, 2])) == (3, [1, 2], True, None)
    assert samplers.train_key((3, 7, False)) == (3, 7, False, None)
    assert samplers.train_key((3, 7, True, 64)) == (3, 7, True, 64)


def test_habana_loader_itself_is_refused_with_a_schedule(monkeypatch):
    monkeypatch.setattr(loaders, 'habana_dataloader_class', lambda: object)
    with pytest.raises(loaders.UsageError, match='cannot change the training resolution per epoch'):
        loaders.check_augmentation('HABANA', loaders.NO_AUGMENTATION, False, progressive=True)


# --- end to end: the epochs' lines and records, a resume in the ramp ----------------------------------------------

RAMP = ['--min-res', '16', '--max-res', '48', '--start-ramp', '1', '--end-ramp', '3', '--res-rounding', '8']
SCHEDULED = {0: 16, 1: 16, 2: 32, 3: 48}


def epoch_resolutions(out):
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    return ({r['epoch']: r['train.resolution'] for r in records if r['type'] == 'epoch'},
            [r['progressive_resizing'] for r in records if r['type'] == 'header'])


def trained_at(log):
    return {int(e): int(r) for e, r in re.findall(r'^Epoch (\d+): training at (\d+) px', log, re.M)}


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['MP', 'FAST'])
def test_train_py_stopped_in_the_ramp_resumes_at_the_schedules_resolution(kind, jpeg_dataset, tmp_path):
    out = tmp_path / 'out'
    flags = ['train.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--model', 'resnet18', '--batch-size', '4',
             '--workers', '2', '--print-freq', '2', *TINY_IMAGES, '--dl-worker-type', kind, '--epochs', '4',
             '--deterministic', '--output-dir', str(out), '--num-eval-steps', '1', *RAMP]
    proc = start_process(flags)
    log = read_until(proc, r'^Epoch: \[2\]  \[ ?2/12\]')
    proc.send_signal(signal.SIGTERM)
    log += proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and re.search(r'Stopped by SIGTERM: saved epoch 2 after step', log), log[-3000:]
    assert trained_at(log) == {0: 16, 1: 16, 2: 32}
    resumed = run_script([*flags, '--resume', str(out / 'checkpoint.pth')])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    resumed = resumed.stdout
    assert re.search(r'^Resuming epoch 2 at step \d+', resumed, re.M), resumed[-3000:]
    assert trained_at(resumed) == {2: 32, 3: 48}
    records, headers = epoch_resolutions(out)
    assert records == SCHEDULED
    assert headers == [{'min_res': 16, 'max_res': 48, 'start_ramp': 1, 'end_ramp': 3, 'res_rounding': 8}] * 2


@pytest.mark.slow
def test_main_py_trains_each_epoch_at_the_schedules_resolution(jpeg_dataset, tmp_path):
    out = tmp_path / 'out'
    log = run_script(['main.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--model', 'resnet18',
                      '--batch-size', '4', '--workers', '2', '--print-interval', '2', *TINY_IMAGES,
                      '--dl-worker-type', 'FAST', '--epochs', '4', '--seed', '1', '--output-dir', str(out), *RAMP])
    assert log.returncode == 0, log.stdout[-2000:] + log.stderr[-2000:]
    assert trained_at(log.stdout) == SCHEDULED
    assert epoch_resolutions(out)[0] == SCHEDULED


# --- --tta-flip ----------------------------------------------------------------------------------------------------

class LeftHeavy(nn.Module):
    """Logits that differ between an image and its mirror: class c scores the mean of column block c of 4, times
    a weight of its own (so that the summed logits have no ties)."""

    def forward(self, images):
        blocks = images.mean(dim=(1, 2)).reshape(images.shape[0], 4, -1).mean(dim=2)
        return blocks * torch.tensor([1.0, 1.05, 1.1, 1.15])


def tta_batches():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((12, 3, 8, 8), generator=generator)
    targets = torch.randint(0, 4, (12,), generator=generator)
    return images, targets


def test_tta_flip_logits_are_the_sum_of_the_image_and_its_mirror():
    model, (images, _) = LeftHeavy(), tta_batches()
    summed = training.eval_logits(model, images, tta_flip=True)
    assert torch.equal(summed, model(images) + model(images.flip(3)))
    assert not torch.equal(summed.argmax(1), model(images).argmax(1))  # the test model tells them apart
    assert torch.equal(training.eval_logits(model, images), model(images))


def expected_top1(model, images, targets, tta_flip):
    logits = model(images) + (model(images.flip(3)) if tta_flip else 0)
    return 100.0 * (logits.argmax(1) == targets).float().mean().item()


@pytest.mark.parametrize('tta_flip', [False, True])
def test_both_trainers_evaluation_scores_the_summed_logits(tta_flip):
    model, (images, targets) = LeftHeavy(), tta_batches()
    batches = [(images[:5], targets[:5]), (images[5:], targets[5:])]
    dev = devices.create('cpu', channels_last=False)
    expected = expected_top1(model, images, targets, tta_flip)
    acc1 = train.evaluate(model, nn.CrossEntropyLoss(), batches, dev, tta_flip=tta_flip)
    assert acc1 == pytest.approx(expected)
    acc1 = main_trainer.validate(batches, model, nn.CrossEntropyLoss(), dev, 1, tta_flip=tta_flip)
    assert acc1 == pytest.approx(expected)


def test_inference_predicts_from_the_summed_logits():
    model, (images, targets) = LeftHeavy(), tta_batches()
    dev = devices.create('cpu', channels_last=False)
    probabilities, top = inference.predict(model, dev, images, targets, k=2, tta_flip=True)
    expected = torch.softmax(model(images) + model(images.flip(3)), dim=1).topk(2, dim=1)
    assert torch.equal(top, expected.indices) and torch.allclose(probabilities, expected.values)


# --- the ffcv-* recipes -------------------------------------------------------------------------------------------

def expanded(model, name, world_size, device='cpu'):
    parser = train.get_args_parser()
    argv, _ = recipes.expand(parser, ['--recipe', name, '--model', model, '--device', device, '--data-path', 'x'],
                             world_size)
    return parser.parse_args(argv)


@pytest.mark.parametrize('config', [FFCV_RN50, FFCV_RN18], ids=['rn50', 'rn18'])
@pytest.mark.parametrize('epochs', sorted(FFCV_CONFIGS))
def test_each_ffcv_recipe_expands_to_the_values_of_ffcvs_config(config, epochs):
    name = f"ffcv-{config['model'].replace('resnet', 'rn')}-{epochs}e"
    args = expanded(config['model'], name, config['gpus'])
    start_ramp, end_ramp = FFCV_CONFIGS[epochs]
    assert (args.batch_size, args.epochs, args.lr, args.momentum, args.weight_decay) == (
        config['batch_size'], epochs, pytest.approx(config['lr']), 0.9, config['weight_decay'])
    assert (args.norm_weight_decay, args.label_smoothing, args.lr_scheduler, args.lr_peak_epoch) == (
        0.0, 0.1, 'cyclic', 2.0)
    assert (args.min_res, args.max_res, args.start_ramp, args.end_ramp, args.res_rounding) == (
        160, 192, start_ramp, end_ramp, 32)
    assert (args.val_crop_size, args.tta_flip, args.blurpool, args.amp) == (256, True, True, False)
    assert abs(args.val_crop_size / args.val_resize_size - 224 / 256) < 0.002  # FFCV's centre-crop ratio
    assert name in recipes.listing()


def test_ffcv_recipes_scale_the_lr_with_the_global_batch_and_use_fp16_on_cuda():
    assert expanded('resnet50', 'ffcv-rn50-16e', 2).lr == pytest.approx(1.7 * 2 * 512 / 4096)
    assert expanded('resnet18', 'ffcv-rn18-24e', 4).lr == pytest.approx(0.5 * 4)
    assert expanded('resnet50', 'ffcv-rn50-88e', 8, device='cuda').amp
    assert not expanded('resnet50', 'ffcv-rn50-88e', 8, device='hpu').amp


def test_an_ffcv_recipe_refuses_a_model_its_source_has_no_values_for(tmp_path, capsys):
    code = run_in_process(train, ['--recipe', 'ffcv-rn50-16e', '--model', 'resnet152', '--data-path', 'x',
                                  '--output-dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and 'publishes values for resnet50 only' in err and len(err.strip().splitlines()) == 1
