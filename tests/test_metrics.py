"""The metrics file (metrics.jsonl), its curves (plot_metrics.py) and --tensorboard (docs/metrics.md: Metrics file,
curves and TensorBoard): records written by real runs of both trainers, read back; a stopped and resumed run;
the writer's guarantees (whole lines only, nothing on other ranks or without --output-dir)."""
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from conftest import REPO, TINY_IMAGES, read_until, run_in_process, run_script, start_process

from classification import cli, launcher, metrics
import demo_resnet
import main
import plot_metrics
import train

QUICK = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '8', '--workers', '0', '--print-freq', '2',
         '--dl-worker-type', 'MP', *TINY_IMAGES]
GOOGLENET_QUICK = ['--device', 'cpu', '--batch-size', '8', '--workers', '0', '--print-interval', '2',
                   '--train-crop-size', '16', '--val-resize-size', '18', '--val-crop-size', '16']
TRAIN_FIELDS = {'train.lr', 'train.loss', 'train.top1', 'train.top5', 'train.total_ips', 'train.compute_ips',
                'train.data_time'}


def records(folder, kind=None):
    found = metrics.read(str(folder))
    return [r for r in found if kind is None or r['type'] == kind]


@pytest.fixture(scope='module')
def train_run(jpeg_dataset, tmp_path_factory):
    """One in-process train.py run: 2 epochs of 4 steps, --tensorboard, a checkpoint (for --test-only)."""
    out = tmp_path_factory.mktemp('metrics') / 'resnet-run'
    code = run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(out), *QUICK, '--epochs', '2',
                                  '--num-train-steps', '4', '--num-eval-steps', '2', '--save-checkpoint',
                                  '--tensorboard'])
    assert code == 0
    return out


# --- the writer --------------------------------------------------------------------------------------------------

def header_values(**extra):
    return dict(dict(args={'lr': 0.1}, recipe='habana-1.4', device='cpu', world_size=2, batch_size=4,
                     steps_per_epoch=6), **extra)


def test_records_carry_the_dllogger_names_all_ranks_figures_and_strict_json(tmp_path):
    writer = metrics.MetricsFile(str(tmp_path / 'metrics.jsonl'))
    writer.header(**header_values())
    writer.train_window(0, 2, lr=0.1, loss=2.5, top1=25.0, top5=75.0, total_ips=10.0, compute_ips=12.5,
                        data_time=0.01)
    writer.train_window(0, 4, lr=0.1, loss=float('nan'), top1=0.0, top5=50.0, total_ips=10.0, compute_ips=12.5,
                        data_time=0.01)
    writer.evaluation(0, loss=1.5, top1=30.0, top5=80.0, images=20)
    writer.evaluation(0, loss=1.4, top1=35.0, top5=85.0, images=20, ema=True)
    writer.epoch(0, images=24, train_time=2.0, epoch_time=2.5)
    writer.close()
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    header, first, second, val, val_ema, epoch = [json.loads(line) for line in lines]  # strict JSON: no NaN
    assert header['type'] == 'header' and (header['epoch'], header['step'], header['resumed_from']) == (0, 0, None)
    assert (header['world_size'], header['global_batch'], header['steps_per_epoch']) == (2, 8, 6)
    assert header['torch_version'] == torch.__version__ and header['torchvision_version'] == torchvision.__version__
    assert header['args'] == {'lr': 0.1} and header['recipe'] == 'habana-1.4' and header['mode'] == 'train'
    assert set(first) == TRAIN_FIELDS | {'type', 'epoch', 'step', 'timestamp'}
    assert (first['train.total_ips'], first['train.compute_ips']) == (20.0, 25.0)  # rank 0's x 2 ranks
    assert second['train.loss'] is None
    assert (val['type'], val['ema'], val['val.top1'], val['val.images'], val['step']) == ('val', False, 30.0, 20, None)
    assert val_ema['ema'] and val_ema['val_ema.top1'] == 35.0 and 'val.top1' not in val_ema
    assert (epoch['train.images'], epoch['train.total_ips'], epoch['epoch_time']) == (48, 24.0, 2.5)

    again = metrics.MetricsFile(str(tmp_path / 'metrics.jsonl'))  # a resumed run appends
    again.header(**header_values(start=metrics.RunStart(1, 16, str(tmp_path / 'checkpoint.pth'))))
    again.close()
    resumed = records(tmp_path)[-1]
    assert len(records(tmp_path)) == 7
    assert resumed['resumed_from'] == {'checkpoint': str(tmp_path / 'checkpoint.pth'), 'epoch': 1, 'step': 2}
    assert (resumed['epoch'], resumed['step']) == (1, 2)


