"""What around a healthy trainer can fail, and how each failure becomes a stop that saves what was trained.

A loader worker killed (the out-of-memory killer), the launcher gone (mpirun or its daemon killed), the
output stream closed (a pipe's reader or the terminal gone): the trainer's own state is fine, so none of
these may end the run before it saves. Each asks the run's stop (stopping.GracefulStop) to stop after the
step, as a SIGTERM does, with its own cause, so that the ranks agree on the step and rank 0 saves it; the run
then exits non-zero with one line naming the cause. The other way round, a launcher (a demo wrapper) that
dies takes its job with it: `die_with_parent` ties a child's life to it.
"""
import ctypes
import errno
import os
import select
import signal
import sys
import threading

from . import stopping

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(signum, parent_pid):
    """A subprocess.Popen preexec_fn: this child gets `signum` when its parent (`parent_pid`, the thread that
    forked it) ends, however it ends (kill -9 included). Linux only; elsewhere nothing happens."""
    def arm():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent_pid:  # the parent ended before the request was in place
            os.kill(os.getpid(), signum)
    return arm


# --- Loader workers -----------------------------------------------------------------------------------------------

# What a worker's death by a signal most likely means, and what to do about it.
WORKER_DEATHS = {
    signal.SIGKILL: ('most likely the out-of-memory killer (see dmesg)',
                     'lower --workers ({workers}) or --batch-size, or give the job more memory'),
    signal.SIGBUS: ('most likely a full /dev/shm, where workers hand batches over',
                    'give it more room (docker run --shm-size, a memory-backed emptyDir on Kubernetes) or lower '
                    '--workers ({workers})'),
    signal.SIGSEGV: ('a crash in native code (an image decoder or a library)', 'check the library versions'),
}


def ignore_torchs_worker_sigchld():
    """torch's DataLoader raises a dead worker's error from a SIGCHLD handler, in the middle of whatever the
    trainer is doing (a step, a save), where nothing can be saved; without it the loss is found where the
    trainer waits for the worker's batch (within torch's 5 s status check), which `surviving_worker_loss`
    turns into a stop. (Forkserver workers are not the trainer's children; spawned ones, Gaudi's, are.)"""
    from torch.utils.data._utils import signal_handling
    signal_handling._SIGCHLD_handler_set = True


def dead_workers(iterator):
    """(worker id, pid, exit code) of each worker of a DataLoader iterator that has ended."""
    ended = []
    for worker_id, worker in enumerate(getattr(iterator, '_workers', None) or []):
        if worker.exitcode is not None:
            ended.append((worker_id, worker.pid, worker.exitcode))
    return ended


