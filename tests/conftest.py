"""Shared fixtures: real JPEG folders written by sample_data.py, and helpers that run the scripts
as a user would (subprocesses, real mpirun)."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from classification import devices, output_folder  # noqa: E402
import sample_data  # noqa: E402

# Small crops keep CPU steps fast; the flags are the upstream (0.12+) names the trainer accepts.
TINY_IMAGES = ['--train-crop-size', '32', '--val-resize-size', '40', '--val-crop-size', '32']


@pytest.fixture(scope='session')
def jpeg_dataset(tmp_path_factory):
    """4 classes, 12 train and 5 val JPEGs each (small images)."""
    root = tmp_path_factory.mktemp('jpegs')
    sample_data.make_dataset(str(root), classes=4, train_per_class=12, val_per_class=5, seed=1)
    return str(root)


@pytest.fixture
def fresh_dataset(tmp_path):
    """A private copy-able dataset for tests that damage it."""
    def make(classes=3, train_per_class=6, val_per_class=3, seed=2):
        root = tmp_path / 'data'
        sample_data.make_dataset(str(root), classes, train_per_class, val_per_class, seed=seed)
        return str(root)
    return make


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def script_env(**extra):
    """Environment for a script under test: one thread per process (2 cores, up to 2 ranks)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', MASTER_PORT=str(free_port()),
               # Guard: should a test ever start a multi-host mpirun, its remote launch fails at once
               # instead of reaching out (tests never contact other hosts).
               OMPI_MCA_plm_rsh_agent='false')
    env.update({k: str(v) for k, v in extra.items()})
    return env


_current_test = [None]


@pytest.fixture(autouse=True)
def _note_current_test(request):
    _current_test[0] = request.node
    yield
    _current_test[0] = None


def require_slow_tier(cmd):
    """Keep the quick tier (-m "not slow") in-process: a test that starts a process must be marked slow, and one
    that starts mpirun (directly or through a demo wrapper with 2+ ranks) also mpi."""
    node = _current_test[0]
    if node is None:
        return
    words = [str(word) for word in cmd]
    if node.get_closest_marker('slow') is None:
        pytest.fail(f'{node.name} starts a process ({" ".join(words[:3])} ...): mark it @pytest.mark.slow')
    multi_rank = 'mpirun' in words or any(a == '--world-size' and b != '1' for a, b in zip(words, words[1:]))
    if multi_rank and node.get_closest_marker('mpi') is None:
        pytest.fail(f'{node.name} starts mpirun: mark it @pytest.mark.mpi as well')


def run_script(args, timeout=300, cwd=REPO, env=None):
    """Run `python <args>` (or a full command when args[0] is not a .py file) and capture output.

    The command gets its own process group, so a timeout ends everything it started (mpirun's ranks too).
    """
    require_slow_tier(args)
    cmd = [sys.executable] + list(args) if str(args[0]).endswith('.py') else list(args)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def start_process(args, **env):
    """Start `python <args>` (or a full command when args[0] is not a .py file) in a session of its own, as a
    batch system starts a job (its process group is its pid), with stdout and stderr merged into one pipe."""
    require_slow_tier(args)
    cmd = [sys.executable] + list(args) if str(args[0]).endswith('.py') else list(args)
    return subprocess.Popen(cmd, cwd=REPO, env=script_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def read_until(proc, pattern, timeout=240):
    """Read a started process's output until a line matches `pattern`; return what was read."""
    deadline, seen = time.time() + timeout, []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return ''.join(seen)
        assert time.time() < deadline, ''.join(seen[-30:])
    raise AssertionError(f'process ended before {pattern}:\n' + ''.join(seen[-40:]))


def descends_from(pid, ancestor):
    """Whether process `pid` is a child, grandchild, ... of `ancestor` (through /proc)."""
    while pid > 1:
        try:
            with open(f'/proc/{pid}/stat') as f:
                pid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError):
            return False
        if pid == ancestor:
            return True
    return False


