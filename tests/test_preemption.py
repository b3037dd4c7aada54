"""Preemption: a stop signal saves within two steps and a resume continues at the same place, under the
conditions of real runs (loader workers, print-freq above 1, both loaders, 2 ranks through the demo wrapper
and through plain mpirun, resume with another world size or batch size). docs/guarantees.md."""
import os
import re
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from conftest import (REPO, TINY_IMAGES, job_processes, mpirun_prefix, read_until, require_dali, run_script, script_env,
                      start_process)

from classification import cli, samplers, stopping, training

# 4 classes x 12 train images: 12 steps of 4 on one rank, 6 per rank on two.
REAL = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '5',
        *TINY_IMAGES]
STOPPED = re.compile(r'Stopped by (SIG\w+): saved epoch (\d+) after step (\d+) \((\d+) samples, signal seen at '
                     r'step (\d+)\) to (\S+) in [\d.]+ s \([\d.]+ s after the signal\); continue with --resume')


# --- the epoch position (in-process) --------------------------------------------------------------

def shards(world_size, dataset_len, epoch, start=0, seed=3):
    ranks = [samplers.TrainSampler(dataset_len, world_size, rank, seed) for rank in range(world_size)]
    for sampler in ranks:
        sampler.set_epoch(epoch, start)
    return ranks


def trained(ranks, batch_size, batches=None):
    """The samples each rank trains on in `batches` steps (all of the epoch when None)."""
    result = []
    for sampler in ranks:
        steps = list(samplers.TrainBatchSampler(sampler, batch_size))
        result += [i for batch in steps[:batches] for i in batch]
    return result


@pytest.mark.parametrize('before, after', [((2, 4), (2, 4)), ((2, 4), (1, 3)), ((1, 5), (2, 2)), ((3, 2), (2, 7))])
def test_a_mid_epoch_position_continues_the_same_epoch_order_with_any_world_or_batch_size(before, after):
    (world, batch), (new_world, new_batch) = before, after
    length, epoch = 53, 4
    order = samplers.TrainSampler(length, 1, 0, 3)
    order.set_epoch(epoch)
    order = order.epoch_order()
    ranks = shards(world, length, epoch)
    done = trained(ranks, batch, batches=2)
    position = ranks[0].position_after(2, batch)
    assert position == 2 * batch * world and sorted(done) == sorted(order[:position])

    rest = trained(shards(new_world, length, epoch, position), new_batch)
    assert not set(done) & set(order[position:])
    assert len(set(order[position:]) - set(rest)) <= new_world  # at most a lone trailing sample per rank left out
    assert set(rest) <= set(order[position:]) | set(order[:new_world])  # repeats only as padding


def test_the_same_settings_resume_exactly_where_the_uninterrupted_epoch_goes():
    straight = [list(samplers.TrainBatchSampler(s, 4)) for s in shards(2, 50, 1)]
    position = shards(2, 50, 1)[0].position_after(3, 4)
    resumed = [list(samplers.TrainBatchSampler(s, 4)) for s in shards(2, 50, 1, position)]
    assert [s[3:] for s in straight] == resumed


def test_a_stop_on_the_last_step_or_an_empty_rest_ends_the_epoch_and_the_next_one_trains_in_full():
    sampler = samplers.TrainSampler(48, 2, 0, 3)
    sampler.set_epoch(0)
    assert sampler.position_after(6, 4) == 48  # 6 steps = the whole epoch: nothing is left of it
    for position in (48, 47):  # 47: one sample per rank would be left, a lone-sample batch is never trained
        sampler.set_epoch(0, position)
        assert len(samplers.TrainBatchSampler(sampler, 4)) == 0
    sampler.set_epoch(1)  # the next epoch is whole again (the old sampler kept its skip until iterated)
    assert len(samplers.TrainBatchSampler(sampler, 4)) == 6 and len(list(samplers.TrainBatchSampler(sampler, 4))) == 6


def test_checkpoints_of_the_first_format_resume_from_their_step_number():
    old = {'epoch': 3, 'next_step': 5, 'args': {'batch_size': 32, 'world_size': 8}}
    assert training.resume_position(old) == (3, 5 * 32 * 8)
    assert training.resume_position({'epoch': 3, 'epoch_position': 700}) == (3, 700)
    assert training.resume_position({'epoch': 3}) == (4, 0)


@pytest.mark.parametrize('signum', cli.STOP_SIGNALS)
def test_a_single_process_stops_after_the_step_the_signal_arrived_in_and_repeats_do_not_kill(stop_handlers, signum):
    stop = stopping.GracefulStop()
    assert not stop.after_step(0)
    os.kill(os.getpid(), signum)
    if signum == signal.SIGINT:  # a second Ctrl-C stops at once, without saving
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
    else:
        os.kill(os.getpid(), signum)  # a scheduler and mpirun both sending one: still alive, still saving
    assert stop.after_step(1) and stop.seen_at_step == 1 and stop.signal_name == signal.Signals(signum).name
    assert stop.exit_status == (0 if signum in cli.CLEAN_STOP_SIGNALS else 128 + signum)
    stopping.forget()


