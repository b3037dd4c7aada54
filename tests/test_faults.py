"""Faults around a healthy trainer (its loader workers, its launcher, its output, the signals shells and
schedulers send): the run saves the steps it trained, says what happened in one line and exits with a status
that says whether it finished; nothing of a job outlives its launcher. docs/guarantees.md, issue 20."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (REPO, TINY_IMAGES, command_line, job_processes, mpirun_prefix, read_until, run_script, script_env,
                      start_process)
from classification import data
from test_preemption import REAL, assert_clean, finish, trained_per_rank, weights

# The stop line after a fault: the cause, where it saved, and when the fault was seen.
FAULT_STOP = re.compile(r"Stopped by (a loader worker's death|the end of its launcher|the loss of its output stream)"
                        r"( on rank \d)?: saved epoch (\d+) after step (\d+) \((\d+) samples(?:, fault seen at step "
                        r"(\d+))?\) to (\S+) in [\d.]+ s \([\d.]+ s after the fault\); continue with --resume")
SIGNAL_STOP = re.compile(r'Stopped by (SIG\w+): saved epoch (\d+) after step (\d+) \((\d+) samples, signal seen at '
                         r'step (\d+)\) to (\S+) in')


def children(pid):
    found = []
    for task in os.listdir(f'/proc/{pid}/task'):
        try:
            with open(f'/proc/{pid}/task/{task}/children') as f:
                found += [int(child) for child in f.read().split()]
        except OSError:
            pass
    return found



def loader_workers(trainer):
    """The loader worker processes of a trainer: the children of its multiprocessing forkserver."""
    servers = [pid for pid in children(trainer) if 'forkserver' in command_line(pid)]
    return [worker for server in servers for worker in children(server)]


def rank_process(job_root, rank):
    """The pid of rank `rank` of an mpirun job below `job_root` (from the rank variable mpirun gives it)."""
    for pid in job_processes(job_root):
        if 'train.py' not in command_line(pid) or 'mpirun' in command_line(pid) or 'demo_' in command_line(pid):
            continue
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                environ = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        except OSError:
            continue
        if environ.get(b'OMPI_COMM_WORLD_RANK') == str(rank).encode():
            return pid
    raise AssertionError(f'no rank {rank} below {job_root}')


def started_at(pid):
    with open(f'/proc/{pid}/stat') as f:
        return int(f.read().rsplit(')', 1)[1].split()[19])  # field 22, starttime, in clock ticks


def wait_for(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def kill_one_loader_worker(trainer, signum=signal.SIGKILL, loaders=1, pick=min):
    """Kill a worker of the training loader, the one started first, or with `pick=max` the last started, one of
    validation's (`loaders`: 2 once validation has started, whose persistent workers stay beside the training
    loader's)."""
    workers = wait_for(lambda: len(loader_workers(trainer)) == 2 * loaders and loader_workers(trainer), 20)
    assert workers, loader_workers(trainer)  # --workers 2 each
    victim = pick(workers, key=started_at)
    os.kill(victim, signum)
    return victim


