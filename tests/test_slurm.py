"""SLURM for real: a one-node cluster of Debian's slurmctld, slurmd and munge started here, and the trainers run
through it as a cluster's users run them: srun and sbatch launches, scancel, a stop signal at any moment of
start-up, the job script of docs/slurm.md requeued after a stop, the demo wrapper inside an allocation.
Tier: -m slurm (also slow); it needs root (slurmd starts the tasks).

The cluster lives in a temporary folder: its own munge key and socket, a slurm.conf with free ports, state,
spool and logs there; every command gets SLURM_CONF. ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
need no cgroups, so it starts in a container too.
"""
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

from conftest import REPO, TINY_IMAGES, catches_signal, free_port, script_env

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

# .ci/run sets this: there the cluster must start, a refusal is a failure instead of a skip.
REQUIRED_VARIABLE = 'SLURM_TESTS_REQUIRED'
DAEMONS = ('munged', 'slurmctld', 'slurmd')
CLIENTS = ('srun', 'sbatch', 'scancel', 'scontrol', 'squeue', 'sinfo')
WAIT_S = 30
DOC = os.path.join(REPO, 'docs', 'slurm.md')
RESNET = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '2',
          '--deterministic', *TINY_IMAGES]
GOOGLENET = ['--device', 'cpu', '--batch-size', '4', '--workers', '2', '--print-interval', '2', '--epochs', '1',
             '--train-crop-size', '64', '--val-resize-size', '72', '--val-crop-size', '64']
FINAL_STATES = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'PREEMPTED', 'OUT_OF_MEMORY',
                'BOOT_FAIL', 'DEADLINE')
STOPPED = re.compile(r'Stopped by (SIG\w+): saved epoch (\d+) after step (\d+) ')


def refuse(reason):
    if os.environ.get(REQUIRED_VARIABLE):
        pytest.fail(f'{reason} ({REQUIRED_VARIABLE} is set: the SLURM tests must run here)')
    pytest.skip(reason)