def command_line(pid):
    """Process `pid`'s command line, its arguments joined by spaces ('' once it has ended)."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def catches_signal(pid, signum):
    """Whether process `pid` has a handler for `signum` (its SigCgt mask): False once it is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            mask = int(re.search(r'^SigCgt:\s*([0-9a-f]+)', f.read(), re.M).group(1), 16)
    except (OSError, AttributeError):
        return False
    return bool(mask & (1 << (signum - 1)))


def job_processes(root_pid):
    """`root_pid` and every process below it: what a scheduler's cgroup holds (mpirun, ranks, forkservers, loader
    workers)."""
    return [root_pid] + [int(pid) for pid in filter(str.isdigit, os.listdir('/proc')) if descends_from(int(pid), root_pid)]


def run_in_process(script_module, argv):
    """`python <script> argv` run inside the test process, as its `__main__` block runs it (argument
    parsing, then cli.run_cli): returns the exit status (0 when main returns). Use capsys for the output.
    The environment and the stop-signal handlers the trainer installs are restored afterwards."""
    from classification import cli, recipe_flags, stopping
    environ = dict(os.environ)
    streams = sys.stdout, sys.stderr
    handlers = {signum: signal.getsignal(signum) for signum in cli.STOP_SIGNALS}
    try:
        return cli.run_cli(script_module.main, recipe_flags.parse_args(script_module.get_args_parser(), argv)) or 0
    except SystemExit as exit_:
        return exit_.code
    finally:
        output_folder.release_all()  # what the end of the process does
        stopping.forget()
        sys.stdout, sys.stderr = streams  # faults.guard_output's wrappers go        os.environ.clear()
        os.environ.update(environ)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.fixture
def stop_handlers():
    """For tests that install the trainers' stop-signal handlers themselves: pytest's come back afterwards."""
    from classification import cli
    saved = {signum: signal.getsignal(signum) for signum in cli.STOP_SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def require_dali():
    """Skip a test of --dl-worker-type DALI where DALI is not installed; on CI (CI=true), where .ci/run installs
    it, fail instead."""
    from classification import dali
    try:
        dali.import_dali()
    except Exception as err:
        if os.environ.get('CI', '').lower() == 'true':
            pytest.fail(f'DALI must be installed on CI (.ci/run installs {dali.PACKAGE}): {err}')
        pytest.skip(f'{dali.PACKAGE} is not installed')


def mpirun_prefix(n):
    """A real OpenMPI launch of n ranks on this machine (oversubscribed: CI has 2 cores)."""
    if shutil.which('mpirun') is None:
        pytest.fail('mpirun not found: install openmpi-bin (see .ci/run)')
    return ['mpirun', '-np', str(n), '--allow-run-as-root', '--oversubscribe', '--bind-to', 'none',
            '-x', 'OMP_NUM_THREADS', '-x', 'MASTER_PORT', '-x', 'PYTHONUNBUFFERED', sys.executable]


# The Habana SDK cannot be installed off Gaudi: tests drive the HPU path through a recording double.
FAKE_SDK = os.path.join(REPO, 'tests', 'fake_habana')


@pytest.fixture
def sdk(monkeypatch):
    """Put the double on sys.path, give it a fresh call record, and restore env/modules afterwards."""
    monkeypatch.syspath_prepend(FAKE_SDK)
    for name in ('PT_HPU_LAZY_MODE', 'ID', 'LOCAL_RANK', 'MAX_WAIT_ATTEMPTS', 'HCL_CPU_AFFINITY',
                 'PT_HPU_ENABLE_SYNC_OUTPUT_HOST'):
        monkeypatch.delenv(name, raising=False)
    for name in [m for m in sys.modules if m.startswith('habana_frameworks')]:
        monkeypatch.delitem(sys.modules, name)
    import habana_frameworks
    habana_frameworks.CALLS.clear()
    habana_frameworks.WEIGHT_PERMUTE_PASS[0] = False
    yield habana_frameworks
    for name in [m for m in sys.modules if m.startswith('habana_frameworks')]:
        del sys.modules[name]


class HPUDeviceOnCPU(devices.HPUDevice):
    """The real HPU device logic, with tensors kept on the CPU (no Gaudi here to hold them)."""

    @property
    def torch_device(self):
        return torch.device('cpu')
