"""Bad input gets one clear line; faults lose nothing; jobs never hang (docs/guarantees.md)."""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (REPO, TINY_IMAGES, descends_from, mpirun_prefix, read_until, run_in_process, run_script,
                      script_env, start_process)

import train

FP32_OPS = os.path.join(REPO, 'ops_fp32_Resnet.txt')

QUICK = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '0', '--print-freq', '1',
         '--dl-worker-type', 'MP', *TINY_IMAGES]


def snapshot(folder):
    """Name -> (size, mtime, sha1) of every file, to prove a failed run changed nothing."""
    result = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        with open(path, 'rb') as f:
            result[name] = (os.path.getsize(path), os.stat(path).st_mtime_ns, hashlib.sha1(f.read()).hexdigest())
    return result


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, jpeg_dataset):
    """An output folder that holds a run's checkpoint and a user's file."""
    out = tmp_path_factory.mktemp('finished') / 'out'
    assert run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(out), *QUICK, '--epochs', '1',
                                  '--num-train-steps', '1', '--num-eval-steps', '1', '--save-checkpoint']) == 0
    (out / 'notes.txt').write_text('keep me')
    return out


@pytest.fixture
def output_dir(finished_run, tmp_path):
    """A private copy of `finished_run` (timestamps kept) for a test to run against."""
    return shutil.copytree(finished_run, tmp_path / 'out')


def damaged_copy(jpeg_dataset, tmp_path, damage):
    root = tmp_path / 'data'
    shutil.copytree(jpeg_dataset, root)
    damage(root)
    return str(root)


def truncate_a_jpeg(root):
    path = root / 'train' / 'class_01' / 'train_01_00003.JPEG'
    path.write_bytes(path.read_bytes()[:300])


def fake_jpeg(root):
    (root / 'val' / 'class_02' / 'scan.JPEG').write_text('this is not an image')


def empty_class(root):
    shutil.rmtree(root / 'train' / 'class_03')
    (root / 'train' / 'class_03').mkdir()


def write_file(path, content):
    path.write_bytes(content)
    return str(path)


BAD_INPUTS = {
    'missing data path': (lambda d, t: ['--data-path', str(t / 'nowhere')], "--data-path: '.*nowhere' does not exist"),
    'empty data path': (lambda d, t: ['--data-path', str(t)], r"--data-path: '.*/train' does not exist"),
    'no val folder': (lambda d, t: ['--data-path', damaged_copy(d, t, lambda r: shutil.rmtree(r / 'val'))],
                      r"--data-path: '.*/val' does not exist"),
    'class folder without images': (lambda d, t: ['--data-path', damaged_copy(d, t, empty_class)],
                                    r'--data-path: .*class_03.*every class folder needs at least one image'),
    'unknown model': (lambda d, t: ['--model', 'resnet5'], "--model: unknown model 'resnet5'; choose one of"),
    'batch size 0': (lambda d, t: ['--batch-size', '0'], '--batch-size must be at least 1, got 0'),
    'epochs 0': (lambda d, t: ['--epochs', '0'], '--epochs must be at least 1, got 0'),
    'negative workers': (lambda d, t: ['--workers', '-1'], '--workers must be at least 0, got -1'),
    'malformed lr value': (lambda d, t: ['--custom-lr-values', '0.1', 'x', '--custom-lr-milestones', '0', '30'],
                           "argument --custom-lr-values: invalid float value: 'x'"),
    'lr values without milestones': (lambda d, t: ['--custom-lr-values', '0.1'],
                                     '--custom-lr-values needs --custom-lr-milestones'),
    'mismatched lr lists': (lambda d, t: ['--custom-lr-values', '0.1', '0.01', '--custom-lr-milestones', '0'],
                            '--custom-lr-values has 2 values but --custom-lr-milestones has 1'),
    'missing op list': (lambda d, t: ['--hmp', '--hmp-bf16', str(t / 'ops.txt'), '--hmp-fp32', FP32_OPS],
                        "--hmp-bf16: op list file '.*ops.txt' does not exist"),
    'unknown op in list': (lambda d, t: ['--hmp', '--hmp-bf16', write_file(t / 'ops.txt', b'conv2d\nconv3x3\n'),
                                         '--hmp-fp32', FP32_OPS],
                           "--hmp-bf16: 'conv3x3' in .*ops.txt is not a torch op"),
    'cuda without a GPU': (lambda d, t: ['--device', 'cuda'], '--device cuda: no CUDA GPU is visible'),
    'hpu without the bridge': (lambda d, t: ['--device', 'hpu'], '--device hpu: the Habana PyTorch bridge'),
    'missing resume file': (lambda d, t: ['--resume', str(t / 'gone.pth')], "--resume: checkpoint '.*gone.pth' does not exist"),
    'truncated resume file': (lambda d, t: ['--resume', write_file(t / 'cut.pth', b'PK\x03\x04' + b'\0' * 64)],
                              r"--resume: '.*cut.pth' is not a readable checkpoint"),
    'foreign resume file': (lambda d, t: ['--resume', foreign_checkpoint(t)],
                            "--resume: '.*foreign.pth' was not written by these training scripts"),
    'resume onto other class names': (
        lambda d, t: ['--data-path', damaged_copy(d, t, rename_a_class), '--resume', str(t / 'out' / 'checkpoint.pth')],
        r"--resume: '.*checkpoint.pth' was trained with other class names: label 1 is 'class_01' there but "
        r"'class_01_renamed' in this dataset"),
}