def straight_weights(dataset, tmp_path, loader):
    straight = run_script(['train.py', '--data-path', dataset, *REAL, '--dl-worker-type', loader, '--epochs', '1',
                           '--deterministic', '--save-checkpoint', '--num-eval-steps', '1', '--output-dir',
                           str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    return weights(tmp_path / 'straight' / 'model_0.pth')


# --- loader workers ------------------------------------------------------------------------------------------

def test_a_loader_worker_whose_trainer_died_while_it_started_ends_at_once():
    """The cause of test_multinode's rare leftovers: a rank killed while its validation workers started; their
    watch of the trainer found no trainer to watch and they lived on, holding orted's output pipes."""
    gone = subprocess.Popen(['true'])
    gone.wait()
    child = os.fork()
    if child == 0:
        try:
            data.end_with_trainer(gone.pid)
        finally:
            os._exit(0)
    assert os.waitpid(child, 0)[1] >> 8 == 1


@pytest.mark.slow
@pytest.mark.parametrize('loader, signum, cause', [
    ('MP', signal.SIGKILL, r'most likely the out-of-memory killer \(see dmesg\): lower --workers \(2\) or --batch-size'),
    ('FAST', signal.SIGKILL, r'most likely the out-of-memory killer'),
    ('FAST', signal.SIGBUS, r'most likely a full /dev/shm'),
], ids=['MP-SIGKILL', 'FAST-SIGKILL', 'FAST-SIGBUS'])
def test_a_killed_loader_worker_saves_the_steps_trained_and_the_resume_ends_as_an_uninterrupted_run(
        jpeg_dataset, tmp_path, loader, signum, cause):
    """Before: exit 1 within a second, two tracebacks (DataLoader worker exited unexpectedly), nothing saved."""
    common = ['--data-path', jpeg_dataset, *REAL, '--dl-worker-type', loader, '--epochs', '1', '--deterministic',
              '--save-checkpoint', '--num-eval-steps', '1']
    out = tmp_path / 'cut'
    proc = start_process(['train.py', *common, '--output-dir', str(out)])
    read_until(proc, r'^Epoch: \[0\]  \[ 5/12\]')
    pid = kill_one_loader_worker(proc.pid, signum)
    log = finish(proc).replace('\x00', '')  # torch's SIGBUS handler in the worker writes its line's NUL
    assert proc.returncode == 1, log[-3000:]
    assert 'Traceback' not in log, log[-3000:]
    name = signal.Signals(signum).name
    assert re.search(rf'^error: loader worker \d \(pid {pid}\) was killed by signal {int(signum)} \({name}\), {cause}[^.]*\. '
                     r"Stopping after this step and saving; the rest of this epoch's batches load in the trainer's "
                     r'process$', log, flags=re.M), log[-3000:]
    stopped = FAULT_STOP.search(log)
    assert stopped and stopped.group(1) == "a loader worker's death" and not stopped.group(2), log[-3000:]
    step, position, path = int(stopped.group(4)), int(stopped.group(5)), stopped.group(7)
    assert 5 <= step < 11 and position == (step + 1) * 4
    assert torch.load(path, weights_only=True)['epoch_position'] == position

    resumed = run_script(['train.py', *common, '--output-dir', str(out), '--resume', path])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rest = 12 - (step + 1)
    assert f'Resuming epoch 0 at step {step + 1} ({position} of its 48 samples trained)' in resumed.stdout
    assert re.search(rf'^Epoch: \[0\]  \[ ?0/{rest}\]', resumed.stdout, flags=re.M), resumed.stdout[-2000:]
    # every sample trained once, in the same order with the same crops: the uninterrupted run's weights
    straight, after = straight_weights(jpeg_dataset, tmp_path, loader), weights(out / 'model_0.pth')
    assert all(torch.equal(straight[k], after[k]) for k in straight)


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize('launch', ['demo wrapper, FAST, rank 1', 'plain mpirun, MP, rank 0'])
def test_a_killed_loader_worker_of_one_rank_stops_every_rank_after_the_same_step_and_saves(
        jpeg_dataset, tmp_path, launch):
    out = tmp_path / 'out'
    through_wrapper = launch.startswith('demo')
    loader, victim = ('FAST', 1) if through_wrapper else ('MP', 0)
    flags = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '5',
             '--dl-worker-type', loader, '--epochs', '1', '--num-eval-steps', '1', '--deterministic',
             '--data-path', jpeg_dataset, '--output-dir', str(out)]
    if through_wrapper:
        proc = start_process(['demo_resnet.py', '--world-size', '2', *flags])
    else:
        proc = subprocess.Popen(mpirun_prefix(2) + ['train.py', *flags, *TINY_IMAGES], cwd=REPO, env=script_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = read_until(proc, r'^Epoch: \[0\]  \[0/6\]')
    pid = kill_one_loader_worker(rank_process(proc.pid, victim))
    log += finish(proc)
    assert proc.returncode == 1, log[-3000:]
    assert_clean(log)
    prefix = f'rank {victim}: ' if victim else 'rank 0: '
    assert re.search(rf'^error: {prefix}loader worker \d \(pid {pid}\) was killed by signal 9 \(SIGKILL\)', log,
                     flags=re.M), log[-3000:]
    stopped = FAULT_STOP.search(log)
    assert stopped and stopped.group(2) == f' on rank {victim}' and stopped.group(3) == '0', log[-3000:]
    step, position, seen = int(stopped.group(4)), int(stopped.group(5)), stopped.group(6)
    assert position == (step + 1) * 4 * 2  # both ranks stopped after the same step
    assert (seen is None) == (victim != 0)  # rank 0 saw the fault only when it was its own
    assert seen is None or step - int(seen) <= 1
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert saved['epoch'] == 0 and saved['epoch_position'] == position

    resumed = run_script(mpirun_prefix(2) + ['train.py', *flags, *TINY_IMAGES, '--resume', str(out / 'checkpoint.pth')])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert sum(trained_per_rank(resumed.stdout)) + position == 48  # the rest of the epoch, nothing twice


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_a_killed_validation_worker_cuts_validation_short_and_saves_the_complete_epoch(jpeg_dataset, tmp_path, loader):
    out = tmp_path / 'out'
    proc = start_process(['train.py', '--data-path', jpeg_dataset, *REAL, '--dl-worker-type', loader, '--epochs', '3',
                          '--num-train-steps', '2', '--output-dir', str(out)])
    read_until(proc, r'^Test:')
    kill_one_loader_worker(proc.pid, loaders=2, pick=max)
    log = finish(proc)
    assert proc.returncode == 1, log[-3000:]
    assert_clean(log)
    stopped = re.search(r"Stopped by a loader worker's death: saved epoch (\d) \(complete\) to \S+checkpoint.pth in", log)
    assert stopped, log[-3000:]
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == int(stopped.group(1))


# --- signals from shells and schedulers ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('signum, loader, status', [
    (signal.SIGHUP, 'MP', 129),    # the terminal or the ssh session that started it closed
    (signal.SIGINT, 'FAST', 130),  # Ctrl-C
    (signal.SIGUSR2, 'MP', 0),     # a scheduler's warning (LSF, PBS, SLURM --signal=USR2)
    (signal.SIGXCPU, 'FAST', 152),  # a CPU-time limit reached (ulimit -t, a batch queue's)
], ids=['SIGHUP', 'SIGINT', 'SIGUSR2', 'SIGXCPU'])
def test_a_shell_or_scheduler_signal_to_the_process_group_saves_with_an_exit_status_that_says_so(
        jpeg_dataset, tmp_path, signum, loader, status):
    """Before: SIGHUP, SIGUSR2 and SIGXCPU killed the trainer (SIGXCPU with a core dump) and SIGINT ended it with
    a KeyboardInterrupt traceback, nothing saved."""
    out = tmp_path / 'out'
    proc = start_process(['train.py', '--data-path', jpeg_dataset, *REAL, '--dl-worker-type', loader, '--epochs', '1',
                          '--save-checkpoint', '--num-eval-steps', '1', '--output-dir', str(out)])
    read_until(proc, r'^Epoch: \[0\]  \[ 5/12\]')
    os.killpg(proc.pid, signum)
    log = finish(proc)
    assert proc.returncode == status, log[-3000:]
    assert_clean(log)
    stopped = SIGNAL_STOP.search(log)
    assert stopped and stopped.group(1) == signal.Signals(signum).name, log[-3000:]
    step, position = int(stopped.group(3)), int(stopped.group(4))
    assert step < 11 and torch.load(out / 'checkpoint.pth', weights_only=True)['epoch_position'] == position