# --- real runs (subprocesses) ---------------------------------------------------------------------

def finish(proc, timeout=180):
    try:
        rest = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rest


def assert_clean(log):
    assert 'Traceback' not in log and 'exited unexpectedly' not in log, log[-3000:]


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST', 'DALI'])
def test_sigterm_to_the_process_group_mid_epoch_saves_at_once_and_the_resume_ends_with_the_same_weights(
        jpeg_dataset, tmp_path, loader):
    if loader == 'DALI':
        require_dali()
    common = ['--data-path', jpeg_dataset, *REAL, '--dl-worker-type', loader, '--epochs', '1', '--deterministic',
              '--save-checkpoint', '--num-eval-steps', '1']
    straight = run_script(['train.py', *common, '--output-dir', str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]

    proc = start_process(['train.py', *common, '--output-dir', str(tmp_path / 'cut')])
    read_until(proc, r'^Epoch: \[0\]  \[ 5/12\]')
    os.killpg(proc.pid, signal.SIGTERM)  # the trainer, its forkserver and loader workers, as clusters do
    log = finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert_clean(log)
    stopped = STOPPED.search(log)
    assert stopped, log[-3000:]
    name, epoch, step, position, seen, path = stopped.groups()
    assert name == 'SIGTERM' and epoch == '0' and int(step) == int(seen) < 11  # at once: the step it arrived in
    assert torch.load(path, weights_only=True)['epoch_position'] == int(position) == (int(step) + 1) * 4

    resumed = run_script(['train.py', *common, '--output-dir', str(tmp_path / 'cut'), '--resume', path])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f'Resuming epoch 0 at step {int(step) + 1} ({position} of its 48 samples trained)' in resumed.stdout
    straight_model, resumed_model = weights(tmp_path / 'straight' / 'model_0.pth'), weights(tmp_path / 'cut' / 'model_0.pth')
    assert all(torch.equal(straight_model[k], resumed_model[k]) for k in straight_model)


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST', 'DALI'])
def test_sigterm_to_the_process_group_during_validation_saves_the_complete_epoch(jpeg_dataset, tmp_path, loader):
    """The original bug: the loader's forkserver died of the group's SIGTERM and took the workers with it. DALI
    decodes in threads of the trainer: no helper process there."""
    if loader == 'DALI':
        require_dali()
    out = tmp_path / 'out'
    proc = start_process(['train.py', '--data-path', jpeg_dataset, *REAL, '--dl-worker-type', loader, '--epochs', '3',
                  '--num-train-steps', '2', '--output-dir', str(out)])
    read_until(proc, r'^Test:')
    helpers = [pid for pid in group_members(proc.pid) if pid != proc.pid]
    if loader == 'DALI':
        assert not helpers, helpers  # its decoding threads are the trainer's own
    else:
        assert len(helpers) >= 4, helpers  # a forkserver (FAST and MP alike), 2 + 2 workers, the resource tracker
    assert all(deaf_to_stop_signals(pid) for pid in helpers), [status_line(pid, 'Name') for pid in helpers]
    os.killpg(proc.pid, signal.SIGTERM)
    log = finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert_clean(log)
    assert re.search(r'Stopped by SIGTERM: saved epoch 0 \(complete\) to \S+checkpoint.pth in', log), log[-3000:]
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_a_kill_9_of_the_trainer_leaves_no_loader_process_behind(jpeg_dataset, tmp_path, loader):
    """Before: the forkserver and the persistent workers (deaf to stop signals) lived on for good."""
    proc = start_process(['train.py', '--data-path', jpeg_dataset, *REAL, '--dl-worker-type', loader, '--epochs', '3',
                          '--output-dir', str(tmp_path / 'out')])
    read_until(proc, r'^Epoch: \[0\]  \[ 5/12\]')
    helpers = [pid for pid in group_members(proc.pid) if pid != proc.pid]
    assert len(helpers) >= 4, helpers  # forkserver, 2 + 2 persistent workers (train, val not started yet: 2)
    os.kill(proc.pid, signal.SIGKILL)  # the trainer alone, as the OOM killer or a crashed node's agent does
    proc.communicate(timeout=30)
    deadline = time.time() + 20
    while group_members(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    left = [(pid, status_line(pid, 'Name')) for pid in group_members(proc.pid)]
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, left


def group_members(pgid):
    members = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            if os.getpgid(int(pid)) == pgid:
                members.append(int(pid))
        except ProcessLookupError:
            pass
    return members


def status_line(pid, field):
    with open(f'/proc/{pid}/status') as f:
        return next(line.split(':', 1)[1].strip() for line in f if line.startswith(field + ':'))


def deaf_to_stop_signals(pid):
    """Whether the process blocks or ignores every stop signal (so a signal to its group cannot end it)."""
    deaf = int(status_line(pid, 'SigBlk'), 16) | int(status_line(pid, 'SigIgn'), 16)
    return all(deaf >> (signum - 1) & 1 for signum in cli.STOP_SIGNALS)


def trained_per_rank(log):
    return sorted(int(n) for n in re.findall(r'^\| rank \d: trained on (\d+) images', log, flags=re.M))


@pytest.mark.slow
@pytest.mark.mpi
def test_sigterm_to_the_demo_wrappers_group_on_two_ranks_saves_and_one_rank_resumes_with_another_batch_size(
        jpeg_dataset, tmp_path):
    out = tmp_path / 'out'
    proc = start_process(['demo_resnet.py', '--world-size', '2', '--device', 'cpu', '--model', 'resnet18', '--batch-size', '4',
                  '--workers', '2', '--print-freq', '5', '--dl-worker-type', 'FAST', '--epochs', '2',
                  '--num-eval-steps', '1', '--deterministic', '--data-path', jpeg_dataset, '--output-dir', str(out)])
    read_until(proc, r'^Epoch: \[1\]  \[0/6\]')
    os.killpg(proc.pid, signal.SIGTERM)  # the wrapper's whole group, as a scheduler sends it
    log = finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert_clean(log)
    stopped = STOPPED.search(log)
    assert stopped and stopped.group(2) == '1', log[-3000:]
    step, position, seen = int(stopped.group(3)), int(stopped.group(4)), int(stopped.group(5))
    assert step - seen <= 1 and position == (step + 1) * 4 * 2  # within two steps, whatever --print-freq

    resumed = run_script(['train.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--model', 'resnet18',
                          '--batch-size', '3', '--workers', '2', '--print-freq', '5', '--dl-worker-type', 'MP',
                          '--epochs', '3', '--num-eval-steps', '1', '--output-dir', str(out), '--resume',
                          stopped.group(6)])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rest = -(-(48 - position) // 3) - ((48 - position) % 3 == 1)  # batches of 3; a lone last sample is left out
    assert f'Resuming epoch 1 at step {position // 3} ({position} of its 48 samples trained)' in resumed.stdout
    assert re.search(rf'^Epoch: \[1\]  \[ ?0/{rest}\]', resumed.stdout, flags=re.M), resumed.stdout[-3000:]
    assert re.search(r'^Epoch: \[2\]  \[ 0/16\]', resumed.stdout, flags=re.M)  # then all of epoch 2


@pytest.mark.slow
@pytest.mark.mpi
def test_sigusr1_to_plain_mpirun_saves_and_a_resume_with_other_settings_trains_the_rest(jpeg_dataset, tmp_path):
    """The issue's case: a stop early in an epoch, then a resume with more epochs and another batch size; before,
    every rank trained on 0 images and said nothing. mpirun forwards SIGUSR1 to the ranks without killing them."""
    out = tmp_path / 'out'
    args = ['train.py', '--data-path', jpeg_dataset, *REAL, '--dl-worker-type', 'MP', '--num-eval-steps', '1',
            '--output-dir', str(out)]
    proc = subprocess.Popen(mpirun_prefix(2) + args + ['--epochs', '2'], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = read_until(proc, r'^Epoch: \[0\]  \[0/6\]')
    proc.send_signal(signal.SIGUSR1)  # mpirun alone
    log += finish(proc)
    assert log.count('| note: a SIGTERM to mpirun leaves the ranks 1 s') == 1, log[:3000]  # rank 0, at start
    assert proc.returncode == 0, log[-3000:]
    assert_clean(log)
    stopped = STOPPED.search(log)
    assert stopped and stopped.group(1) == 'SIGUSR1' and stopped.group(2) == '0', log[-3000:]
    assert int(stopped.group(3)) - int(stopped.group(5)) <= 1  # within two steps of the signal, print-freq 5
    position = int(stopped.group(4))

    resumed = run_script(mpirun_prefix(2) + args + ['--epochs', '3', '--batch-size', '3', '--resume', stopped.group(6)])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rest_per_rank = -(-(48 - position) // 2)
    rest_per_rank -= rest_per_rank % 3 == 1  # a trailing single sample is left out
    assert trained_per_rank(resumed.stdout) == [rest_per_rank + 2 * 24] * 2, resumed.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.mpi
def test_sigterm_to_plain_mpirun_with_a_kill_grace_saves_and_the_resume_on_one_rank_trains_the_rest(
        jpeg_dataset, tmp_path):
    """mpirun's kill sequence is SIGCONT, SIGTERM, SIGKILL, odls_base_sigkill_timeout apart; given a grace (here 5 s)
    the ranks save between its SIGTERM and its SIGKILL, and the run's log carries no note about the 1 s default."""
    out = tmp_path / 'out'
    args = ['train.py', '--data-path', jpeg_dataset, *REAL, '--print-freq', '2', '--dl-worker-type', 'FAST', '--num-eval-steps', '1', '--output-dir', str(out)]
    launch = mpirun_prefix(2)
    launch[1:1] = ['--mca', 'odls_base_sigkill_timeout', '5']
    proc = subprocess.Popen(launch + args + ['--epochs', '20'], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = read_until(proc, r'^Epoch: \[1\]  \[2/6\]')
    proc.send_signal(signal.SIGTERM)  # mpirun alone: SIGCONT now, SIGTERM in 5 s, SIGKILL in 10 s
    # mpirun forwards each rank's stdout and stderr apart: a rank's stderr line can land inside rank 0's stop line
    log = re.sub(r'SIGTERM received: stopping after this step \(ranks agree within two steps\) and saving a '
                 r'checkpoint\n', '', log + finish(proc))
    assert_clean(log)
    assert 'note: a SIGTERM to mpirun' not in log
    stopped = re.search(r'Stopped by SIGTERM: saved epoch (\d+) (after step \d+ .*?|\(complete\) )to (\S+) in', log)
    assert stopped, log[-3000:]
    epoch, mid_epoch, path = int(stopped.group(1)), stopped.group(2).startswith('after'), stopped.group(3)
    resumed = run_script(['train.py', *args[1:], '--epochs', str(epoch + 2), '--batch-size', '8', '--resume', path])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert (f'Resuming epoch {epoch} at step' in resumed.stdout) == mid_epoch, resumed.stdout[-2000:]
    assert re.search(rf'^Epoch: \[{epoch + 1}\]  \[0/6\]', resumed.stdout, flags=re.M), resumed.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.mpi
def test_sigterm_to_every_process_of_a_demo_wrapper_job_at_once_saves(jpeg_dataset, tmp_path):
    """As SLURM's scancel or a cgroup kill: the wrapper, mpirun, both ranks, their forkservers and loader workers get
    SIGTERM together. The ranks save on their own SIGTERM; mpirun's kill sequence (SIGCONT, SIGTERM, SIGKILL, the
    wrapper's 5 s apart) leaves them the time; the loader workers ignore it."""
    out = tmp_path / 'out'
    proc = start_process(['demo_resnet.py', '--world-size', '2', '--device', 'cpu', '--model', 'resnet18',
                          '--batch-size', '4', '--workers', '2', '--print-freq', '2', '--dl-worker-type', 'MP',
                          '--epochs', '20', '--num-eval-steps', '1', '--data-path', jpeg_dataset,
                          '--output-dir', str(out)])
    read_until(proc, r'^Epoch: \[1\]  \[2/6\]')
    everyone = job_processes(proc.pid)
    assert len(everyone) >= 1 + 1 + 2 * (1 + 2), everyone  # wrapper, mpirun, 2 x (rank, 2 workers) at least
    for pid in everyone:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    log = finish(proc)
    assert_clean(log)
    stopped = re.search(r'Stopped by SIG(TERM|USR1): saved epoch (\d+) (after step \d+|\(complete\))', log)
    assert stopped, log[-3000:]
    saved = torch.load(out / 'checkpoint.pth', map_location='cpu', weights_only=True)
    assert saved['epoch'] == int(stopped.group(2))


class RecordingCollectives:
    """torch.distributed as GracefulStop uses it, recording each all-reduce and each wait."""

    def __init__(self):
        self.calls = []
        self.ReduceOp = dist.ReduceOp

    def new_group(self, backend, timeout):
        return 'stop-flag group'

    def all_reduce(self, flag, op, group, async_op=False):
        self.calls.append(('all_reduce', async_op))
        calls = self.calls

        class Work:
            def wait(self):
                calls.append(('wait', None))
        return Work()


def test_ranks_agree_on_a_stop_without_a_blocking_collective_per_step(monkeypatch, stop_handlers):
    """Each step starts a non-blocking all-reduce of the stop flag and waits for the previous step's, which had a
    whole step to arrive: no step waits for the collective it started, and only the epoch's end blocks."""
    fake = RecordingCollectives()
    monkeypatch.setattr(stopping, 'dist', fake)
    stop = stopping.GracefulStop(distributed=True, timeout_s=10)
    assert stop.after_step(0) is False and fake.calls == [('all_reduce', True)]
    assert stop.after_step(1) is False and fake.calls[1:] == [('wait', None), ('all_reduce', True)]
    stop.at_epoch_end()
    assert fake.calls[3:] == [('wait', None), ('all_reduce', False)]  # where the loop waits anyway
