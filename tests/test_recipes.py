"""Recipes: the schedules against the formulas and tables of their sources, named recipes and their overrides,
mixup/cutmix/label smoothing against torchvision's and torch's own, EMA against its formula, the phase without
scale/aspect augmentation in both pipelines, and resume exactness of every schedule (in-process here; real
SIGTERM-and-resume runs at the end, slow tier). docs/recipes.md."""
import functools
import math
import os
import re
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from conftest import TINY_IMAGES, mpirun_prefix, read_until, run_in_process, run_script, start_process

from classification import (data, devices, distributed, fast_jpeg, launcher, loaders, optimizers, recipe_flags, recipes,
                            samplers, schedules, training)
import main as main_trainer
import train
from classification.cli import UsageError


def parsed(argv, world_size=1):
    """train.py's arguments for argv as its __main__ parses them (recipe expanded), at `world_size`."""
    return recipe_flags.parse_args(train.get_args_parser(), [*argv, '--world-size', str(world_size)])


def lr_rows(text):
    """{iteration: (lr, weight decay, augmentation)} from --print-schedule's output."""
    rows = re.findall(r'^iteration +(\d+) +epoch +[\d.]+ +lr (\S+) +wd (\S+) +augmentation (on|off)', text, re.M)
    return {int(t): (float(lr), float(wd), aug == 'on') for t, lr, wd, aug in rows}


# --- spec 2.4: the LR-collapse schedule, as one piecewise function of the global iteration at batch 4096 ---------

def spec_collapse_lr(t):
    if t < 1560:
        return 0.1 + 1.5 * t / 1560
    if t < 7800:
        return 1.6 * (1 - t / 18720)
    if t < 11550:
        return 1.02 * (1 - (t - 7800) / 7500) ** 2
    if t < 16300:
        k = t - 11550
        return 0.255 + 0.509 * k / 1000 if k < 1000 else 0.764 * (1 - k / 7500) ** 2
    if t < 21050:
        k = t - 16300
        return 0.19 + 0.382 * k / 1000 if k < 1000 else 0.572 * (1 - k / 7500) ** 2
    return 0.143 * (1 - (t - 21050) / 1560) ** 2


SPEC_ITERATIONS = (0, 1559, 1560, 7799, 7800, 11549, 11550, 12549, 12550, 16299, 16300, 17299, 17300, 21049, 21050)