@pytest.mark.slow
def test_under_nohup_a_sighup_leaves_the_run_training_to_the_end(jpeg_dataset, tmp_path):
    """A signal the run was started with ignored stays ignored (`nohup` ignores SIGHUP): before, the trainer's
    handler took it over and a closed terminal stopped a nohup'd run (saved, exit 129)."""
    proc = start_process(['nohup', sys.executable, 'train.py', '--data-path', jpeg_dataset, *REAL,
                          '--dl-worker-type', 'MP', '--epochs', '1', '--num-eval-steps', '1',
                          '--output-dir', str(tmp_path / 'out')])
    read_until(proc, r'^Epoch: \[0\]  \[ 5/12\]')
    os.killpg(proc.pid, signal.SIGHUP)
    log = finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert 'Stopped by' not in log and 'SIGHUP' not in log and re.search(r'^Training time ', log, re.M)


@pytest.mark.slow
@pytest.mark.mpi
def test_a_job_suspended_for_30_s_and_continued_trains_on_to_the_end(jpeg_dataset, tmp_path):
    """SIGSTOP of every process of a 2-rank demo wrapper job (a scheduler's suspend, kill -STOP), SIGCONT 30 s
    later: longer than the peer watch's silence limit, which must not read the pause as a frozen rank."""
    proc = start_process(['demo_resnet.py', '--world-size', '2', '--device', 'cpu', '--model', 'resnet18',
                          '--batch-size', '4', '--workers', '2', '--print-freq', '2', '--dl-worker-type', 'MP',
                          '--epochs', '2', '--num-eval-steps', '1', '--data-path', jpeg_dataset,
                          '--output-dir', str(tmp_path / 'out')])
    read_until(proc, r'^Epoch: \[0\]  \[2/6\]')
    everyone = job_processes(proc.pid)
    for pid in everyone:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(30)
    for pid in everyone:
        os.kill(pid, signal.SIGCONT)
    log = finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert_clean(log)
    assert trained_per_rank(log) == [48, 48], log[-3000:]


