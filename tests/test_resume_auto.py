"""--resume auto (the output folder's checkpoint.pth, else a fresh start; a scheduler's stop with epochs left exits
75 so a job script runs the same command again) and the stop signals of start-up (start_up.py): one line and the
stop's status, never the signal's default action. The same through SLURM: tests/test_slurm.py."""
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from conftest import (REPO, TINY_IMAGES, catches_signal, mpirun_prefix, read_until, run_in_process, run_script,
                      script_env, start_process)

import main as googlenet_main
import train
from classification import checkpoints, cli, launcher, training
from classification.cli import UsageError

REAL = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '5',
        *TINY_IMAGES]
STOPPED_AUTO = re.compile(r'Stopped by (SIG\w+): saved epoch (\d+) after step (\d+) .* continue with the same command '
                          r'\(--resume auto\)')


# --- quick: the pieces -----------------------------------------------------------------------------

@pytest.mark.parametrize('argv, status', [
    (['train.py', '--resume', 'auto'], 75), (['main.py', '--resume=auto', '-e'], 75),
    (['train.py', '--resume', 'out/checkpoint.pth'], 0), (['train.py', '--output-dir', 'auto'], 0), (['x'], 0)])
def test_the_rerun_status_is_read_from_the_command_line_before_any_parser(argv, status):
    assert cli.rerun_status_of_command(argv) == status


def test_a_schedulers_stop_exits_0_or_75_under_resume_auto_and_another_signal_128_plus_n():
    assert cli.stop_exit_status(signal.SIGTERM) == 0 and cli.stop_exit_status(signal.SIGUSR1, 75) == 75
    assert cli.stop_exit_status(signal.SIGHUP, 75) == 129 and cli.stop_exit_status(signal.SIGINT) == 130
    assert cli.rerun_status('auto') == cli.RERUN_EXIT_STATUS == 75 and cli.rerun_status('x.pth') == 0


def test_resume_auto_needs_an_output_folder_and_is_refused_for_an_evaluation(tmp_path):
    with pytest.raises(UsageError, match=r"^--resume auto with --test-only: an evaluation needs a checkpoint"):
        training.check_model_and_resume('resnet18', 'auto', str(tmp_path), '--test-only')
    with pytest.raises(UsageError, match=r"^--resume auto resumes from --output-dir's checkpoint.pth"):
        training.check_model_and_resume('resnet18', 'auto', '')
    training.check_model_and_resume('resnet18', 'auto', str(tmp_path / 'not-yet'))
    (tmp_path / 'checkpoint.pth').mkdir()
    with pytest.raises(UsageError, match=r"^--resume auto: '.*/checkpoint.pth' is not a file; move it away"):
        training.check_model_and_resume('resnet18', 'auto', str(tmp_path))


def test_resume_auto_names_the_checkpoint_it_found_or_the_fresh_start(tmp_path, capsys):
    assert training.checkpoint_to_resume('auto', str(tmp_path)) is None
    (tmp_path / 'checkpoint.pth').write_bytes(b'x')
    assert training.checkpoint_to_resume('auto', str(tmp_path)) == str(tmp_path / 'checkpoint.pth')
    assert capsys.readouterr().out.splitlines() == [
        f'--resume auto: no {tmp_path}/checkpoint.pth yet, so a fresh start',
        f'--resume auto: resuming from {tmp_path}/checkpoint.pth']
    assert training.checkpoint_to_resume('given.pth', str(tmp_path)) == 'given.pth'
    assert training.checkpoint_to_resume('', str(tmp_path)) is None


def write_checkpoint(folder, model_name, num_classes):
    os.makedirs(folder, exist_ok=True)
    checkpoint = {'format_version': checkpoints.FORMAT_VERSION, 'model_name': model_name, 'num_classes': num_classes,
                  'model': {}, 'optimizer': {}, 'lr_scheduler': None, 'epoch': 0}
    torch.save(checkpoint, os.path.join(folder, 'checkpoint.pth'))


@pytest.mark.parametrize('model_name, num_classes, message', [
    ('resnet50', 4, 'holds a resnet50 model but --model is resnet18'),
    ('resnet18', 10, 'was trained on 10 classes but the dataset has 4')])
def test_resume_auto_with_another_models_checkpoint_in_the_folder_is_one_line_and_exit_2(
        jpeg_dataset, tmp_path, capsys, model_name, num_classes, message):
    out = str(tmp_path / 'out')
    write_checkpoint(out, model_name, num_classes)
    before = sorted(os.listdir(out))
    status = run_in_process(train, ['--data-path', jpeg_dataset, *REAL, '--workers', '0', '--epochs', '1',
                                    '--output-dir', out, '--resume', 'auto'])
    captured = capsys.readouterr()
    assert status == 2
    assert f'--resume auto: resuming from {out}/checkpoint.pth' in captured.out
    assert captured.err.strip().splitlines() == [f"error: --resume: '{out}/checkpoint.pth' {message}"]
    assert sorted(os.listdir(out)) == before  # nothing written