def rename_a_class(root):
    for split in ('train', 'val'):
        (root / split / 'class_01').rename(root / split / 'class_01_renamed')


def foreign_checkpoint(tmp_path):
    import torchvision
    path = tmp_path / 'foreign.pth'
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), path)
    return str(path)


# Bad data met by loader workers: the one line must survive the workers' re-raise, so these run as processes.
BAD_DATA = {
    'truncated JPEG': (lambda d, t: ['--data-path', damaged_copy(d, t, truncate_a_jpeg), '--workers', '2'],
                       r"--data-path: cannot decode image '.*train_01_00003.JPEG'.*remove or replace the file"),
    'truncated JPEG, fast pipeline': (lambda d, t: ['--data-path', damaged_copy(d, t, truncate_a_jpeg), '--workers', '2',
                                                    '--dl-worker-type', 'FAST'],
                                      r"--data-path: cannot decode image '.*train_01_00003.JPEG'.*remove or replace"),
    'text file named .JPEG': (lambda d, t: ['--data-path', damaged_copy(d, t, fake_jpeg), '--workers', '2'],
                              r"--data-path: cannot decode image '.*scan.JPEG'"),
}


def assert_one_error_line(stderr, message):
    assert 'Traceback' not in stderr
    error_lines = [line for line in stderr.splitlines() if 'error:' in line]
    assert len(error_lines) == 1 and re.search(message, error_lines[0]), stderr[-1500:]


# Cases that are bad input only on a machine without the hardware they ask for.
NEEDS_NO_GPU = {'cuda without a GPU'}
NO_GPU_HERE = pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA GPU is visible: --device cuda is not bad input')