def test_a_line_the_disk_cannot_take_is_taken_back_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    path = tmp_path / 'metrics.jsonl'
    writer = metrics.MetricsFile(str(path))
    writer.header(**header_values())
    real_write = os.write
    monkeypatch.setattr(metrics.os, 'write', lambda fd, data: real_write(fd, data[:10]))  # a disk that fills up
    writer.evaluation(0, loss=1.0, top1=1.0, top5=1.0, images=1)
    writer.evaluation(1, loss=1.0, top1=1.0, top5=1.0, images=1)  # nothing more is tried
    monkeypatch.undo()
    writer.close()
    assert path.read_bytes().count(b'\n') == 1 and path.read_bytes().endswith(b'}\n')  # the header, whole
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f'warning: could not write {path}: only 10 of ')


def test_other_ranks_and_runs_without_output_dir_write_nothing(tmp_path):
    assert metrics.open_run(str(tmp_path), rank=1) is metrics.NO_METRICS
    assert metrics.open_run('', rank=0) is metrics.NO_METRICS
    assert os.listdir(tmp_path) == []


# --- real runs, in-process ---------------------------------------------------------------------------------------

def test_a_train_py_run_writes_header_train_val_and_epoch_records(train_run):
    found = records(train_run)
    assert [r['type'] for r in found] == ['header'] + (['train'] * 2 + ['val', 'epoch']) * 2
    header = found[0]
    assert header['device'] and header['world_size'] == 1 and header['global_batch'] == 8
    assert header['steps_per_epoch'] == 4 and header['args']['model'] == 'resnet18'
    assert header['git_commit'] is None or re.fullmatch('[0-9a-f]{40}', header['git_commit'])
    trains = [r for r in found if r['type'] == 'train']
    assert [(r['epoch'], r['step']) for r in trains] == [(0, 0), (0, 2), (1, 0), (1, 2)]  # the logged steps
    assert all(TRAIN_FIELDS <= set(r) and r['train.lr'] == 0.1 for r in trains)
    assert all(r['train.compute_ips'] >= r['train.total_ips'] > 0 for r in trains)
    vals = [r for r in found if r['type'] == 'val']
    assert [(r['epoch'], r['val.images'], r['ema']) for r in vals] == [(0, 16, False), (1, 16, False)]
    epochs = [r for r in found if r['type'] == 'epoch']
    assert [(r['epoch'], r['train.images']) for r in epochs] == [(0, 32), (1, 32)]


def test_tensorboard_events_read_back_with_the_jsonl_tags(train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(train_run / 'tensorboard'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/top1', 'train/lr', 'train/compute_ips', 'train/data_time', 'val/top1', 'val/loss',
            'epoch/images', 'epoch/time', 'epoch/total_ips', 'epoch/epoch_time'} <= tags
    jsonl = records(train_run, 'train')
    loss = events.Scalars('train/loss')
    assert [e.step for e in loss] == [8, 24, 40, 56]  # images trained: (epoch x 4 + step + 1) x 8
    assert [e.value for e in loss] == pytest.approx([r['train.loss'] for r in jsonl])
    assert [(e.step, e.value) for e in events.Scalars('val/top1')] == pytest.approx(
        [(32, records(train_run, 'val')[0]['val.top1']), (64, records(train_run, 'val')[1]['val.top1'])])


def test_test_only_appends_a_header_and_its_evaluation(train_run, jpeg_dataset, tmp_path):
    before = (train_run / 'metrics.jsonl').read_bytes()
    code = run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(train_run), *QUICK,
                                  '--num-eval-steps', '1', '--test-only',
                                  '--resume', str(train_run / 'checkpoint.pth')])
    assert code == 0
    after = (train_run / 'metrics.jsonl').read_bytes()
    assert after.startswith(before)
    header, val = [json.loads(line) for line in after[len(before):].splitlines()]
    assert header['mode'] == 'test-only' and header['resumed_from']['checkpoint'] == str(train_run / 'checkpoint.pth')
    assert (val['type'], val['epoch'], val['val.images']) == ('val', 1, 8)  # the checkpoint's last epoch


