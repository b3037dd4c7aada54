"""Shared fixtures: real JPEG folders written by sample_data.py, and helpers that run the scripts
as a user would (subprocesses, real mpirun)."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

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
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', MASTER_PORT=str(free_port()))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(args, timeout=300, cwd=REPO, env=None):
    """Run `python <args>` (or a full command when args[0] is not a .py file) and capture output."""
    cmd = [sys.executable] + list(args) if str(args[0]).endswith('.py') else list(args)
    return subprocess.run(cmd, cwd=cwd, env=env or script_env(), capture_output=True, text=True,
                          timeout=timeout)


def mpirun_prefix(n):
    """A real OpenMPI launch of n ranks on this machine (oversubscribed: CI has 2 cores)."""
    if shutil.which('mpirun') is None:
        pytest.fail('mpirun not found: install openmpi-bin (see .ci/run)')
    return ['mpirun', '-np', str(n), '--allow-run-as-root', '--oversubscribe', '--bind-to', 'none',
            '-x', 'OMP_NUM_THREADS', '-x', 'MASTER_PORT', '-x', 'PYTHONUNBUFFERED', sys.executable]