# --- the output stream ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('script, loader', [('train.py', 'FAST'), ('main.py', 'MP')])
def test_a_closed_output_pipe_saves_and_the_stop_line_goes_to_stderr(jpeg_dataset, tmp_path, script, loader):
    """`python train.py ... | tee log` whose tee ends (killed, its terminal gone). Before: BrokenPipeError from the
    next log line, a traceback, nothing saved."""
    out = tmp_path / 'out'
    if script == 'train.py':
        flags = [*REAL, '--print-freq', '3', '--save-checkpoint']
    else:
        flags = ['--device', 'cpu', '--batch-size', '4', '--workers', '2', '--print-interval', '3', '--train-crop-size',
                 '16', '--val-resize-size', '18', '--val-crop-size', '16']
    args = [os.sys.executable, script, '--data-path', jpeg_dataset, *flags, '--dl-worker-type', loader, '--epochs', '1',
            '--output-dir', str(out)]
    proc = subprocess.Popen(args, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    read_until(proc, r'^Epoch: \[0\]\s*\[ ?3/12\]')
    proc.stdout.close()  # the reader is gone: the trainer's next line meets EPIPE
    errors = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, errors[-3000:]
    assert 'Traceback' not in errors, errors[-3000:]
    assert re.search(r'^error: its stdout is gone \(Broken pipe\): its lines go to stderr; stopping after this step '
                     r'and saving$', errors, flags=re.M), errors[-3000:]
    stopped = FAULT_STOP.search(errors)
    assert stopped and stopped.group(1) == 'the loss of its output stream', errors[-3000:]
    assert torch.load(stopped.group(7), weights_only=True)['epoch_position'] == int(stopped.group(5))


# --- the launcher -----------------------------------------------------------------------------------------------

def still_there(processes):
    """Those of {pid: start time} still running (a pid reused since does not count)."""
    alive = []
    for pid, started in processes.items():
        try:
            if started_at(pid) == started and status_of(pid) != 'Z':
                alive.append(pid)
        except (OSError, IndexError):
            pass
    return alive


def status_of(pid):
    with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()[0]


def snapshot(pids):
    found = {}
    for pid in pids:
        try:
            found[pid] = started_at(pid)
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.mpi
def test_kill_9_of_a_demo_wrapper_stops_its_job_which_saves_and_is_gone_within_30_s(jpeg_dataset, tmp_path):
    """Before: mpirun (in a process group of its own) and both ranks trained on, 15 s later and beyond."""
    out = tmp_path / 'out'
    proc = start_process(['demo_resnet.py', '--world-size', '2', '--device', 'cpu', '--model', 'resnet18',
                          '--batch-size', '4', '--workers', '2', '--print-freq', '2', '--dl-worker-type', 'FAST',
                          '--epochs', '20', '--num-eval-steps', '1', '--save-checkpoint', '--data-path', jpeg_dataset,
                          '--output-dir', str(out)])
    read_until(proc, r'^Epoch: \[1\]  \[2/6\]')
    job = snapshot(job_processes(proc.pid))
    assert len(job) >= 1 + 1 + 2 * (1 + 2), job
    killed = time.time()
    proc.kill()  # the wrapper alone
    log = finish(proc)  # the ranks' lines still come: mpirun writes to the wrapper's stdout, which it inherited
    assert proc.returncode == -signal.SIGKILL
    assert wait_for(lambda: not still_there(job), 30) and time.time() - killed < 30, still_there(job)
    assert_clean(log)
    stopped = re.search(r'Stopped by SIGUSR1: saved epoch (\d+) (after step \d+ \((\d+) samples|\(complete\))', log)
    assert stopped, log[-3000:]
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert saved['epoch'] == int(stopped.group(1))
    assert saved.get('epoch_position') == (int(stopped.group(3)) if stopped.group(3) else None)


@pytest.mark.slow
@pytest.mark.mpi
def test_kill_9_of_plain_mpirun_makes_the_ranks_save_and_end(jpeg_dataset, tmp_path):
    """mpirun is the ranks' parent and the reader of their output: both are gone at once. Before: each rank died of
    BrokenPipeError at its next log line (or trained on as an orphan that nobody stops), nothing saved."""
    out = tmp_path / 'out'
    flags = ['train.py', '--data-path', jpeg_dataset, *REAL, '--print-freq', '2', '--dl-worker-type', 'MP',
             '--epochs', '20', '--num-eval-steps', '1', '--output-dir', str(out)]
    proc = subprocess.Popen(mpirun_prefix(2) + flags, cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    read_until(proc, r'^Epoch: \[1\]  \[2/6\]')
    job = snapshot(job_processes(proc.pid))
    proc.kill()
    finish(proc)
    assert wait_for(lambda: not still_there(job), 30), still_there(job)
    saved = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert saved['epoch'] >= 1, saved['epoch']
    position = saved.get('epoch_position')
    if position is not None:  # mid-epoch: the rest of it, on 2 ranks again, trains each sample once
        resumed = run_script(mpirun_prefix(2) + flags[:-6] + ['--epochs', str(saved['epoch'] + 1), '--num-eval-steps',
                             '1', '--output-dir', str(out), '--resume', str(out / 'checkpoint.pth')])
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert sum(trained_per_rank(resumed.stdout)) + position == 48