def test_print_schedule_of_lr_collapse_at_batch_4096_gives_spec_2_4(capsys):
    code = run_in_process(train, ['--recipe', 'lr-collapse-72e', '--world-size', '8', '--batch-size', '512',
                                  '--print-schedule', '--data-path', '/nonexistent'])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = lr_rows(out)
    for t in SPEC_ITERATIONS:
        assert rows[t][0] == pytest.approx(spec_collapse_lr(t), abs=1e-6), t
    assert (rows[1559][0], rows[1560][0]) == (pytest.approx(1.599038, abs=1e-6), pytest.approx(1.466667, abs=1e-6))
    assert all(rows[t][1] == 5e-5 for t in rows if t < 21050) and all(rows[t][1] == 2e-4 for t in rows if t >= 21050)
    epoch_rows = {t // 313: aug for t, (_, _, aug) in rows.items() if t % 313 == 0}
    assert [e for e, aug in sorted(epoch_rows.items()) if not aug] == [68, 69, 70, 71]  # from the first epoch in E
    resets = re.findall(r'^iteration +(\d+) .*momentum reset', out, re.M)
    assert [int(t) for t in resets] == [7800, 11550, 16300, 21050]
    assert re.search(r'^Equivalent command line: \S+ --epochs 72 --momentum 0.9 --wd 5e-5 --lr-scheduler collapse '
                     r'--lr-phases 7800,1.6,warmup=1560@0.1,', out, re.M)


def test_lr_collapse_scales_linearly_to_another_global_batch():
    args = parsed(['--recipe', 'lr-collapse-72e', '--batch-size', '256'], world_size=8)  # 2048 = half of 4096
    phases = recipe_flags.schedule_config(args).phases
    assert [p.iterations for p in phases] == [15600, 7500, 9500, 9500, 3120]
    assert phases[0].base_lr == pytest.approx(0.8) and phases[0].warmup_start_lr == pytest.approx(0.05)
    assert phases[0].horizon == 37440 and phases[0].warmup_iterations == 3120 and not phases[-1].augment


# --- per-iteration schedules built from torch.optim.lr_scheduler --------------------------------------------------

def schedule_for(argv, ipe=10, world_size=1, batch=4):
    args = parsed(argv, world_size)
    param = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return schedules.Schedule(optimizer, recipe_flags.schedule_config(args), ipe, world_size * batch)


def lrs(schedule, steps):
    out = []
    for _ in range(steps):
        out.append(schedule.lr())
        schedule.after_step()
    return out


def test_cosine_with_linear_warm_up_per_iteration():
    schedule = schedule_for(['--lr', '0.4', '--epochs', '5', '--lr-scheduler', 'cosineannealinglr',
                             '--lr-warmup-epochs', '1', '--lr-warmup-decay', '0.1', '--lr-min', '0.01'])
    got = lrs(schedule, 50)
    for t in range(10):
        assert got[t] == pytest.approx(0.4 * (0.1 + 0.9 * t / 10))
    for t in range(10, 50):
        assert got[t] == pytest.approx(0.01 + 0.5 * (0.4 - 0.01) * (1 + math.cos(math.pi * (t - 10) / 40)))


def test_polynomial_decay_with_warm_up_from_zero_to_the_end_lr_as_mlperf():
    schedule = schedule_for(['--lr', '9', '--epochs', '6', '--lr-scheduler', 'polynomiallr', '--lr-warmup-epochs', '2',
                             '--lr-warmup-decay', '0', '--lr-decay-epochs', '7', '--lr-min', '1e-4', '--lr-power', '2'])
    got = lrs(schedule, 60)
    decay = 70 - 20 + 1  # MLPerf: (train steps - warm-up steps + 1)
    for t in range(60):
        want = 9 * t / 20 if t < 20 else 1e-4 + (9 - 1e-4) * (1 - (t - 20) / decay) ** 2
        assert got[t] == pytest.approx(want)


def test_the_default_is_the_1_4_0_steplr_per_epoch():
    schedule = schedule_for(['--lr', '0.1', '--lr-step-size', '2'])
    assert not schedule.per_iteration
    seen = []
    for _ in range(5):
        assert lrs(schedule, 7) == [seen.append(schedule.lr()) or schedule.lr()] * 7  # constant within an epoch
        schedule.after_epoch()
    assert seen == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


RESUMABLE = {
    'cosine, stop inside the warm-up': (['--lr-scheduler', 'cosineannealinglr', '--lr-warmup-epochs', '2'], 13),
    'steplr with warm-up': (['--lr-scheduler', 'steplr', '--lr-warmup-epochs', '1', '--lr-step-size', '1'], 17),
    'polynomial (LARS), inside the warm-up': (['--lr-scheduler', 'polynomiallr', '--lr-warmup-epochs', '2',
                                              '--lr-warmup-decay', '0'], 7),
    'collapse, across a phase boundary': (['--lr-scheduler', 'collapse', '--lr-phases', '12,0.2,warmup=5@0.02',
                                           '15,0.1,warmup=4@0.05,horizon=20,power=2,wd=1e-3', '13,0.05,noaug'], 10),
}


def train_steps(model, optimizer, schedule, steps, seed=0):
    torch.manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(4, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.after_step()


@pytest.mark.parametrize('case', RESUMABLE)
def test_every_schedule_resumes_bitwise_from_its_saved_state(case):
    argv, stop_at = RESUMABLE[case]
    argv = ['--lr', '0.2', '--epochs', '4', '--wd', '1e-4', *argv]

    def fresh():
        torch.manual_seed(1)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-4)
        return model, optimizer, schedules.Schedule(optimizer, recipe_flags.schedule_config(parsed(argv)), 10, 4)

    model, optimizer, schedule = fresh()
    train_steps(model, optimizer, schedule, 40)

    cut_model, cut_optimizer, cut_schedule = fresh()
    train_steps(cut_model, cut_optimizer, cut_schedule, stop_at)
    saved = {'model': cut_model.state_dict(), 'optimizer': cut_optimizer.state_dict(),
             **training.schedule_fields(cut_schedule)}
    resumed_model, resumed_optimizer, resumed_schedule = fresh()
    resumed_model.load_state_dict(saved['model'])
    resumed_optimizer.load_state_dict(saved['optimizer'])
    assert resumed_schedule.resume(saved['lr_scheduler'], saved['schedule'], stop_at // 10, stop_at % 10 * 4) is None
    torch.manual_seed(0)
    [torch.randn(4, 3) for _ in range(stop_at)]  # the same batches from where the cut run stopped
    state = torch.get_rng_state()
    for _ in range(40 - stop_at):
        torch.set_rng_state(state)
        x = torch.randn(4, 3)
        state = torch.get_rng_state()
        loss = resumed_model(x).square().mean()
        resumed_optimizer.zero_grad()
        loss.backward()
        resumed_optimizer.step()
        resumed_schedule.after_step()
    assert resumed_schedule.iteration == schedule.iteration == 40 and resumed_schedule.lr() == schedule.lr()
    assert torch.equal(model.weight, resumed_model.weight) and torch.equal(model.bias, resumed_model.bias)
    assert optimizer.param_groups[0]['weight_decay'] == resumed_optimizer.param_groups[0]['weight_decay']


def test_collapse_phases_reset_momentum_and_set_weight_decay_only_on_decayed_groups():
    argv = ['--wd', '1e-4', '--lr-scheduler', 'collapse', '--lr-phases', '3,0.1', '3,0.1,wd=5e-4']
    decayed, norm = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{'params': [decayed], 'weight_decay': 1e-4}, {'params': [norm], 'weight_decay': 0.0}],
                                lr=0.1, momentum=0.9)
    schedule = schedules.Schedule(optimizer, recipe_flags.schedule_config(parsed(argv)), 10, 4)
    for _ in range(3):
        (decayed.sum() + norm.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.state[decayed]['momentum_buffer'].abs().sum() > 0
        schedule.after_step()
    assert all(float(state['momentum_buffer'].abs().sum()) == 0 for state in optimizer.state.values())
    assert [g['weight_decay'] for g in optimizer.param_groups] == [5e-4, 0.0]


def test_a_resume_at_another_global_batch_rebuilds_the_schedule_at_the_same_place():
    schedule = schedule_for(['--lr-scheduler', 'cosineannealinglr', '--lr-warmup-epochs', '1', '--epochs', '4'],
                            ipe=10, batch=4)
    lrs(schedule, 15)
    saved = training.schedule_fields(schedule)
    other = schedule_for(['--lr-scheduler', 'cosineannealinglr', '--lr-warmup-epochs', '1', '--epochs', '4'],
                         ipe=5, batch=8)  # twice the batch: half the iterations per epoch
    note = other.resume(saved['lr_scheduler'], saved['schedule'], 1, 20)  # epoch 1, 20 samples in
    assert other.iteration == 7 and 'rebuilt and advanced to iteration 7' in note
    reference = schedule_for(['--lr-scheduler', 'cosineannealinglr', '--lr-warmup-epochs', '1', '--epochs', '4'],
                             ipe=5, batch=8)
    lrs(reference, 7)
    assert other.lr() == reference.lr()


# --- recipes by name ----------------------------------------------------------------------------------------------

def test_a_recipe_expands_to_flags_that_the_command_line_overrides_and_scales_with_the_global_batch():
    args = parsed(['--recipe', 'nvidia-90e', '--model', 'resnet50', '--momentum', '0.9'], world_size=2)
    assert (args.batch_size, args.epochs, args.lr_scheduler, args.lr_warmup_epochs) == (256, 90, 'cosineannealinglr', 8)
    assert args.lr == pytest.approx(0.256 * 512 / 256) and args.momentum == 0.9  # given here: not the recipe's 0.875
    assert (args.label_smoothing, args.norm_weight_decay, args.weight_decay) == (0.1, 0.0, 3.0517578125e-05)
    args = parsed(['--recipe', 'nvidia-250e', '--model', 'resnext101_32x4d', '-b', '64'], world_size=8)
    assert args.batch_size == 64 and args.lr == pytest.approx(0.256 * 512 / 256) and args.mixup_alpha == 0.2
    assert args.weight_decay == 6.103515625e-05 and args.epochs == 250


def test_lars_takes_the_published_values_nearest_the_global_batch():
    assert parsed(['--recipe', 'lars'], world_size=8).lr == 9.0          # 2048: Habana's
    args = parsed(['--recipe', 'lars', '-b', '400'], world_size=8)       # 3200: NVIDIA H100's
    assert (args.lr, args.lr_warmup_epochs, args.lr_decay_epochs, args.optimizer) == (11.0, 2, 37, 'lars')
    assert training.evaluates_after(3, 35, 4, 3) and not training.evaluates_after(4, 35, 4, 3)
    assert [e for e in range(35) if training.evaluates_after(e, 35, 4, 3)] == [3, 7, 11, 15, 19, 23, 27, 31, 34]


def test_torchvision_v2_and_the_default_recipe():
    args = parsed(['--recipe', 'torchvision-v2'], world_size=8)
    assert (args.lr, args.auto_augment, args.random_erase, args.mixup_alpha, args.cutmix_alpha) == (0.5, 'ta_wide', 0.1,
                                                                                                0.2, 1.0)
    assert (args.model_ema, args.train_crop_size, args.val_resize_size, args.dl_worker_type) == (True, 176, 232, 'MP')
    default, plain = parsed([]), train.get_args_parser().parse_args(['--world-size', '1'])
    assert vars(default) == vars(plain)  # habana-1.4 is today's behaviour, flag for flag


def test_recipe_list_and_bad_recipes(capsys):
    assert run_in_process(train, ['--recipe', 'list']) == 0
    out = capsys.readouterr().out
    for name in recipes.RECIPES:
        assert re.search(rf'^{name}\b', out, re.M)
    assert '80.858' in out and '76.3' in out and '75.9' in out and '77.12' in out
    with pytest.raises(SystemExit) as exit_:
        parsed(['--recipe', 'nvidia-90e', '--model', 'mobilenet_v2'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert 'publishes values for resnet50, resnext101_32x4d only' in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        parsed(['--recipe', 'fast'])
    assert "unknown recipe 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize('argv, message', [
    (['--dl-worker-type', 'FAST', '--auto-augment', 'ta_wide'], '--auto-augment runs in the MP pipeline'),
    (['--dl-worker-type', 'MP', '--auto-augment', 'magic'], "unknown policy 'magic'"),
    (['--custom-lr-values', '0.1', '--custom-lr-milestones', '1', '--lr-scheduler', 'cosineannealinglr'],
     '--custom-lr-values is a schedule of its own'),
    (['--lr-scheduler', 'collapse', '--lr-phases', '10,0.1,warmup=20@0.1'], 'warm-up as long as the phase'),
    (['--lr-scheduler', 'collapse', '--lr-phases', '10,0.1,speed=2'], "unknown part 'speed=2'"),
    (['--lr-scheduler', 'collapse'], 'needs --lr-phases'),
    (['--lr-scheduler', 'linear'], "unknown schedule 'linear'"),
    (['--optimizer', 'lars', '--norm-weight-decay', '1e-4'], 'applies no weight decay to normalisation'),
    (['--label-smoothing', '1.5'], '--label-smoothing must be in [0, 1)'),
])
def test_bad_recipe_flags_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    code = run_in_process(train, ['--data-path', str(tmp_path / 'none'), '--output-dir', str(tmp_path / 'out'), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / 'out').exists()


def test_the_demos_pass_the_recipe_on_and_let_its_values_replace_their_defaults(capsys):
    parser = __import__('demo_resnet').build_parser()
    argv = ['--recipe', 'lars', '--world-size', '2', '--device', 'cpu', '--data-path', '/d', '--epochs', '3']
    args = parser.parse_args(argv)
    command = launcher.with_recipe(launcher.train_py_args(args, 'Resnet', None), parser, argv, args, 2)
    assert command[-2:] == ['--recipe', 'lars'] and '--epochs=3' in command  # given: kept
    assert not any(item.startswith('--batch-size=') for item in command)  # the demo's default 128 gives way
    parser = __import__('demo_googlenet').build_parser()
    argv = ['--recipe', 'lr-collapse-72e', '--lr', '0.3']
    args = parser.parse_args(argv)
    command = launcher.with_recipe(__import__('demo_googlenet').trainer_args(args, None), parser, argv, args, 1)
    assert '--learning-rate=0.3' in command and not any(c.startswith(('--epochs=', '--batch-size=', '--momentum='))
                                                          for c in command)


# --- mixup, cutmix, label smoothing, EMA, clipping -----------------------------------------------------------------

def test_label_smoothing_and_mixup_cutmix_losses_are_the_libraries():
    logits, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    criterion = training.make_criterion(0.1)
    assert torch.equal(criterion(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))
    images = torch.randn(6, 3, 8, 8)
    for mixup, cutmix, reference in ((0.2, 0.0, v2.MixUp(alpha=0.2, num_classes=5)),
                                     (0.0, 1.0, v2.CutMix(alpha=1.0, num_classes=5))):
        torch.manual_seed(3)
        mixed, soft = training.make_batch_mix(mixup, cutmix, 5)(images, target)
        torch.manual_seed(3)
        want_images, want_soft = reference(images, target)
        assert torch.equal(mixed, want_images) and torch.equal(soft, want_soft)
        assert soft.shape == (6, 5) and torch.allclose(soft.sum(1), torch.ones(6))
        assert torch.equal(criterion(logits, soft), F.cross_entropy(logits, soft, label_smoothing=0.1))
    assert training.make_batch_mix(0.0, 0.0, 5) is None
    assert isinstance(training.make_batch_mix(0.2, 1.0, 5), v2.RandomChoice)


def test_ema_follows_its_formula_with_torchvisions_adjustment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = training.make_ema(model, decay=0.999, steps=4, global_batch=64, epochs=8)
    decay = 1 - min(1.0, (1 - 0.999) * 64 * 4 / 8)
    expected = {k: v.clone().float() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies the model
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(3, 3))
            model[1].running_mean.add_(1.0)
        ema.update_parameters(model)
        for key in ('0.weight', '1.running_mean'):
            expected[key] = decay * expected[key] + (1 - decay) * model.state_dict()[key]
    assert torch.allclose(ema.module[0].weight, expected['0.weight'], atol=1e-6)
    assert torch.allclose(ema.module[1].running_mean, expected['1.running_mean'], atol=1e-6)


def test_gradient_clipping_bounds_the_step():
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    dev = devices.create('cpu', channels_last=False)
    training.train_step(model, lambda out, t: (out * 1000).sum(), optimizer, dev, torch.ones(2, 4), None,
                        clip_grad_norm=0.5)
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert norm == pytest.approx(0.5, rel=1e-5)


# --- the phase without scale/aspect augmentation: MP and FAST -------------------------------------------------------

def is_crop_of(crop, image):
    """Whether `crop` (C, h, w) appears unscaled inside `image` (C, H, W), flipped or not."""
    h, w = crop.shape[-2:]
    for flipped in (crop, crop.flip(-1)):
        for top in range(image.shape[-2] - h + 1):
            for left in range(image.shape[-1] - w + 1):
                if torch.equal(image[:, top:top + h, left:left + w], flipped):
                    return True
    return False


def resized_40(kind, path):
    """The image at the validation size (shorter side 40) as each pipeline resizes it, uint8 CHW."""
    if kind == 'MP':
        return v2.PILToTensor()(v2.Resize(40)(Image.open(path).convert('RGB')))
    image = fast_jpeg.EncodedImage(path)
    out = torch.empty((*fast_jpeg.resized_shape(image.height, image.width, 40), 3), dtype=torch.uint8)
    fast_jpeg.resize_into(out, image.decode())
    return out.permute(2, 0, 1)


def as_pixels(normalised):
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    return (normalised * std * 255 + mean * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.slow  # loader workers
@pytest.mark.parametrize('kind', ['MP', 'FAST'])
def test_plain_crop_epochs_turn_off_scale_and_aspect_augmentation(jpeg_dataset, kind):
    """With 2 persistent loader workers, started in the plain epoch: the next epoch augments again."""
    settings = loaders.LoaderSettings(kind=kind, batch_size=4, workers=2, seed=3, train_crop_size=32,
                                      val_resize_size=40, val_crop_size=32, plain_crop_epochs=True)
    placement = devices.LoaderPlacement(torch.device('cpu'), pin_memory=False, worker_start_method='forkserver')
    built = loaders.build(jpeg_dataset, settings, distributed.Ranks(0, 1, 0, False), placement)
    folder = data.image_folder(os.path.join(jpeg_dataset, 'train'), None)
    sampler = built.train_sampler
    for augment in (False, True):
        sampler.set_epoch(5, 0, augment)
        images, _ = next(iter(built.train))
        order = list(samplers.TrainBatchSampler(getattr(sampler, 'sampler', sampler), 4))[0]
        found = [is_crop_of(as_pixels(image), resized_40(kind, folder.samples[index][0]))
                 for image, index in zip(images, order)]
        assert all(found) if not augment else not all(found), (augment, found)


def test_fast_plain_crop_is_a_crop_of_the_resized_image_and_seeded_per_sample(jpeg_dataset):
    folder = data.image_folder(os.path.join(jpeg_dataset, 'train'), None)
    batches = fast_jpeg.TrainBatches(folder.samples, 32, seed=4, plain_resize_size=40)
    first, _ = batches[(2, [0, 5], False)]
    again, _ = batches[(2, [5], False)]
    assert torch.equal(first[1], again[0])  # per sample: the batch it is in does not matter
    augmented, _ = batches[(2, [0, 5], True)]
    assert not torch.equal(first, augmented)


# --- real runs: SIGTERM mid-epoch and resume, with the recipe pieces on (slow) ---------------------------------------

REAL = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '2',
        *TINY_IMAGES, '--epochs', '2', '--deterministic', '--save-checkpoint', '--num-eval-steps', '1']
RECIPE_RUNS = {
    'MP: cosine stopped inside its warm-up, nesterov, clipping, label smoothing, EMA': [
        '--dl-worker-type', 'MP', '--lr-scheduler', 'cosineannealinglr', '--lr-warmup-epochs', '1.5', '--nesterov',
        '--clip-grad-norm', '2', '--label-smoothing', '0.1', '--model-ema', '--model-ema-steps', '3'],
    'FAST: LARS, collapse across a phase boundary into a noaug phase, mixup and cutmix': [
        '--dl-worker-type', 'FAST', '--optimizer', 'lars', '--lr-scheduler', 'collapse', '--lr-phases',
        '8,2,warmup=3@0.5', '10,1,horizon=16,power=2,wd=1e-3,noaug', '--mixup-alpha', '0.2', '--cutmix-alpha', '1'],
}


@pytest.mark.slow
@pytest.mark.parametrize('case', RECIPE_RUNS)
def test_sigterm_and_resume_with_recipe_pieces_end_with_the_same_weights(jpeg_dataset, tmp_path, case):
    common = ['--data-path', jpeg_dataset, *REAL, *RECIPE_RUNS[case]]
    straight = run_script(['train.py', *common, '--output-dir', str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    proc = start_process(['train.py', *common, '--output-dir', str(tmp_path / 'cut')])
    read_until(proc, r'^Epoch: \[0\]  \[ 4/12\]')
    os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and 'Stopped by SIGTERM: saved epoch 0 after step' in log, log[-3000:]
    resumed = run_script(['train.py', *common, '--output-dir', str(tmp_path / 'cut'), '--resume',
                          str(tmp_path / 'cut' / 'checkpoint.pth')])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert 'Traceback' not in resumed.stdout + resumed.stderr and 'Resuming epoch 0 at step' in resumed.stdout
    if 'noaug' in case:
        assert 'Epoch 1: no scale/aspect augmentation' in resumed.stdout
    straight_ckpt = torch.load(tmp_path / 'straight' / 'model_1.pth', weights_only=True)
    resumed_ckpt = torch.load(tmp_path / 'cut' / 'model_1.pth', weights_only=True)
    for key in ('model', 'model_ema'):
        if key in straight_ckpt:
            for name, tensor in straight_ckpt[key].items():
                assert torch.equal(tensor, resumed_ckpt[key][name]), (key, name)
    assert straight_ckpt['lr_scheduler'] == resumed_ckpt['lr_scheduler']
    assert straight_ckpt['schedule'] == resumed_ckpt['schedule']
    assert ('model_ema' in straight_ckpt) == ('EMA' in case)


def test_a_resume_with_other_optimizer_groups_is_one_line():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    dev = devices.create('cpu', channels_last=False)
    split = training.make_optimizer(dev, model, optimizers.OptimizerSettings(0.1, 0.9, 1e-4, norm_weight_decay=0.0))
    plain = training.make_optimizer(dev, model, optimizers.OptimizerSettings(0.1, 0.9, 1e-4))
    with pytest.raises(UsageError, match=r'groups of \[\(2, False\), \(2, False\)\].*this run.s \[\(4, False\)\]'):
        training.check_optimizer_state(split.state_dict(), plain)
    lars = training.make_optimizer(dev, model, optimizers.OptimizerSettings(0.1, 0.9, 1e-4, kind='lars'))
    with pytest.raises(UsageError, match='--optimizer'):
        training.check_optimizer_state(lars.state_dict(), split)
    training.check_optimizer_state(plain.state_dict(), plain)


def test_print_schedule_of_a_custom_table_and_of_phases_shorter_than_the_run(capsys):
    assert run_in_process(train, ['--custom-lr-values', '0.2', '0.02', '--custom-lr-milestones', '1', '3', '--epochs',
                                  '4', '--print-schedule', '--data-path', '/nonexistent']) == 0
    assert re.findall(r'^epoch +\d+  lr (\S+)', capsys.readouterr().out, re.M) == ['0.1', '0.2', '0.2', '0.02']
    assert run_in_process(train, ['--lr-scheduler', 'collapse', '--lr-phases', '100,0.1', '--epochs', '2',
                                  '--dataset-size', '12800', '-b', '128', '--print-schedule', '--data-path', 'x']) == 0
    assert 'the --lr-phases end at iteration 100 (epoch 1.00); the rest of the 2 epochs trains at their last LR, 0' \
        in capsys.readouterr().out


@pytest.mark.parametrize('trainer', [train, main_trainer], ids=['train.py', 'main.py'])
def test_habana_1_7_spellings_set_the_same_values_as_ours(trainer):
    """Habana 1.7+'s LARS command line (spec-habana 1.7.0) parses as it is."""
    habana = ['--optimizer', 'lars', '-eoe', '3', '-ebe', '4', '--lars_base_learning_rate', '9',
              '--lars_warmup_epochs', '3', '--lars_end_learning_rate', '1e-4', '--lars_decay_epochs', '36',
              '--lwd', '5e-5', '--data-path', 'x']
    ours = ['--optimizer', 'lars', '--eval-offset-epochs', '3', '--epochs-between-evals', '4', '--lr', '9',
            '--lr-warmup-epochs', '3', '--lr-min', '1e-4', '--lr-decay-epochs', '36', '--wd', '5e-5', '--data-path', 'x']
    parse = functools.partial(recipe_flags.parse_args, trainer.get_args_parser())
    assert vars(parse(habana)) == vars(parse(ours))
    assert vars(parse(['--epochs_between_evals', '2', '--eval_offset_epochs', '1', '--lars-weight-decay', '0.1',
                       '--data-path', 'x'])) == vars(parse(['-ebe', '2', '-eoe', '1', '--wd', '0.1', '--data-path', 'x']))
    defaults = parse(['--data-path', 'x'])  # the aliases carry no default of their own
    assert (defaults.lr, defaults.weight_decay) == (0.1, 1e-4)


def logged_lrs(log, resumed_at=None):
    """{(epoch, step): lr} of the MetricLogger lines; a resumed epoch's lines count from its first step."""
    lines = re.findall(r'^Epoch: \[(\d+)\]  \[ ?(\d+)/\d+\].*?  lr: (\S+)', log, flags=re.M)
    start = {} if resumed_at is None else {resumed_at[0]: resumed_at[1]}
    return {(int(e), int(s) + start.get(int(e), 0)): float(lr) for e, s, lr in lines}


@pytest.mark.slow
@pytest.mark.mpi
def test_a_recipe_on_two_ranks_stopped_through_the_demo_wrapper_resumes_under_plain_mpirun_on_schedule(
        jpeg_dataset, tmp_path):
    """The per-iteration schedule of a recipe (lr-collapse-72e: phases in iterations at the global batch) over a
    stop on 2 ranks through demo_resnet.py and a resume through plain mpirun with another loader: the LR of every
    logged step is the one an uninterrupted run logs (global batch 8 in both)."""
    common = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '2',
              '--epochs', '2', '--num-eval-steps', '1', '--data-path', jpeg_dataset, '--recipe', 'lr-collapse-72e',
              '--save-checkpoint']
    straight = run_script(mpirun_prefix(2) + ['train.py', *common, '--dl-worker-type', 'MP', '--print-freq', '1',
                                              '--output-dir', str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    expected = logged_lrs(straight.stdout)
    assert len(expected) == 12 and len(set(expected.values())) == 12  # the LR moves every iteration

    out = tmp_path / 'cut'
    proc = start_process(['demo_resnet.py', '--world-size', '2', *common, '--dl-worker-type', 'MP',
                          '--output-dir', str(out)])
    log = read_until(proc, r'^Epoch: \[0\]  \[2/6\]')
    os.killpg(proc.pid, signal.SIGTERM)
    log += proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and 'Stopped by SIGUSR1: saved epoch 0 after step' in log, log[-3000:]  # the wrapper's
    resumed = run_script(mpirun_prefix(2) + ['train.py', *common, '--dl-worker-type', 'FAST', '--output-dir', str(out),
                                             '--resume', str(out / 'checkpoint.pth')])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert 'Traceback' not in resumed.stdout + resumed.stderr and 'Resuming epoch 0 at step' in resumed.stdout
    resumed_at = int(re.search(r'Resuming epoch 0 at step (\d+)', resumed.stdout).group(1))
    seen = {**logged_lrs(log), **logged_lrs(resumed.stdout, (0, resumed_at))}
    assert len(seen) >= 6 and all(lr == pytest.approx(expected[key], rel=1e-6) for key, lr in seen.items()), seen
    final = torch.load(out / 'model_1.pth', weights_only=True)
    assert final['schedule'] == torch.load(tmp_path / 'straight' / 'model_1.pth', weights_only=True)['schedule']


def test_a_recipe_value_that_does_not_fit_the_given_epochs_says_it_came_from_the_recipe(capsys):
    assert run_in_process(train, ['--recipe', 'lars', '--epochs', '2', '--data-path', '/nonexistent']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --lr-warmup-epochs must be at least 0 and below --epochs 2, got 3 (a value --recipe lars '
                   'sets, for its own --epochs: give the flag too, e.g. for a shorter trial run)']
    assert run_in_process(train, ['--recipe', 'lars', '--epochs', '2', '--lr-warmup-epochs', '1', '--print-schedule',
                                  '--data-path', '/nonexistent']) == 0


def load_benchmark(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(train.__file__), 'benchmarks',
                                                                      f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('name', sorted(recipes.RECIPES))
def test_every_recipe_scaled_by_the_digits_benchmark_is_a_command_line_train_py_takes(name):
    """benchmarks/recipes_on_digits.py (benchmarks/RESULTS.md sections 7 and 12) builds its runs from these flags."""
    bench = load_benchmark('recipes_on_digits')
    flags = bench.recipe_flags(name, 10, 45, 32, (28, 32, 28))
    args = recipe_flags.parse_args(train.get_args_parser(), ['--data-path', 'synthetic', *flags])
    train.check_args(args)
    assert (args.epochs, args.batch_size) == (10, 32)
    if name.startswith('ffcv-'):
        assert (args.min_res, args.max_res, args.val_crop_size) == (20, 24, 32)