def test_no_output_dir_writes_no_metrics_file(jpeg_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', '', *QUICK, '--epochs', '1',
                                  '--num-train-steps', '1', '--num-eval-steps', '1']) == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('trainer', [train, main])
def test_tensorboard_without_the_package_is_refused_at_start_with_the_install_line(trainer, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # import fails as when it is not installed
    out = tmp_path / 'out'
    code = run_in_process(trainer, ['--data-path', str(tmp_path), '--output-dir', str(out), '--device', 'cpu',
                                    '--tensorboard'])
    assert code == 2 and not out.exists()  # before any work: the folder is not even made
    assert capsys.readouterr().err == f'error: {metrics.INSTALL_TENSORBOARD}\n'
    assert 'pip install tensorboard' in metrics.INSTALL_TENSORBOARD


def test_tensorboard_needs_an_output_dir(tmp_path, capsys):
    assert run_in_process(train, ['--data-path', str(tmp_path), '--output-dir', '', '--device', 'cpu',
                                  '--tensorboard']) == 2
    assert '--tensorboard writes into <output-dir>/tensorboard' in capsys.readouterr().err


@pytest.fixture(scope='module')
def googlenet_run(jpeg_dataset, tmp_path_factory):
    """One in-process main.py run: 1 epoch of 3 steps."""
    out = tmp_path_factory.mktemp('metrics') / 'googlenet-run'
    code = run_in_process(main, ['--data-path', jpeg_dataset, '--output-dir', str(out), *GOOGLENET_QUICK,
                                 '--epochs', '1', '--num-train-steps', '3', '--save-checkpoint', '0'])
    assert code == 0
    return out


def test_main_py_writes_the_same_records(googlenet_run):
    found = records(googlenet_run)
    assert [r['type'] for r in found] == ['header', 'train', 'train', 'val', 'epoch']
    assert found[0]['args']['model'] == 'googlenet' and found[0]['steps_per_epoch'] == 3
    assert [r['step'] for r in found[1:3]] == [0, 2] and all(TRAIN_FIELDS <= set(r) for r in found[1:3])
    assert found[3]['val.images'] == 20 and found[4]['train.images'] == 24  # 3 steps bound validation too
    assert found[3]['val.loss'] > 0 and found[4]['epoch_time'] >= found[4]['train.time'] > 0


# --- curves -------------------------------------------------------------------------------------------------------

def test_plot_draws_two_real_runs_into_one_png(train_run, googlenet_run, tmp_path, capsys):
    from PIL import Image
    png = tmp_path / 'curves.png'
    assert cli.run_cli(plot_metrics.main, [str(train_run), str(googlenet_run / 'metrics.jsonl'),
                                           '--output', str(png)]) == 0
    assert capsys.readouterr().out.endswith(f'wrote {png} (2 runs)\n')
    with Image.open(png) as image:
        assert image.size == (1200, 800)
        colours = image.convert('RGB').getcolors(maxcolors=1 << 20)
        grey = np.asarray(image.convert('L'), dtype=np.float32)
    assert len(colours) > 10 and grey.std() > 10  # lines and text, not a blank page


@pytest.mark.parametrize('content, message', [
    (None, "error: cannot read metrics file '{path}': No such file or directory"),
    (b'', "error: metrics file '{path}' is empty"),
    (b'Epoch: [0]  [0/6]\n', "error: '{path}' line 1 is not JSON: not a metrics file"),
    (b'{"type": "header", "epoch": 0, "step": 0}\n', "error: '{path}' has no train or val records to plot"),
])
def test_plot_refuses_a_missing_empty_or_foreign_file_in_one_line(tmp_path, capsys, content, message):
    path = tmp_path / 'metrics.jsonl'
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        cli.run_cli(plot_metrics.main, [str(tmp_path), '--output', str(tmp_path / 'c.png')])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count('\n') == 1 and err.startswith(message.format(path=path))
    assert not (tmp_path / 'c.png').exists()


def test_plot_draws_the_last_start_with_its_resumes_against_fractional_epochs():
    def train_record(epoch, step):
        return {'type': 'train', 'epoch': epoch, 'step': step, 'train.loss': 1.0}
    old = [{'type': 'header', 'steps_per_epoch': 2, 'resumed_from': None}, train_record(0, 0)]
    new = [{'type': 'header', 'mode': 'train', 'steps_per_epoch': 4, 'resumed_from': None}, train_record(0, 1),
           {'type': 'header', 'mode': 'train', 'steps_per_epoch': 4, 'resumed_from': {'epoch': 0, 'step': 2}},
           train_record(0, 3), {'type': 'val', 'epoch': 0, 'step': None},
           {'type': 'header', 'mode': 'test-only', 'resumed_from': {'epoch': 1}, 'steps_per_epoch': 4}]
    run = plot_metrics.last_run(old + new)
    assert run == new
    assert plot_metrics.positions(run) == ([0, 0.5, 0, 1.0, 1, 0], 'epoch')
    assert plot_metrics.positions([{'type': 'train', 'epoch': 0, 'step': 1}])[1] == 'record'  # no header


# --- the demo wrapper ------------------------------------------------------------------------------------------

def test_demo_resnet_passes_tensorboard_on(capsys, monkeypatch):
    monkeypatch.delenv('MULTI_HLS_IPS', raising=False)
    argv = ['--world-size', '1', '--device', 'cpu', '--data-path', '/d', '--tensorboard', '--dry-run']
    code = cli.run_cli(launcher.launch_demo, demo_resnet.build_parser(), demo_resnet.trainer_args, demo_resnet.TRAINER,
                       False, argv)
    assert code == 0 and capsys.readouterr().out.splitlines()[-1].endswith(' --seed=123 --tensorboard')


# --- a real run stopped and resumed (subprocesses) -----------------------------------------------------------

@pytest.mark.slow
def test_a_stopped_and_resumed_run_appends_a_header_and_goes_on_with_its_epochs(jpeg_dataset, tmp_path):
    out = tmp_path / 'run'
    common = ['--data-path', jpeg_dataset, '--device', 'cpu', '--model', 'resnet18', '--batch-size', '8',
              '--workers', '2', '--print-freq', '2', '--dl-worker-type', 'MP', *TINY_IMAGES, '--epochs', '2',
              '--num-eval-steps', '1', '--output-dir', str(out)]
    proc = start_process(['train.py', *common])
    read_until(proc, r'^Epoch: \[0\]  \[2/6\]')
    os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-3000:]
    stopped = re.search(r'Stopped by SIGTERM: saved epoch 0 after step (\d+) .* continue with --resume (\S+)', log)
    assert stopped, log[-3000:]
    step, checkpoint = int(stopped.group(1)), stopped.group(2)
    first = records(out)
    assert [r['type'] for r in first][:3] == ['header', 'train', 'train']
    assert not [r for r in first if r['type'] in ('val', 'epoch')]  # the epoch did not end

    # resumed with other settings: the other loader, half the batch (the position is kept in samples)
    resumed = run_script(['train.py', *common, '--dl-worker-type', 'FAST', '--batch-size', '4', '--resume', checkpoint])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    found = records(out)
    assert found[:len(first)] == first  # appended
    header = found[len(first)]
    assert header['type'] == 'header' and header['resumed_from'] == {
        'checkpoint': os.path.abspath(checkpoint), 'epoch': 0, 'step': (step + 1) * 2}
    assert header['batch_size'] == 4 and header['steps_per_epoch'] == 12
    rest = found[len(first) + 1:]
    assert [(r['epoch'], r['step']) for r in rest if r['type'] == 'train'][0] == (0, (step + 1) * 2)
    assert [(r['type'], r['epoch']) for r in rest if r['type'] != 'train'] == [('val', 0), ('epoch', 0),
                                                                            ('val', 1), ('epoch', 1)]
    assert [r for r in rest if r['type'] == 'epoch'][1]['train.images'] == 48
    commit = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    assert header['git_commit'] == (commit or None) and found[0]['command'][0].endswith('train.py')


def test_loss_and_lr_panels_turn_logarithmic_when_their_values_span_three_decades():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, ax = plt.subplots()
    ax.plot([0, 1, 2], [2.3, 1.9, 1.5])
    assert not plot_metrics.spans_decades(ax)
    ax.plot([1, 2], [1.1e8, 0.9])  # a diverged validation loss
    assert plot_metrics.spans_decades(ax)
    plt.close(figure)