class Cluster:
    """munged, slurmctld and slurmd of a one-node cluster, in `folder`."""

    def __init__(self, folder):
        self.folder = folder
        self.conf = os.path.join(folder, 'slurm.conf')
        self.socket = os.path.join(folder, 'munge', 'munge.socket')
        self.daemons = []
        self.node = socket.gethostname().split('.')[0]
        self.bin = os.path.join(folder, 'bin')  # `python` here is the interpreter running the tests

    def env(self, **extra):
        env = script_env(SLURM_CONF=self.conf, **extra)
        env['PATH'] = self.bin + os.pathsep + env.get('PATH', '')
        for name in [n for n in env if n.startswith(('SLURM_', 'SBATCH_', 'SRUN_')) and n != 'SLURM_CONF']:
            del env[name]  # nothing of an allocation this test might run in
        return env

    def start(self):
        for sub in ('munge', 'state', 'spool', 'log', 'bin'):
            os.makedirs(os.path.join(self.folder, sub), mode=0o700, exist_ok=True)
        os.symlink(sys.executable, os.path.join(self.bin, 'python'))
        key = os.path.join(self.folder, 'munge', 'munge.key')
        with open(key, 'wb') as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        self.write_conf()
        munge = os.path.join(self.folder, 'munge')
        self.daemon(['munged', '--foreground', '--force', f'--socket={self.socket}', f'--key-file={key}',
                     f'--pid-file={munge}/munged.pid', f'--log-file={munge}/munged.log',
                     f'--seed-file={munge}/munged.seed'], 'munged')
        self.wait_for(lambda: os.path.exists(self.socket), 'munged to open its socket')
        self.daemon(['slurmctld', '-D', '-i', '-f', self.conf], 'slurmctld')
        self.daemon(['slurmd', '-D', '-f', self.conf, '-N', self.node], 'slurmd')
        self.wait_for(self.node_is_idle, 'the node to be idle in sinfo')

    def write_conf(self):
        folder = self.folder
        with open(self.conf, 'w') as f:
            f.write(f"""ClusterName=testcluster
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.socket}
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
KillWait=30
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def daemon(self, args, name):
        log = open(os.path.join(self.folder, 'log', f'{name}.out'), 'w')
        self.daemons.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                             start_new_session=True))

    def wait_for(self, condition, what):
        deadline = time.time() + WAIT_S
        while not condition():
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f'{proc.args[0]} ended (exit {proc.returncode}) while waiting for {what}: '
                                       + self.logs())
            if time.time() > deadline:
                raise RuntimeError(f'no {what} after {WAIT_S} s: ' + self.logs())
            time.sleep(0.2)

    def node_is_idle(self):
        result = self.run('sinfo', '-h', '-o', '%t', check=False)
        return result.returncode == 0 and result.stdout.strip() == 'idle'

    def logs(self):
        text = []
        for name in os.listdir(os.path.join(self.folder, 'log')):
            with open(os.path.join(self.folder, 'log', name), errors='replace') as f:
                text.append(f'--- {name}\n' + ''.join(f.readlines()[-15:]))
        return '\n'.join(text)

    def run(self, *args, check=True, timeout=WAIT_S, cwd=REPO, **extra):
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=self.env(**extra), cwd=cwd)
        if check and result.returncode:
            raise RuntimeError(f'{" ".join(args)}: exit {result.returncode}: {result.stderr.strip()}')
        return result

    def sbatch(self, output, *args, **extra):
        """Submit a job (sbatch's options, then the script and its arguments); its id."""
        return self.run('sbatch', '--parsable', f'--output={output}', *args, **extra).stdout.strip().split(';')[0]

    def job(self, job_id):
        """scontrol's fields of a job (JobState, ExitCode, Restarts, ...)."""
        text = self.run('scontrol', '-o', 'show', 'job', job_id).stdout
        return dict(re.findall(r'(\w+)=(\S*)', text))

    def wait_for_state(self, job_id, states, timeout=300):
        deadline = time.time() + timeout
        while True:
            fields = self.job(job_id)
            if fields['JobState'] in states:
                return fields
            assert fields['JobState'] not in FINAL_STATES, f'job {job_id} ended instead: {fields}'
            assert time.time() < deadline, f'job {job_id} still {fields["JobState"]} after {timeout} s: {fields}'
            time.sleep(0.25)

    def start_now(self, job_id, timeout=120):
        """Start a requeued job, which waits for a begin time about two minutes on. Not too soon: the requeue
        revokes the old run's credential on the node, and a start in the same second is refused ('Killing
        non-startable batch JobId=J: Job credential revoked', the job FAILED): wait for the node to finish the old
        run, and a few seconds more."""
        self.wait_for(lambda: 'comp' not in self.run('sinfo', '-h', '-o', '%T').stdout.lower(),
                      'the node to finish the requeued run')
        time.sleep(3)
        deadline = time.time() + timeout
        while (fields := self.job(job_id))['JobState'] == 'PENDING':
            assert time.time() < deadline, f'job {job_id} still pending after {timeout} s: {fields}'
            self.run('scontrol', 'update', f'JobId={job_id}', 'StartTime=now')
            time.sleep(1)

    def finish(self, job_id, timeout=300):
        return self.wait_for_state(job_id, FINAL_STATES, timeout)

    def end_jobs(self):
        self.run('scancel', '--full', '--signal=KILL', '--user=root', check=False)
        deadline = time.time() + WAIT_S
        while self.run('squeue', '-h', check=False).stdout.strip() and time.time() < deadline:
            time.sleep(0.5)

    def stop(self):
        for proc in reversed(self.daemons):
            proc.terminate()
            try:
                proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    missing = [tool for tool in DAEMONS + CLIENTS if shutil.which(tool) is None]
    if missing:
        refuse(f'{", ".join(missing)} not found: install slurmctld slurmd slurm-client munge (see .ci/run)')
    if os.geteuid() != 0:
        refuse('slurmd must run as root to start the jobs\' tasks')
    folder = tmp_path_factory.mktemp('slurm')
    os.chmod(folder, 0o755)
    one_node = Cluster(str(folder))
    try:
        one_node.start()
    except (RuntimeError, OSError) as err:
        one_node.stop()
        refuse(f'the one-node SLURM cluster did not start: {err}')
    yield one_node
    one_node.end_jobs()
    one_node.stop()


@pytest.fixture
def slurm(cluster):
    """The cluster, with no job left from the test."""
    yield cluster
    cluster.end_jobs()


def read_log(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except FileNotFoundError:
        return ''


def wait_for_line(path, pattern, timeout=240):
    deadline = time.time() + timeout
    while not re.search(pattern, read_log(path), re.M):
        assert time.time() < deadline, f'no line matching {pattern!r} in {path}:\n' + read_log(path)[-3000:]
        time.sleep(0.1)
    return read_log(path)


def script(folder, name, lines):
    path = os.path.join(folder, name)
    with open(path, 'w') as f:
        f.write('#!/bin/bash\n' + '\n'.join(lines) + '\n')
    return path


def job_script_of_the_docs(folder):
    """docs/slurm.md's job script, verbatim."""
    with open(DOC) as f:
        text = f.read()
    block = re.search(r'<!-- slurm-job-script -->\n```bash\n(.*?)```', text, re.S)
    assert block, 'docs/slurm.md lost its job script'
    path = os.path.join(folder, 'train.sbatch')
    with open(path, 'w') as f:
        f.write(block.group(1))
    return path


def images_evaluated(log):
    return [int(n) for n in re.findall(r'^Test: evaluated (\d+) images', log, re.M)]


# --- launches -----------------------------------------------------------------------------------

def test_srun_trains_train_py_on_two_ranks_from_slurms_variables_and_evaluates_each_image_once(
        slurm, jpeg_dataset, tmp_path):
    result = slurm.run('srun', '-n', '2', 'python', 'train.py', '--data-path', jpeg_dataset, *RESNET,
                       '--dl-worker-type', 'FAST', '--epochs', '1', '--output-dir', str(tmp_path / 'out'),
                       timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert '| distributed init (rank 0, SLURM)' in log and '| distributed init (rank 1, SLURM)' in log
    assert 'rank and world size from SLURM_PROCID=0 SLURM_NTASKS=2' in log
    assert images_evaluated(log) == [20]  # 4 classes x 5 validation images, each once over the 2 ranks
    assert re.findall(r'\| rank (\d): trained on (\d+) images', log) in ([('0', '24'), ('1', '24')],
                                                                        [('1', '24'), ('0', '24')])


def test_sbatch_runs_main_py_under_srun_and_the_job_completes(slurm, jpeg_dataset, tmp_path):
    job_file = script(str(tmp_path), 'googlenet.sbatch', [
        f'srun python main.py --data-path {jpeg_dataset} {" ".join(GOOGLENET)} --dl-worker-type MP '
        f'--output-dir {tmp_path}/out'])
    log_path = str(tmp_path / 'job.log')
    job = slurm.sbatch(log_path, '--ntasks=2', job_file)
    fields = slurm.finish(job)
    log = read_log(log_path)
    assert (fields['JobState'], fields['ExitCode']) == ('COMPLETED', '0:0'), log[-3000:]
    assert '| distributed init (rank 1, SLURM)' in log
    assert re.search(r'^ \* Acc@1 [\d.]+ Acc@5 [\d.]+', log, re.M)
    assert re.search(r'evaluated 20 images', log), log[-2000:]


# --- stops through the scheduler ----------------------------------------------------------------

def start_training_job(slurm, tmp_path, dataset, loader, *extra, epochs=3):
    job_file = script(str(tmp_path), 'train.sbatch', [
        f'srun python train.py --data-path {dataset} {" ".join(RESNET)} --dl-worker-type {loader} '
        f'--epochs {epochs} --save-checkpoint --output-dir {tmp_path}/out {" ".join(extra)}',
        'echo "srun exit status $?"'])
    log_path = str(tmp_path / 'job.log')
    return slurm.sbatch(log_path, '--ntasks=2', job_file), log_path


@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_scancel_stops_both_ranks_with_a_save_within_seconds(slurm, jpeg_dataset, tmp_path, loader):
    job, log_path = start_training_job(slurm, tmp_path, jpeg_dataset, loader)
    wait_for_line(log_path, r'^Epoch: \[0\]  \[ ?2/')
    cancelled = time.time()
    slurm.run('scancel', job)
    fields = slurm.finish(job, timeout=60)
    ended = time.time() - cancelled
    log = read_log(log_path)
    assert [name for name, _, _ in STOPPED.findall(log)] == ['SIGTERM'], log[-3000:]  # rank 0 saves and says so
    assert log.count('SIGTERM received: stopping after this step') == 2  # each rank got it from slurmstepd
    assert 'Terminated' not in log and 'Killed' not in log, log[-3000:]  # no task died by the signal
    assert fields['JobState'] == 'CANCELLED'
    assert ended < 25, f'the job took {ended:.1f} s to end after scancel (KillWait is 30 s)'
    assert torch.load(tmp_path / 'out' / 'checkpoint.pth', weights_only=True)['epoch_position'] > 0
    saved_after = re.search(r'\(([\d.]+) s after the signal\)', log).group(1)
    print(f'scancel ({loader}): saved {saved_after} s after the signal, job ended {ended:.1f} s after scancel')


def test_scancel_signal_usr1_saves_and_the_job_records_a_clean_end(slurm, jpeg_dataset, tmp_path):
    job, log_path = start_training_job(slurm, tmp_path, jpeg_dataset, 'FAST')
    wait_for_line(log_path, r'^Epoch: \[0\]  \[ ?2/')
    slurm.run('scancel', '--signal=USR1', job)
    fields = slurm.finish(job, timeout=120)
    log = read_log(log_path)
    assert [name for name, _, _ in STOPPED.findall(log)] == ['SIGUSR1'], log[-3000:]  # printed by rank 0
    assert 'srun exit status 0' in log
    assert (fields['JobState'], fields['ExitCode']) == ('COMPLETED', '0:0')


def task_pids(marker):
    """The trainer processes whose command line holds `marker` (the job's own output folder)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                words = f.read().split(b'\0')
        except OSError:
            continue
        is_trainer = os.path.basename(words[0]).startswith(b'python') and words[1:2] == [b'train.py']  # not srun
        if is_trainer and marker.encode() in b' '.join(words):
            pids.append(int(pid))
    return pids


def imports_finished(pid):
    """Whether the trainer got past importing torch (it has the library mapped)."""
    try:
        with open(f'/proc/{pid}/maps') as f:
            return 'libtorch_cpu' in f.read()
    except OSError:
        return True


@pytest.mark.parametrize('moment', ['importing torch', 'the dataset scan'])
def test_a_signal_at_any_moment_of_start_up_ends_every_task_with_one_line_not_by_the_signal(
        slurm, jpeg_dataset, tmp_path, moment):
    """scancel --signal=USR1 while the tasks import torch (as soon as their first lines have run) or scan the
    dataset: before the stop handlers existed, `tasks 0-1: User defined signal 1`, exit 138."""
    job, log_path = start_training_job(slurm, tmp_path, jpeg_dataset, 'MP')
    marker = f'{tmp_path}/out'
    deadline = time.time() + 120
    if moment == 'importing torch':
        while not ((pids := task_pids(marker)) and len(pids) == 2
                   and all(catches_signal(pid, signal.SIGUSR1) for pid in pids)):
            assert time.time() < deadline, 'the tasks never installed a SIGUSR1 handler:\n' + read_log(log_path)
            time.sleep(0.01)
        early = not any(imports_finished(p) for p in pids)
    else:
        wait_for_line(log_path, r'^Loading training data')
        early = True
    slurm.run('scancel', '--signal=USR1', job)
    fields = slurm.finish(job, timeout=120)
    log = read_log(log_path)
    assert log.count('SIGUSR1 received before training started: nothing trained, nothing to save; exiting 0') == 2, \
        log[-3000:]
    assert 'User defined signal' not in log and 'srun exit status 0' in log, log[-3000:]
    assert (fields['JobState'], fields['ExitCode']) == ('COMPLETED', '0:0')
    assert 'Start training' not in log and not os.path.exists(tmp_path / 'out' / 'checkpoint.pth')
    assert early, f'the signal came after {moment}: the test did not test it'


# --- requeue ----------------------------------------------------------------------------------------

def final_weights(path):
    return torch.load(path, map_location='cpu', weights_only=False)['model']


def test_the_documented_job_script_requeued_after_a_stop_resumes_and_ends_with_the_uninterrupted_weights(
        slurm, jpeg_dataset, tmp_path):
    job_file = job_script_of_the_docs(str(tmp_path))
    train_args = ['--data-path', jpeg_dataset, *RESNET, '--dl-worker-type', 'FAST', '--epochs', '2']
    reference_log = str(tmp_path / 'reference.log')
    reference = slurm.sbatch(reference_log, '--ntasks=2', job_file, *train_args,
                             '--output-dir', str(tmp_path / 'reference'))
    interrupted_log = str(tmp_path / 'interrupted.log')
    job = slurm.sbatch(interrupted_log, '--ntasks=2', job_file, *train_args,
                       '--output-dir', str(tmp_path / 'interrupted'))

    wait_for_line(interrupted_log, r'^Epoch: \[0\]  \[ ?2/')
    assert '--resume auto: no ' in read_log(interrupted_log)
    slurm.run('scancel', '--signal=USR1', job)
    fields = slurm.wait_for_state(job, ('PENDING',), timeout=120)  # the script requeued it
    stopped = time.time()
    assert fields['Restarts'] == '1'
    slurm.start_now(job)
    wait_for_line(interrupted_log, r'--resume auto: resuming from (.|\n)*^Epoch: ', timeout=240)  # training again
    requeue_to_first_step = time.time() - stopped
    fields = slurm.finish(job)
    log = read_log(interrupted_log)
    assert (fields['JobState'], fields['ExitCode']) == ('COMPLETED', '0:0'), log[-3000:]
    assert [name for name, _, _ in STOPPED.findall(log)] == ['SIGUSR1']
    assert 'continue with the same command (--resume auto)' in log
    assert f'--resume auto: resuming from {tmp_path}/interrupted/checkpoint.pth' in log
    assert slurm.finish(reference)['JobState'] == 'COMPLETED', read_log(reference_log)[-3000:]

    resumed, uninterrupted = (final_weights(tmp_path / name / 'checkpoint.pth') for name in ('interrupted', 'reference'))
    assert resumed.keys() == uninterrupted.keys()
    assert all(resumed[k].equal(uninterrupted[k]) for k in resumed), 'the resumed run ends with other weights'
    print(f'requeue to the first step of the second run: {requeue_to_first_step:.1f} s')


# --- the demo wrapper inside an allocation ----------------------------------------------------------

def test_demo_wrapper_inside_an_allocation_starts_mpirun_on_its_slots_and_refuses_a_larger_world(
        slurm, jpeg_dataset, tmp_path):
    demo = (f'python demo_resnet.py --world-size 2 --batch-size 4 --model resnet18 --device cpu '
            f'--data-path {jpeg_dataset} --epochs 1 --workers 2 --print-freq 2 --dl-worker-type MP '
            f'--output-dir {tmp_path}/out')
    small_log, log_path = str(tmp_path / 'small.log'), str(tmp_path / 'job.log')
    small = slurm.sbatch(small_log, '--ntasks=1', script(str(tmp_path), 'small.sbatch', [demo]))
    job = slurm.sbatch(log_path, '--ntasks=2', script(str(tmp_path), 'demo.sbatch', [demo]))
    fields = slurm.finish(small, timeout=120)
    assert fields['JobState'] == 'FAILED' and fields['ExitCode'] == '2:0', read_log(small_log)
    assert read_log(small_log).strip().splitlines()[-1] == (
        f'error: --world-size 2: SLURM job {small} has 1 task slot(s) (SLURM_TASKS_PER_NODE=1), where mpirun places '
        'the ranks; ask for 2 (#SBATCH --ntasks=2) or lower --world-size')
    fields = slurm.finish(job)
    log = read_log(log_path)
    assert (fields['JobState'], fields['ExitCode']) == ('COMPLETED', '0:0'), log[-3000:]
    assert '| distributed init (rank 1, OpenMPI)' in log and images_evaluated(log) == [20]

    as_tasks = slurm.run('srun', '-n', '2', *demo.split(), check=False)
    assert as_tasks.returncode == 2
    assert as_tasks.stderr.count('error: this wrapper is one of 2 tasks of SLURM step ') == 2, as_tasks.stderr