@pytest.mark.parametrize('case', [pytest.param(case, marks=NO_GPU_HERE) if case in NEEDS_NO_GPU else case
                                  for case in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, jpeg_dataset, output_dir, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    before = snapshot(output_dir)
    args = ['--data-path', jpeg_dataset, '--output-dir', str(output_dir), *QUICK, '--epochs', '2']
    status = run_in_process(train, args + make_args(jpeg_dataset, tmp_path))
    captured = capsys.readouterr()
    assert status == 2, captured.out[-1500:] + captured.err[-1500:]
    assert_one_error_line(captured.err, message)
    assert 'Start training' not in captured.out  # refused before any work
    assert snapshot(output_dir) == before


@pytest.mark.slow
@pytest.mark.parametrize('case', list(BAD_DATA))
def test_bad_data_is_one_clear_line_through_loader_workers_and_changes_nothing(case, jpeg_dataset, output_dir, tmp_path):
    make_args, message = BAD_DATA[case]
    before, records = snapshot(output_dir), (output_dir / 'metrics.jsonl').read_bytes()
    args = ['train.py', '--data-path', jpeg_dataset, '--output-dir', str(output_dir), *QUICK, '--epochs', '2',
            '--print-freq', '2']
    result = run_script(args + make_args(jpeg_dataset, tmp_path), timeout=120)
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    assert_one_error_line(result.stderr, message)
    after = snapshot(output_dir)
    assert after.pop('metrics.jsonl') and before.pop('metrics.jsonl') and after == before
    assert (output_dir / 'metrics.jsonl').read_bytes().startswith(records)  # the failed run's records only appended


@pytest.mark.slow
def test_files_that_are_not_images_by_extension_are_skipped(jpeg_dataset, tmp_path):
    data = damaged_copy(jpeg_dataset, tmp_path, lambda r: (r / 'train' / 'class_00' / 'README.txt').write_text('x'))
    result = run_script(['train.py', '--data-path', data, '--output-dir', str(tmp_path / 'out'), *QUICK,
                         '--epochs', '1', '--num-train-steps', '2'])
    assert result.returncode == 0, result.stderr[-1500:]


def run_to_end(data, out, *extra):
    result = run_script(['train.py', '--data-path', data, '--output-dir', str(out), *QUICK, *extra])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_intact(jpeg_dataset, tmp_path, loader):
    out = tmp_path / 'out'
    proc = start_process(['train.py', '--data-path', jpeg_dataset, '--output-dir', str(out), *QUICK, '--model', 'resnet101',
                  '--workers', '2', '--print-freq', '2', '--dl-worker-type', loader,
                  '--epochs', '3', '--num-train-steps', '2', '--num-eval-steps', '1', '--save-checkpoint'])
    deadline = time.time() + 240
    # epoch 1's checkpoint.pth is being written (to .checkpoint.pth.<pid>.<random>.tmp)
    while not ((out / 'model_1.pth').exists() and list(out.glob('.checkpoint.pth.*.tmp'))):
        assert proc.poll() is None and time.time() < deadline, 'never saw the second checkpoint being written'
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert checkpoint['epoch'] == 0  # the previous one, complete
    epoch0 = torch.load(out / 'model_0.pth', map_location='cpu', weights_only=True)
    assert all(torch.equal(epoch0['model'][k], checkpoint['model'][k]) for k in epoch0['model'])


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_nan_loss_stops_naming_the_first_bad_epoch_step_and_lr_and_keeps_the_last_good_checkpoint(
        jpeg_dataset, tmp_path, loader):
    out = tmp_path / 'out'
    result = run_script(['train.py', '--data-path', jpeg_dataset, '--output-dir', str(out), *QUICK, '--epochs', '3',
                         '--workers', '2', '--print-freq', '5', '--dl-worker-type', loader,
                         '--save-checkpoint', '--num-eval-steps', '1',
                         '--custom-lr-values', '1e12', '--custom-lr-milestones', '1'])
    assert result.returncode == 1
    assert re.search(r'^error: non-finite loss at epoch 1, step \d+ \(lr 1000000000000\.0\); stopped without saving',
                     result.stderr, flags=re.M), result.stderr[-1500:]
    assert 'Traceback' not in result.stderr
    assert sorted(os.listdir(out)) == ['checkpoint.pth', 'metrics.jsonl', 'model_0.pth']
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0


def rank_pids(launcher_pid):
    """PIDs of the python ranks started under this launcher (mpirun, or a demo wrapper), by OMPI rank."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmdline = f.read()
        except OSError:
            continue
        is_trainer = cmdline.split(b'\0')[1:2] == [os.path.join(REPO, 'train.py').encode()] or \
            cmdline.split(b'\0')[1:2] == [b'train.py']  # not a loader worker or the forkserver
        if b'OMPI_COMM_WORLD_RANK' in env and is_trainer and descends_from(int(pid), launcher_pid):
            ranks[int(env[b'OMPI_COMM_WORLD_RANK'])] = int(pid)
    return ranks


TWO_RANKS = {
    'mpirun': lambda data, out: mpirun_prefix(2) + ['train.py', '--data-path', data, '--output-dir', out, *QUICK],
    'demo wrapper': lambda data, out: [sys.executable, 'demo_resnet.py', '--world-size', '2', '--data-path', data,
                                       '--output-dir', out, '--device', 'cpu', '--model', 'resnet18',
                                       '--batch-size', '4', '--dl-worker-type', 'MP'],
}


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize('launch', list(TWO_RANKS))
def test_killing_one_rank_ends_the_whole_job_quickly(jpeg_dataset, tmp_path, launch):
    command = TWO_RANKS[launch](jpeg_dataset, str(tmp_path)) + ['--epochs', '50', '--workers', '2', '--print-freq', '2']
    proc = subprocess.Popen(command, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    read_until(proc, r'^Epoch: \[0\]  \[ ?2/')
    ranks = rank_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.time()
    try:
        log = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail('the job was still running 60 s after one rank died')
    print(f"job ended {time.time() - killed:.1f} s after the kill")
    assert proc.returncode != 0 and time.time() - killed < 60
    assert 'Traceback' not in log, log[-3000:]
    assert len(re.findall(r'^error: another rank ended \(.+\), so this rank stops too', log, flags=re.M)) == 1, \
        log[-3000:]


@pytest.mark.parametrize('change, message', [
    (['--model', 'resnet34'], "holds a resnet18 model but --model is resnet34"),
    (['--data-path', None], 'was trained on 4 classes but the dataset has 3'),
])
def test_resume_refuses_a_different_model_or_class_count(jpeg_dataset, fresh_dataset, output_dir, change, message,
                                                         capsys):
    args = ['--data-path', jpeg_dataset, '--output-dir', str(output_dir), *QUICK, '--epochs', '2',
            '--resume', str(output_dir / 'checkpoint.pth')]
    change = [fresh_dataset(classes=3) if c is None else c for c in change]
    assert run_in_process(train, args + change) == 2
    assert_one_error_line(capsys.readouterr().err, re.escape(message))


GOOGLENET_QUICK = ['--device', 'cpu', '--batch-size', '4', '--workers', '1', '--train-crop-size', '16',
                   '--val-resize-size', '18', '--val-crop-size', '16']


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_googlenet_trainer_sigterm_and_resume_end_with_the_same_weights(jpeg_dataset, tmp_path, loader):
    common = ['--data-path', jpeg_dataset, *GOOGLENET_QUICK, '--workers', '2', '--print-interval', '5',
              '--dl-worker-type', loader, '--epochs', '2', '--seed', '7', '--save-checkpoint', '1']
    straight = run_script(['main.py', *common, '--output-dir', str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = start_process(['main.py', *common, '--output-dir', str(tmp_path / 'cut')])
    read_until(proc, r'^Epoch: \[1\]\[ ?5/12\]')
    os.killpg(proc.pid, signal.SIGTERM)  # trainer, forkserver and loader workers
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest[-2000:]
    assert 'Traceback' not in rest
    stopped = re.search(r'Stopped by SIGTERM: saved epoch 1 after step (\d+) \(\d+ samples, signal seen at step '
                        r'(\d+)\) to (\S+) in', rest)
    assert stopped and stopped.group(1) == stopped.group(2), rest[-2000:]  # the step the signal arrived in

    resumed = run_script(['main.py', *common, '--output-dir', str(tmp_path / 'cut'), '--resume', stopped.group(3)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    name = 'checkpoint_1_cpu.pth.tar'
    a = torch.load(tmp_path / 'straight' / name, weights_only=True)['state_dict']
    b = torch.load(tmp_path / 'cut' / name, weights_only=True)['state_dict']
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_googlenet_trainer_stops_on_a_nan_loss(jpeg_dataset, tmp_path):
    result = run_script(['main.py', '--data-path', jpeg_dataset, *GOOGLENET_QUICK, '--workers', '2',
                         '--print-interval', '3', '--dl-worker-type', 'FAST', '--epochs', '1', '--lr', '1e12',
                         '--output-dir', str(tmp_path)])
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert re.search(r'^error: non-finite loss at epoch 0, step \d+ \(lr 1000000000000\.0\)', result.stderr,
                     flags=re.M), result.stderr[-1500:]
    assert os.listdir(tmp_path) == ['metrics.jsonl']  # the records up to the stop, no checkpoint
