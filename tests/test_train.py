"""train.py end to end on CPU: real JPEG folders, real subprocesses, real checkpoints."""
import os
import re
import sys

import pytest
import torch
import torchvision

from conftest import TINY_IMAGES, run_script

from classification import cli
import train
import utils

QUICK = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '8', '--workers', '0', '--print-freq', '1',
         '--dl-worker-type', 'MP', *TINY_IMAGES]


def run_train(data_path, out_dir, *extra):
    result = run_script(['train.py', '--data-path', data_path, '--output-dir', str(out_dir), *QUICK, *extra])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def losses(log):
    return re.findall(r'^Epoch: \[\d+\].*?  loss: (\S+)', log, flags=re.M)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_cli_defaults_match_habana_1_4_0():
    args = train.get_args_parser().parse_args([])
    expected = dict(data_path='/software/data/pytorch/imagenet/ILSVRC2012/', dl_time_exclude=True, model='resnet18',
                    device='hpu', batch_size=128, epochs=90, dl_worker_type='HABANA', workers=10,
                    process_per_node=8, hls_type='HLS1', lr=0.1, momentum=0.9, weight_decay=1e-4,
                    lr_step_size=30, custom_lr_values=None, custom_lr_milestones=None, lr_gamma=0.1,
                    print_freq=1, output_dir='.', channels_last=True, resume='', start_epoch=0, seed=123,
                    cache_dataset=False, sync_bn=False, test_only=False, pretrained=False, apex=False,
                    apex_opt_level='O1', world_size=1, dist_url='env://', num_train_steps=sys.maxsize,
                    num_eval_steps=sys.maxsize, save_checkpoint=False, run_lazy_mode=True,
                    deterministic=False, is_hmp=False, hmp_bf16='', hmp_fp32='', hmp_opt_level='O1',
                    hmp_verbose=False)
    assert {k: getattr(args, k) for k in expected} == expected


def test_cli_value_parsing_like_the_original():
    args = train.get_args_parser().parse_args([
        '--dl-worker-type', 'mp', '--channels-last', 'false', '--run-lazy-mode', 'False', '--dl-time-exclude=False',
        '--custom-lr-values', '0.275', '0.45', '--custom-lr-milestones', '1', '2', '--wd', '4e-5',
        '--hmp', '--hmp-bf16', 'a.txt', '--hmp-fp32', 'b.txt', '--device', 'cpu'])
    assert (args.dl_worker_type, args.channels_last, args.run_lazy_mode, args.dl_time_exclude) == ('MP', False, False, False)
    assert args.custom_lr_values == [0.275, 0.45] and args.custom_lr_milestones == [1, 2]
    assert args.weight_decay == 4e-5 and args.is_hmp and args.hmp_bf16 == 'a.txt'


def test_custom_lr_table_of_the_readme_examples():
    eight_cards = train.custom_lr_table(0.1, [0.275, 0.45, 0.625, 0.8, 0.08, 0.008, 0.0008], [1, 2, 3, 4, 30, 60, 80], 90)
    assert eight_cards == [0.1, 0.275, 0.45, 0.625] + [0.8] * 26 + [0.08] * 30 + [0.008] * 20 + [0.0008] * 10
    one_card = train.custom_lr_table(0.1, [0.1, 0.01, 0.001, 0.0001], [0, 30, 60, 80], 90)
    assert one_card == [0.1] * 30 + [0.01] * 30 + [0.001] * 20 + [0.0001] * 10
    assert train.custom_lr_table(0.1, None, None, 90) is None
    assert train.custom_lr_table(0.1, [0.2], [5], 3) == [0.1, 0.1, 0.1]  # a milestone past the end never starts


@pytest.mark.parametrize('values, milestones, message', [
    ([0.1, 0.01], None, '--custom-lr-values needs --custom-lr-milestones'),
    (None, [0, 30], '--custom-lr-milestones needs --custom-lr-values'),
    ([0.1, 0.01], [0], '2 values but --custom-lr-milestones has 1'),
    ([0.1, 0.01], [30, 0], 'must be increasing'),
    ([0.1, 0.01], [0, 0], 'must be increasing'),
    ([0.1, -0.01], [0, 30], 'must all be positive'),
])
def test_custom_lr_mistakes_are_clear_errors(values, milestones, message):
    with pytest.raises(cli.UsageError, match=message):
        train.custom_lr_table(0.1, values, milestones, 90)


@pytest.mark.slow
def test_custom_lr_schedule_is_applied_per_epoch(jpeg_dataset, tmp_path):
    log = run_train(jpeg_dataset, tmp_path, '--epochs', '3', '--num-train-steps', '1', '--num-eval-steps', '1',
                    '--lr', '0.05', '--custom-lr-values', '0.2', '0.02', '--custom-lr-milestones', '1', '2')
    assert re.findall(r'^Epoch: \[\d\].*?lr: (\S+)', log, flags=re.M) == ['0.05', '0.2', '0.02']


