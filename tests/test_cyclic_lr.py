"""FFCV's cyclic schedule (`--lr-scheduler cyclic`, `--lr-peak-epoch`; spec 4, docs/recipes.md): the LR per iteration
against FFCV's own formula (its get_cyclic_lr and train_loop, written here again with numpy.interp), an exact resume
mid-epoch, --print-schedule, and bad --lr-peak-epoch values refused in one line before any work. In-process (quick
tier)."""
import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import run_in_process

from classification import recipe_flags, schedules, training
import main as main_trainer
import train


def ffcv_lrs(lr, epochs, peak, iters):
    """FFCV's LR at every iteration: train_loop's np.interp(arange(iters), [0, iters], [lr(e), lr(e + 1)]) with
    get_cyclic_lr's np.interp([e], [0, peak, epochs], [1e-4 * lr, lr, 0])."""
    def get_cyclic_lr(epoch):
        return np.interp([epoch], [0, peak, epochs], [1e-4 * lr, lr, 0])[0]
    return np.concatenate([np.interp(np.arange(iters), [0, iters], [get_cyclic_lr(e), get_cyclic_lr(e + 1)])
                           for e in range(epochs)])


def cyclic_schedule(lr=1.7, epochs=16, peak=2, ipe=10, batch=4, extra=()):
    args = recipe_flags.parse_args(train.get_args_parser(), [
        '--lr', str(lr), '--epochs', str(epochs), '--lr-scheduler', 'cyclic', '--lr-peak-epoch', str(peak), *extra])
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return schedules.Schedule(optimizer, recipe_flags.schedule_config(args), ipe, batch)


def lrs(schedule, steps):
    out = []
    for _ in range(steps):
        out.append(schedule.lr())
        schedule.after_step()
    return out


def test_cyclic_lr_at_the_first_ramp_peak_decay_and_last_iterations_is_ffcvs():
    got = lrs(cyclic_schedule(lr=1.7, epochs=16, peak=2, ipe=10), 160)
    want = ffcv_lrs(1.7, 16, 2, 10)
    for t in (0, 5, 15, 20, 90, 159):  # first, mid-ramp (epochs 0 and 1), the peak, mid-decay, the last iteration
        assert got[t] == pytest.approx(want[t], rel=1e-12, abs=1e-15), t
    assert got == pytest.approx(list(want), rel=1e-12, abs=1e-15)
    assert (got[0], got[20], got[159]) == (pytest.approx(1.7e-4), pytest.approx(1.7), pytest.approx(1.7 / 140))
    # With a whole peak epoch, FFCV's per-epoch chords are the piecewise-linear function at the fractional epoch.
    t = np.arange(160) / 10
    assert got == pytest.approx(list(np.interp(t, [0, 2, 16], [1.7e-4, 1.7, 0])), rel=1e-12, abs=1e-15)


def test_a_fractional_peak_follows_ffcvs_chord_across_the_epoch_holding_it():
    got = lrs(cyclic_schedule(lr=0.5, epochs=6, peak=2.5, ipe=8), 48)
    assert got == pytest.approx(list(ffcv_lrs(0.5, 6, 2.5, 8)), rel=1e-12, abs=1e-15)
    at_fraction = np.interp(np.arange(48) / 8, [0, 2.5, 6], [5e-5, 0.5, 0])
    differs = [t for t in range(48) if abs(got[t] - at_fraction[t]) > 1e-12]
    assert differs and all(16 < t < 24 for t in differs) and max(got) < 0.5  # only inside epoch 2, below the peak


def test_cyclic_resumes_mid_epoch_with_the_lrs_of_an_uninterrupted_run():
    torch.manual_seed(0)
    straight = cyclic_schedule(epochs=4, peak=1.5, ipe=10)
    want = lrs(straight, 40)
    cut = cyclic_schedule(epochs=4, peak=1.5, ipe=10)
    lrs(cut, 13)  # stopped 3 steps (12 samples at batch 4) into epoch 1
    saved = {'optimizer': cut.optimizer.state_dict(), **training.schedule_fields(cut)}
    resumed = cyclic_schedule(epochs=4, peak=1.5, ipe=10)
    resumed.optimizer.load_state_dict(saved['optimizer'])  # what training.resume does before the schedule
    assert resumed.resume(saved['lr_scheduler'], saved['schedule'], 1, 12) is None
    assert resumed.iteration == 13 and lrs(resumed, 27) == want[13:]
    # A checkpoint without the schedule's state (1.4.0's format) is advanced to the same place.
    advanced = cyclic_schedule(epochs=4, peak=1.5, ipe=10)
    advanced.optimizer.load_state_dict(saved['optimizer'])
    assert 'starts at iteration 13' in advanced.resume(None, None, 1, 12)
    assert lrs(advanced, 27) == want[13:]


def lr_rows(text):
    return {int(t): (float(lr), note) for t, lr, note in
            re.findall(r'^iteration +(\d+) +epoch +[\d.]+ +lr (\S+) +wd \S+ +augmentation on(.*)$', text, re.M)}


@pytest.mark.parametrize('trainer', [train, main_trainer], ids=['train.py', 'main.py'])
def test_print_schedule_shows_the_cyclic_lr_with_its_peak_and_last_iteration(trainer, capsys):
    code = run_in_process(trainer, ['--lr-scheduler', 'cyclic', '--lr', '0.5', '--epochs', '4', '--lr-peak-epoch',
                                    '2', '--dataset-size', '40', '-b', '4', '--print-schedule', '--data-path', '/x'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'Schedule cyclic: 4 epochs x 10 iterations at global batch 4, stepped per iteration' in out
    rows = lr_rows(out)
    assert sorted(rows) == [0, 10, 19, 20, 21, 30, 39]
    want = ffcv_lrs(0.5, 4, 2, 10)
    for t, (lr, _) in rows.items():
        assert lr == pytest.approx(want[t], rel=1e-8), t
    assert '(--lr-peak-epoch)' in rows[20][1] and rows[20][0] == 0.5 and '(last iteration)' in rows[39][1]


@pytest.mark.parametrize('argv, message', [
    (['--lr-peak-epoch', '0'], '--lr-peak-epoch must be above 0 and at most --epochs 4, got 0'),
    (['--lr-peak-epoch', '-1'], '--lr-peak-epoch must be above 0 and at most --epochs 4, got -1'),
    (['--lr-peak-epoch', '4.5'], '--lr-peak-epoch must be above 0 and at most --epochs 4, got 4.5'),
    (['--lr-peak-epoch', 'nan'], '--lr-peak-epoch must be above 0 and at most --epochs 4, got nan'),
    (['--lr-warmup-epochs', '1'], '--lr-warmup-epochs: the cyclic schedule ramps up to --lr-peak-epoch itself'),
], ids=['zero', 'negative', 'past-epochs', 'nan', 'with-a-warm-up'])
def test_bad_lr_peak_epoch_is_one_line_and_exit_2_before_any_work(argv, message, tmp_path, capsys):
    code = run_in_process(train, ['--data-path', str(tmp_path / 'none'), '--output-dir', str(tmp_path / 'out'),
                                  '--lr-scheduler', 'cyclic', '--epochs', '4', *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith('error: ') and not (tmp_path / 'out').exists()