def wait_for_dead_workers(iterator, timeout_s=5.0):
    """dead_workers, given a moment: a worker's death can break the hand-over of a batch it queued before its
    exit status is known."""
    import time
    deadline = time.monotonic() + timeout_s
    while not (dead := dead_workers(iterator)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return dead


def worker_loss_line(dead, workers):
    """One line naming the dead worker, how it died and what to lower."""
    worker_id, pid, code = dead[0]
    if code < 0:
        signum = -code
        how = f'was killed by signal {signum} ({signal.Signals(signum).name})'
        cause, advice = WORKER_DEATHS.get(signum, ('', ''))
        how += f', {cause}' if cause else ''
        advice = advice.format(workers=workers)
    else:
        how, advice = f'exited with status {code}', ''
    others = f' (and {len(dead) - 1} more)' if len(dead) > 1 else ''
    return f'loader worker {worker_id} (pid {pid}){others} {how}' + (f': {advice}' if advice else '')


def surviving_worker_loss(loader, start_iterator):
    """The batches of `loader` (a DataLoader with workers) as `start_iterator()` yields them; when one of its
    workers dies, one line saying so, a stop request (the run stops after this step and saves, ranks agreeing
    within two steps), and the rest of the epoch's batches loaded in this process (the steps the ranks need
    to agree in; the run's random state is left as it was). A death is seen at the step after it (each step
    looks), or where the trainer waits for the dead worker's batch (torch's check, within 5 s)."""
    done, iterator = 0, None
    try:
        iterator = start_iterator()  # persistent workers: resuming them is where a death between epochs shows
        for batch in iterator:
            done += 1
            yield batch
            if dead := dead_workers(iterator):
                break
        else:
            return
    except (RuntimeError, EOFError, ConnectionError) as err:  # the last two: a batch the dead worker had queued
        dead = wait_for_dead_workers(iterator or getattr(loader, '_iterator', None))
        if not dead:
            raise err
    stopping_now = stopping.request(stopping.Fault.LOADER_WORKER)
    then = ('Stopping after this step and saving' if stopping_now else 'Going on') + \
        "; the rest of this epoch's batches load in the trainer's process"
    _say(f'error: {stopping.rank_prefix()}{worker_loss_line(dead, loader.num_workers)}. {then}')
    drop_workers(loader)
    yield from in_process_batches(loader, done)


def drop_workers(loader):
    """End a loader's (persistent) workers after one died, so that a later epoch starts new ones."""
    iterator = getattr(loader, '_iterator', None)
    if iterator is not None and hasattr(iterator, '_shutdown_workers'):
        iterator._shutdown_workers()
    loader._iterator = None


def in_process_batches(loader, skip):
    """The batches of `loader`'s current epoch after the first `skip`, loaded in this process; the global
    random state (which a mid-epoch checkpoint saves) is left untouched by the transforms."""
    import itertools
    import random
    import torch
    keys = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    for key in itertools.islice(iter(keys), skip, None):
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            items = [loader.dataset[i] for i in key] if loader.batch_sampler is not None else loader.dataset[key]
            batch = loader.collate_fn(items)
        random.setstate(python_state)
        yield batch


# --- The launcher and the output streams ----------------------------------------------------------------------------

def watch_surroundings(launched):
    """From the start of training: the output streams guarded (guard_output) and, in a rank started by a
    launcher (`launched`: mpirun, its daemon, torchrun, srun), the launcher watched (watch_launcher)."""
    guard_output()
    if launched:
        watch_launcher(os.getppid())


def watch_launcher(parent_pid):
    """When the launcher that started this rank ends (mpirun killed -9, its daemon gone), the ranks stop
    after the step they agree on and save, instead of training on as orphans nobody can stop. Only for
    launched ranks: a plain run whose shell exits (nohup) trains on."""
    if parent_pid <= 1:
        return
    try:
        launcher = os.pidfd_open(parent_pid)
        with open(f'/proc/{parent_pid}/comm') as f:
            name = f.read().strip()
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3) or the launcher is gone already
        return

    def wait_for_launcher():
        select.select([launcher], [], [])
        if stopping.request(stopping.Fault.LAUNCHER):
            _say(f'error: {stopping.rank_prefix()}its launcher {name} (pid {parent_pid}) ended: stopping after this '
                 'step and saving')
    threading.Thread(target=wait_for_launcher, name='launcher-watch', daemon=True).start()


LOST_OUTPUT_ERRORS = (errno.EPIPE, errno.EIO, errno.ECONNRESET, errno.ENOSPC, errno.EDQUOT)


class GuardedStream:
    """sys.stdout or sys.stderr, where a write that fails because the stream is gone (its pipe's reader, e.g.
    tee or mpirun, ended; the terminal closed; the disk of a redirected log filled up) asks the run to stop
    after this step and save, instead of raising in the middle of it; the stream then writes to /dev/null."""

    def __init__(self, stream, name):
        self._stream, self._name, self._lost, self._redirected = stream, name, False, False

    def write(self, text):
        if not self._lost:
            try:
                return self._stream.write(text)
            except OSError as err:
                self._lose(err)
        return len(text)

    def flush(self):
        if not self._lost:
            try:
                self._stream.flush()
            except OSError as err:
                self._lose(err)

    def _lose(self, err):
        if err.errno not in LOST_OUTPUT_ERRORS:
            raise err
        fallback = self._fallback()
        self._lost, self._redirected = fallback is None, True
        try:
            target = os.open(os.devnull, os.O_WRONLY) if fallback is None else os.dup(fallback)
            os.dup2(target, self._stream.fileno())  # the stream's buffer and native writers go there too
            os.close(target)
        except (OSError, ValueError):
            self._lost = True
        if not stopping.request(stopping.Fault.OUTPUT):
            raise err  # not training: as before, e.g. `--print-schedule | head`
        where = ': its lines go to stderr' if fallback is not None else ''
        _say(f'error: {stopping.rank_prefix()}its {self._name} is gone ({os.strerror(err.errno)}){where}; stopping '
             'after this step and saving', stream=sys.stdout if self._name == 'stderr' else sys.stderr)

    def _fallback(self):
        """For a lost stdout, stderr's file descriptor where stderr goes somewhere else (a terminal, a log file):
        the run's later lines, its stop line among them, go there. None for stderr, a second loss, or one file."""
        if self._name != 'stdout' or self._redirected:
            return None
        try:
            out, err = os.fstat(self._stream.fileno()), os.fstat(sys.__stderr__.fileno())
        except (OSError, ValueError, AttributeError):
            return None
        return None if (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino) else sys.__stderr__.fileno()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_output():
    for name in ('stdout', 'stderr'):
        stream = getattr(sys, name)
        if not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream, name))


def _say(line, stream=None):
    """A line on stderr (or `stream`), from any thread; nothing when it is gone."""
    stream = stream or sys.stderr
    try:
        stream.write(line + '\n')
        stream.flush()
    except OSError:
        pass