@pytest.mark.slow
def test_log_lines_keep_the_upstream_format(jpeg_dataset, tmp_path):
    log = run_train(jpeg_dataset, tmp_path, '--epochs', '1', '--print-freq', '2')
    number = r'\d+\.\d+(e[-+]\d+)?'
    line = (r'^Epoch: \[0\]  \[ ?\d+/6\]  eta: \d+:\d\d:\d\d  lr: 0\.1  img/s: ' + number +
            r'  loss: \S+ \(\S+\)  acc1: \S+ \(\S+\)  acc5: \S+ \(\S+\)  time: \d+\.\d{4}  data: \d+\.\d{4}$')
    train_lines = [l for l in log.splitlines() if l.startswith('Epoch: [0]  [')]
    assert [l.split(']  [')[1].split('/')[0].strip() for l in train_lines] == ['0', '2', '4']
    assert all(re.match(line, l) for l in train_lines), train_lines
    assert re.search(r'^Epoch: \[0\] Total time: \d+:\d\d:\d\d$', log, flags=re.M)
    assert re.search(r'^Test:  \[0/3\]  eta: \S+  loss: \S+ \(\S+\)  acc1: ', log, flags=re.M)
    assert re.search(r'^ \* Acc@1 \d+\.\d{3} Acc@5 \d+\.\d{3}$', log, flags=re.M)
    assert re.search(r'^Training time \d+:\d\d:\d\d$', log, flags=re.M)
    assert 'Test: evaluated 20 images' in log


@pytest.mark.slow
def test_dataset_class_count_sets_the_head_and_few_classes_do_not_break_top5(fresh_dataset, tmp_path):
    three_classes = fresh_dataset(classes=3, train_per_class=6, val_per_class=2)
    log = run_train(three_classes, tmp_path, '--epochs', '1', '--save-checkpoint')
    assert re.search(r' \* Acc@1 \S+ Acc@5 100\.000', log)  # top-5 of 3 classes: always right
    checkpoint = load(tmp_path / 'checkpoint.pth')
    assert checkpoint['model']['fc.weight'].shape == (3, 512) and checkpoint['num_classes'] == 3


@pytest.mark.slow
def test_checkpoints_are_written_and_load_into_torchvision(jpeg_dataset, tmp_path):
    run_train(jpeg_dataset, tmp_path, '--epochs', '2', '--num-train-steps', '2', '--save-checkpoint')
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth', 'metrics.jsonl', 'model_0.pth', 'model_1.pth']
    checkpoint = load(tmp_path / 'checkpoint.pth')
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args'} <= set(checkpoint)
    assert checkpoint['epoch'] == 1 and checkpoint['model_name'] == 'resnet18'
    assert checkpoint['args']['batch_size'] == 8
    reference = torchvision.models.resnet18(num_classes=4)
    reference.load_state_dict(checkpoint['model'], strict=True)
    assert torch.equal(load(tmp_path / 'model_1.pth')['model']['fc.weight'], checkpoint['model']['fc.weight'])


@pytest.mark.slow
def test_resume_continues_exactly_where_it_stopped(jpeg_dataset, tmp_path):
    common = ['--deterministic', '--save-checkpoint', '--num-eval-steps', '1', '--workers', '1']
    run_train(jpeg_dataset, tmp_path / 'straight', '--epochs', '2', *common)
    run_train(jpeg_dataset, tmp_path / 'first', '--epochs', '1', *common)
    log = run_train(jpeg_dataset, tmp_path / 'resumed', '--epochs', '2', '--resume',
                    str(tmp_path / 'first' / 'checkpoint.pth'), *common)
    assert 'Epoch: [0]' not in log and 'Epoch: [1]' in log
    straight, resumed = load(tmp_path / 'straight' / 'model_1.pth'), load(tmp_path / 'resumed' / 'model_1.pth')
    for key, tensor in straight['model'].items():
        assert torch.equal(tensor, resumed['model'][key]), key
    assert straight['lr_scheduler'] == resumed['lr_scheduler']


@pytest.mark.slow
def test_deterministic_runs_repeat_whatever_the_worker_count(jpeg_dataset, tmp_path):
    common = ['--deterministic', '--epochs', '1', '--num-eval-steps', '0']
    runs = [losses(run_train(jpeg_dataset, tmp_path / f'w{workers}', '--workers', str(workers), *common))
            for workers in (0, 2, 0)]
    assert len(runs[0]) == 6 and runs[0] == runs[1] == runs[2]


@pytest.mark.slow
def test_test_only_evaluates_and_exits(jpeg_dataset, tmp_path):
    run_train(jpeg_dataset, tmp_path / 'run', '--epochs', '1', '--num-train-steps', '1', '--save-checkpoint')
    log = run_train(jpeg_dataset, tmp_path / 'eval', '--test-only', '--resume',
                    str(tmp_path / 'run' / 'checkpoint.pth'))
    assert 'Epoch: [' not in log and 'Start training' not in log
    assert re.search(r'^ \* Acc@1 \S+ Acc@5 \S+$', log, flags=re.M)


class Clock:
    """time.time() for utils, moved on by hand: the throughput figures are exact, whatever the machine does."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_throughput_window_gives_both_rates_over_the_whole_window_and_the_data_wait_per_step(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(utils, 'time', clock)
    window = utils.ThroughputWindow()
    for data_s, compute_s in ((0.05, 0.05), (0.2, 0.1), (0.0, 0.15)):
        clock.now += data_s  # waiting for data
        window.data_ready()
        clock.now += compute_s  # computing
        window.step_done(10)
    clock.now += 0.05  # logging after the last step counts as compute
    figures = window.close()
    assert figures.total_ips == pytest.approx(30 / 0.6)      # 30 images over the window's 0.6 s
    assert figures.compute_ips == pytest.approx(30 / 0.35)   # ... of which 0.25 s waited for data
    assert (figures.steps, figures.data_time_per_step) == (3, pytest.approx(0.25 / 3))
    assert (window.images, window.steps, window.data_time, window.total_images) == (0, 0, 0.0, 30)  # a new window