@pytest.mark.parametrize('trainer, flag', [
    (train, '--test-only'), (googlenet_main, '--evaluate')])
def test_resume_auto_with_an_evaluation_is_one_line_and_exit_2(jpeg_dataset, tmp_path, capsys, trainer, flag):
    status = run_in_process(trainer, ['--data-path', jpeg_dataset, '--device', 'cpu', '--output-dir', str(tmp_path), '--resume', 'auto',
                                      flag])
    assert status == 2
    assert capsys.readouterr().err.startswith(f'error: --resume auto with {flag}: an evaluation needs')
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('tasks_per_node, slots', [('2', 2), ('2(x3),1', 7), ('4(x2)', 8), ('', 0), ('odd', 0)])
def test_the_allocations_task_slots_are_read_as_slurm_writes_them(tasks_per_node, slots):
    assert launcher.allocation_slots(tasks_per_node) == slots


def test_the_demo_wrapper_in_an_allocation_refuses_more_ranks_than_slots_and_a_start_as_several_tasks():
    inside = {'SLURM_JOB_ID': '7', 'SLURM_TASKS_PER_NODE': '1'}
    with pytest.raises(UsageError, match=r'^--world-size 2: SLURM job 7 has 1 task slot\(s\) \(SLURM_TASKS_PER_NODE=1\)'):
        launcher.check_slurm_allocation(launcher.Placement(2), inside)
    launcher.check_slurm_allocation(launcher.Placement(1), inside)
    launcher.check_slurm_allocation(launcher.Placement(2), {**inside, 'SLURM_TASKS_PER_NODE': '2'})
    launcher.check_slurm_allocation(launcher.Placement(8), {})  # outside an allocation: mpirun decides
    step = {**inside, 'SLURM_TASKS_PER_NODE': '2', 'SLURM_STEP_ID': '0', 'SLURM_STEP_NUM_TASKS': '2'}
    with pytest.raises(UsageError, match=r'^this wrapper is one of 2 tasks of SLURM step 7\.0 \(srun -n 2\)'):
        launcher.check_slurm_allocation(launcher.Placement(2), step)


# --- slow: real runs ---------------------------------------------------------------------------------

def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return out


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_a_stop_under_resume_auto_exits_75_and_the_same_command_again_ends_with_the_uninterrupted_weights(
        jpeg_dataset, tmp_path, loader):
    common = ['--data-path', jpeg_dataset, *REAL, '--dl-worker-type', loader, '--epochs', '2', '--deterministic',
              '--save-checkpoint', '--num-eval-steps', '1']
    straight = run_script(['train.py', *common, '--output-dir', str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = str(tmp_path / 'cut')
    proc = start_process(['train.py', *common, '--output-dir', out, '--resume', 'auto'])
    log = read_until(proc, r'^Epoch: \[0\]  \[ 5/12\]')
    assert f'--resume auto: no {out}/checkpoint.pth yet, so a fresh start' in log
    os.killpg(proc.pid, signal.SIGTERM)
    log += finish(proc)
    assert proc.returncode == 75, log[-3000:]
    assert STOPPED_AUTO.search(log), log[-3000:]

    # the same command, with settings a resume may change (loader workers, print frequency)
    again = run_script(['train.py', *common, '--output-dir', out, '--resume', 'auto', '--workers', '1',
                        '--print-freq', '3'])
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f'--resume auto: resuming from {out}/checkpoint.pth' in again.stdout
    assert re.search(r'^Resuming epoch 0 at step \d+', again.stdout, re.M)
    straight_model, resumed_model = weights(tmp_path / 'straight' / 'checkpoint.pth'), weights(f'{out}/checkpoint.pth')
    assert all(torch.equal(straight_model[k], resumed_model[k]) for k in straight_model)

    done = run_script(['train.py', *common, '--output-dir', out, '--resume', 'auto'])  # nothing left: exit 0
    assert done.returncode == 0 and 'Epoch: [' not in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_main_py_under_resume_auto_writes_checkpoint_pth_and_the_same_command_with_more_epochs_resumes_it(
        jpeg_dataset, tmp_path):
    """main.py saves under the original's names (checkpoint_<epoch>_<device>.pth.tar); before, --resume auto found
    no checkpoint.pth there and every rerun started afresh."""
    out = str(tmp_path / 'out')
    common = ['main.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--batch-size', '4', '--workers', '2',
              '--print-interval', '3', '--dl-worker-type', 'MP', '--train-crop-size', '64', '--val-resize-size', '72',
              '--val-crop-size', '64', '--num-train-steps', '3', '--output-dir', out, '--resume', 'auto']
    first = run_script(common + ['--epochs', '1'])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert f'--resume auto: no {out}/checkpoint.pth yet, so a fresh start' in first.stdout
    again = run_script(common + ['--epochs', '2'])
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f'--resume auto: resuming from {out}/checkpoint.pth' in again.stdout
    assert 'Epoch: [0]' not in again.stdout and 'Epoch: [1]' in again.stdout, again.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.mpi
def test_resume_auto_on_two_ranks_through_the_demo_wrapper_and_plain_mpirun_exits_75_after_rank_0_saved(
        jpeg_dataset, tmp_path):
    out = tmp_path / 'out'
    common = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '2',
              '--epochs', '2', '--num-eval-steps', '1', '--data-path', jpeg_dataset, '--output-dir', str(out),
              '--resume', 'auto']
    proc = start_process(['demo_resnet.py', '--world-size', '2', '--dl-worker-type', 'FAST', *common])
    log = read_until(proc, r'^Epoch: \[0\]  \[2/6\]')
    os.killpg(proc.pid, signal.SIGTERM)  # the wrapper's whole group, as a scheduler sends it
    log += finish(proc)
    assert proc.returncode == 75, log[-3000:]
    stopped = STOPPED_AUTO.search(log)
    assert stopped and stopped.group(2) == '0', log[-3000:]
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch_position'] > 0

    proc = subprocess.Popen(mpirun_prefix(2) + ['train.py', *common[:-2], *TINY_IMAGES, '--dl-worker-type', 'MP',
                                                '--resume', 'auto'],
                            cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = read_until(proc, r'^Epoch: \[1\]  \[0/6\]')
    assert f'--resume auto: resuming from {out}/checkpoint.pth' in log
    proc.send_signal(signal.SIGUSR1)  # mpirun alone: it forwards SIGUSR1 to the ranks
    log += finish(proc)
    assert proc.returncode == 75, log[-3000:]
    stopped = STOPPED_AUTO.search(log)
    assert stopped and stopped.groups()[:2] == ('SIGUSR1', '1'), log[-3000:]


def wait_until_it_catches(proc, signum, timeout=60):
    deadline = time.time() + timeout
    while not catches_signal(proc.pid, signum):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize('script, signum, resume, status', [
    ('train.py', signal.SIGTERM, [], 0), ('train.py', signal.SIGUSR1, ['--resume', 'auto'], 75),
    ('main.py', signal.SIGTERM, ['--resume', 'auto'], 75), ('main.py', signal.SIGHUP, [], 129)])
def test_a_stop_signal_while_the_trainer_imports_torch_ends_it_with_one_line_and_the_stops_status(
        jpeg_dataset, tmp_path, script, signum, resume, status):
    proc = start_process([script, '--data-path', jpeg_dataset, '--device', 'cpu', '--workers', '2', '--epochs', '1', '--output-dir',
                          str(tmp_path / 'out'), *resume])
    wait_until_it_catches(proc, signum)  # its first lines have run
    os.killpg(proc.pid, signum)
    log = finish(proc)
    name = signal.Signals(signum).name
    assert proc.returncode == status
    assert log == f'{name} received before training started: nothing trained, nothing to save; exiting {status}\n'
    assert not os.path.exists(tmp_path / 'out' / 'checkpoint.pth')


@pytest.mark.slow
def test_a_sigterm_while_rank_0_waits_for_its_peers_ends_it_at_once(jpeg_dataset, tmp_path):
    """Rank 1 of 2 never comes (leftover variables): rank 0 waits in C for --dist-timeout, yet a SIGTERM ends it
    at once, with one line."""
    proc = start_process(['train.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--workers', '2',
                          '--dist-timeout', '120', '--output-dir', str(tmp_path / 'out')],
                         SLURM_PROCID='0', SLURM_NTASKS='2', SLURM_LOCALID='0')
    read_until(proc, r'^\| distributed init \(rank 0, SLURM\)')
    time.sleep(2)  # inside the rendezvous
    sent = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    log = finish(proc, timeout=30)
    assert time.time() - sent < 5 and proc.returncode == 0, log
    assert log.splitlines()[-1] == 'SIGTERM received before training started: nothing trained, nothing to save; exiting 0'
