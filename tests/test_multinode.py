"""Multi-node for real: two hosts built on this machine, the Habana README's MULTI_HLS_IPS path run on them
through mpirun over ssh (demo_resnet.py and demo_googlenet.py), failures across the hosts, and torchrun on
the same two hosts. Tier: -m multinode (also slow).

The hosts are two network namespaces joined by a veth pair, each with a private address of the test's own
and an sshd on port 3022 (host keys, a client key and known_hosts made here, as the README's set-up does).
Nothing can leave the machine: each namespace's only route is the veth's subnet, and every command runs
inside a namespace. The namespaces share this machine's files and process ids, so both hosts see the same
checkout, and the test finds a host's processes by their network namespace. Every other test keeps
OMPI_MCA_plm_rsh_agent=false; only the commands started here get an ssh agent.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, TINY_IMAGES, command_line, free_port, read_until, script_env

from classification import launcher
import sample_data

pytestmark = [pytest.mark.slow, pytest.mark.mpi, pytest.mark.multinode]

ADDRESSES = ('192.168.233.1', '192.168.233.2')  # the test's own hosts: no example uses them
SUBNET = '192.168.233.0/24'
INTERFACE = 'mnveth0'  # both ends of the veth pair carry this name, one in each namespace
SSHD_PORT = '3022'
SSHD = '/usr/sbin/sshd'
TOOLS = ('ip', 'ssh', 'ssh-keygen', 'ssh-keyscan', SSHD)
# .ci/run sets this: there the hosts must be built, a refusal is a failure instead of a skip.
REQUIRED_VARIABLE = 'MULTINODE_TESTS_REQUIRED'
WAIT_S = 20  # for any set-up command and for an sshd to answer

# The README's multi-server variables (examples v-viii), filled in for the test's hosts.
README_VARIABLES = {'MULTI_HLS_IPS': ','.join(ADDRESSES), 'DOCKER_SSHD_PORT': SSHD_PORT, 'HCCL_OVER_TCP': '1',
                    'HCCL_SOCKET_IFNAME': INTERFACE}
# 3 classes: 24 train images (6 per rank of 4), 9 validation images (uneven over 4 ranks)
TRAIN_IMAGES, VAL_IMAGES = 24, 9
QUICK = ['--device', 'cpu', '--batch-size', '2', '--workers', '0', '--epochs', '1', '--num-train-steps', '2']
# mid-epoch (after step S, P samples) or at the epoch's end, when the signal came in its last step
STOPPED = re.compile(r'Stopped by (SIG\w+): saved epoch (\d+) (?:after step (\d+) \((\d+) samples, signal seen at '
                     r'step \d+\)|\(complete\)) to (\S+) in ')


def refuse(reason):
    if os.environ.get(REQUIRED_VARIABLE):
        pytest.fail(f'{reason} ({REQUIRED_VARIABLE} is set: the multi-node tests must run here)')
    pytest.skip(reason)


def command(*args, timeout=WAIT_S, check=True):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise RuntimeError(f'{" ".join(args)}: exit {result.returncode}: {result.stderr.strip()}')
    return result


def rank_of(pid):
    """OMPI_COMM_WORLD_RANK of a process, None when it has none (or is gone)."""
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            found = re.search(rb'(?:^|\0)OMPI_COMM_WORLD_RANK=(\d+)', f.read())
    except OSError:
        return None
    return int(found.group(1)) if found else None


def parent_of(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


class TwoHosts:
    """Two namespaces with an sshd each; `start` runs a command inside one of them."""

    def __init__(self, folder):
        tag = uuid.uuid4().hex[:8]
        self.namespaces = (f'mnhost1-{tag}', f'mnhost2-{tag}')
        self.folder = folder
        self.created = []       # namespaces made so far
        self.daemons = []       # the sshd processes
        self.started = []       # processes started by tests
        self.made_privsep_dir = False
        self.key = os.path.join(folder, 'id_ed25519')
        self.known_hosts = os.path.join(folder, 'known_hosts')
        self.ssh_config = os.path.join(folder, 'ssh_config')

    # --- building ---------------------------------------------------------------------------------

    def build(self):
        try:
            command('ip', 'netns', 'add', self.namespaces[0])
        except RuntimeError as err:
            refuse(f'cannot create network namespaces (needs root or CAP_NET_ADMIN): {err}')
        self.created.append(self.namespaces[0])
        command('ip', 'netns', 'add', self.namespaces[1])
        self.created.append(self.namespaces[1])
        for ns in self.namespaces:  # no IPv6 link-local chatter: the veth carries only the test's IPv4
            for key in ('all', 'default'):
                command('ip', 'netns', 'exec', ns, 'sysctl', '-q', '-w', f'net.ipv6.conf.{key}.disable_ipv6=1',
                        check=False)
        command('ip', 'link', 'add', INTERFACE, 'netns', self.namespaces[0], 'type', 'veth',
                'peer', 'name', INTERFACE, 'netns', self.namespaces[1])
        for ns, address in zip(self.namespaces, ADDRESSES):
            command('ip', '-n', ns, 'addr', 'add', f'{address}/24', 'dev', INTERFACE)
            command('ip', '-n', ns, 'link', 'set', 'lo', 'up')
            command('ip', '-n', ns, 'link', 'set', INTERFACE, 'up')
            routes = command('ip', '-n', ns, '-4', 'route', 'show').stdout.split('\n')
            assert [route.split()[:3] for route in routes if route] == [[SUBNET, 'dev', INTERFACE]], routes
            assert not command('ip', '-n', ns, '-6', 'route', 'show', 'default').stdout.strip()
        self.start_sshds()

    def start_sshds(self):
        command('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C', 'multinode-test', '-f', self.key)
        shutil.copy(self.key + '.pub', os.path.join(self.folder, 'authorized_keys'))
        if not os.path.isdir('/run/sshd'):  # sshd's privilege separation directory
            os.makedirs('/run/sshd', mode=0o755)
            self.made_privsep_dir = True
        for number, (ns, address) in enumerate(zip(self.namespaces, ADDRESSES), start=1):
            host_key = os.path.join(self.folder, f'host{number}_ed25519_key')
            command('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', host_key)
            config = os.path.join(self.folder, f'sshd{number}_config')
            with open(config, 'w') as f:
                f.write(f'Port {SSHD_PORT}\nListenAddress {address}\nHostKey {host_key}\n'
                        f'PidFile {self.folder}/sshd{number}.pid\nPermitRootLogin prohibit-password\n'
                        f'PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n'
                        f'AuthorizedKeysFile {self.folder}/authorized_keys\nStrictModes no\nUsePAM no\n'
                        'PrintMotd no\nX11Forwarding no\nAllowTcpForwarding no\n'
                        # A host's own shell settings, as on a cluster: one thread per rank on this 2-core box
                        'SetEnv OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1\n')
            self.daemons.append(subprocess.Popen(
                ['ip', 'netns', 'exec', ns, SSHD, '-D', '-f', config, '-E', self.sshd_log(number)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # known_hosts as the README's set-up writes it: ssh-keyscan -p 3022 -H <host>, from host 1
        deadline = time.monotonic() + WAIT_S
        while True:
            scan = command('ip', 'netns', 'exec', self.namespaces[0], 'ssh-keyscan', '-p', SSHD_PORT, '-H',
                           '-T', '2', *ADDRESSES, check=False)
            if len(scan.stdout.splitlines()) >= len(ADDRESSES):
                break
            assert time.monotonic() < deadline, f'sshd did not answer on port {SSHD_PORT}: {scan.stderr}'
            time.sleep(0.2)
        with open(self.known_hosts, 'w') as f:
            f.write(scan.stdout)
        with open(self.ssh_config, 'w') as f:
            f.write(f'Host *\n  User root\n  IdentityFile {self.key}\n  IdentitiesOnly yes\n'
                    f'  UserKnownHostsFile {self.known_hosts}\n  GlobalKnownHostsFile /dev/null\n'
                    '  StrictHostKeyChecking yes\n  BatchMode yes\n  ConnectTimeout 10\n')
        probe = command('ip', 'netns', 'exec', self.namespaces[0], 'ssh', '-F', self.ssh_config, '-p', SSHD_PORT,
                        ADDRESSES[1], 'true', check=False)
        assert probe.returncode == 0, f'ssh from host 1 to host 2 failed: {probe.stderr}'

    def sshd_log(self, number):
        return os.path.join(self.folder, f'sshd{number}.log')

    def logins(self, number):
        with open(self.sshd_log(number)) as f:
            return re.findall(r'Accepted publickey for root from (\S+)', f.read())

    # --- running ----------------------------------------------------------------------------------

    def env(self, **extra):
        """script_env with an ssh agent for mpirun that uses the test's key and known_hosts, and without
        what the launcher would read from the caller's shell."""
        env = script_env(OMPI_MCA_plm_rsh_agent=f'ssh -F {self.ssh_config}', **extra)
        for name in launcher.FORWARDED_VARIABLES + ('MPI_ROOT', 'DEMO_PHYSICAL_CORES', 'DEMO_CPU_SOCKETS',
                                                    'GLOO_SOCKET_IFNAME'):
            if name not in extra:
                env.pop(name, None)
        return env

    def start(self, args, host=1, cwd=REPO, env=None):
        """Start `python <args>` (or a full command) inside a host's namespace, in a session of its own,
        stdout and stderr merged. `ip netns exec` execs the command: the process is the command itself."""
        cmd = [sys.executable] + list(args) if str(args[0]).endswith('.py') else list(args)
        proc = subprocess.Popen(['ip', 'netns', 'exec', self.namespaces[host - 1], *cmd], cwd=cwd,
                                env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.started.append(proc)
        return proc

    def finish(self, proc, timeout=150):
        try:
            return proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.end_jobs()
            raise

    def pids(self, host):
        result = command('ip', 'netns', 'pids', self.namespaces[host - 1], check=False)
        return [int(pid) for pid in result.stdout.split()]

    def ranks_on(self, host):
        """{pid: rank} of the processes in a host's namespace that mpirun started as ranks (not their helper
        processes, which inherit the rank's variables)."""
        ranks = {pid: rank_of(pid) for pid in self.pids(host)}
        return {pid: rank for pid, rank in ranks.items() if rank is not None and rank_of(parent_of(pid)) is None}

    def rank_processes(self, host):
        """The pids in a host's namespace that carry a rank's variables: the ranks and their loader processes."""
        return [pid for pid in self.pids(host) if rank_of(pid) is not None]

    def end_jobs(self):
        """Kill what the tests started: their process groups, and everything in the namespaces but the sshds
        (mpirun runs in a group of its own, remote ranks and orted in sshd's sessions)."""
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        daemons = {daemon.pid for daemon in self.daemons}
        for host in (1, 2):
            for pid in self.pids(host):
                if pid not in daemons:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for proc in self.started:
            proc.communicate(timeout=WAIT_S)
        self.started.clear()

    # --- removing ---------------------------------------------------------------------------------

    def remove(self):
        """Undo everything, each step even when an earlier one fails; report what could not be undone."""
        problems = []
        steps = [self.end_jobs, self.stop_sshds, self.delete_namespaces]
        for step in steps:
            try:
                step()
            except Exception as err:  # noqa: BLE001 - every step must get its turn
                problems.append(f'{step.__name__}: {err}')
        if self.made_privsep_dir:
            try:
                os.rmdir('/run/sshd')
            except OSError as err:
                problems.append(f'/run/sshd: {err}')
        shutil.rmtree(self.folder, ignore_errors=True)
        assert not problems, problems

    def stop_sshds(self):
        for daemon in self.daemons:
            daemon.terminate()
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=5)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=5)

    def delete_namespaces(self):
        for ns in reversed(self.created):  # the veth pair goes with them
            command('ip', 'netns', 'delete', ns)
        self.created.clear()


@pytest.fixture(scope='module')
def two_hosts(tmp_path_factory):
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        refuse(f'{", ".join(missing)} not found: install openssh-server openssh-client iproute2 (see .ci/run)')
    hosts = TwoHosts(str(tmp_path_factory.mktemp('two-hosts')))
    try:
        hosts.build()
        yield hosts
    finally:
        hosts.remove()


@pytest.fixture
def hosts(two_hosts):
    """The two hosts, with nothing left running from the test before or after."""
    yield two_hosts
    two_hosts.end_jobs()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('multinode-jpegs')
    sample_data.make_dataset(str(root), classes=3, train_per_class=TRAIN_IMAGES // 3, val_per_class=VAL_IMAGES // 3,
                             seed=5)
    return str(root)


def readme_line(variables, script, args):
    """A README-style command line: the variables, then `$PYTHON -u <script> <args>` (the script's full path: the
    googlenet run starts elsewhere, main.py saving into the current directory)."""
    assigned = ' '.join(f'{name}="{value}"' if name == 'MULTI_HLS_IPS' else f'{name}={value}'
                        for name, value in variables.items())
    return f'{assigned} $PYTHON -u {os.path.join(REPO, script)} ' + ' '.join(args)


def run_readme_line(hosts, line, cwd, master_port):
    proc = hosts.start(['bash', '-c', line], cwd=cwd, env=hosts.env(PYTHON=sys.executable, MASTER_PORT=master_port))
    return proc, hosts.finish(proc)


def trained(log):
    """{rank: images} from the `| rank R: trained on N images` lines (print() writes the line's end apart, so
    under mpirun another rank's output can come between: not anchored at line starts)."""
    return {int(rank): int(n) for rank, n in re.findall(r'\| rank (\d+): trained on (\d+) images', log)}


def assert_received_on_every_rank(log, master_port):
    for rank in range(4):  # ranks 2 and 3 run on host 2: the variables crossed over with mpirun -x
        assert (f'| rank {rank} received: HCCL_OVER_TCP=1 HCCL_SOCKET_IFNAME={INTERFACE} MASTER_ADDR={ADDRESSES[0]} '
                f'MASTER_PORT={master_port}; gloo uses interface {INTERFACE} (HCCL_SOCKET_IFNAME)') in log.splitlines()


def assert_launched_over_ssh(hosts, log, script_args_end):
    prefix, source = launcher.mpi_prefix(hosts.env())
    assert f'mpirun --prefix {prefix} (where each host finds orted): {source}' in log.splitlines()
    launched = next(line for line in log.splitlines() if line.startswith('command = mpirun '))
    assert f' --prefix {prefix} ' in launched and f"--mca plm_rsh_args '-p {SSHD_PORT}'" in launched
    assert f' -H {ADDRESSES[0]}:' in launched and launched.endswith(script_args_end)
    # mpirun reached host 2 through its sshd, with the test's key; host 1's ranks started locally
    assert ADDRESSES[0] in hosts.logins(2) and not hosts.logins(1)


def test_readme_multi_server_command_trains_resnet_on_two_hosts_through_mpirun_over_ssh(hosts, dataset, tmp_path):
    master_port = str(free_port())
    args = ['--world-size', '4', *QUICK, '--model', 'resnet18', '--print-freq', '1', '--process-per-node', '2',
            '--data-path', dataset, '--output-dir', str(tmp_path)]
    proc, log = run_readme_line(hosts, readme_line(README_VARIABLES, 'demo_resnet.py', args), REPO, master_port)
    assert proc.returncode == 0, log[-4000:]

    assert trained(log) == {0: 4, 1: 4, 2: 4, 3: 4}, log[-4000:]  # 2 steps of 2 images on each rank, both hosts
    for once in ('Start training', 'Training time', 'Epoch: [0]  [1/2]'):  # --num-train-steps 2
        assert log.count(once) == 1, once  # the log comes from rank 0 alone
    assert re.findall(r'^Test: evaluated (\d+) images$', log, flags=re.M) == [str(VAL_IMAGES)]
    assert_received_on_every_rank(log, master_port)
    trainer_args = next(line for line in log.splitlines() if line.startswith('Namespace(') and 'dist_url=' in line)
    assert 'process_per_node=2,' in trainer_args and 'world_size=4,' in trainer_args  # train.py's default: 8
    assert_launched_over_ssh(hosts, log, '--process-per-node=2')


def test_readme_multi_server_command_trains_googlenet_on_two_hosts_through_mpirun_over_ssh(hosts, dataset, tmp_path):
    master_port = str(free_port())
    args = ['--world-size', '4', '--device', 'cpu', '-b', '2', '-j', '0', '--epochs', '1', '--num-train-steps', '2',
            '--no-aux-logits', '--process-per-node', '2', '--data-path', dataset]
    proc, log = run_readme_line(hosts, readme_line(README_VARIABLES, 'demo_googlenet.py', args), str(tmp_path),
                                master_port)
    assert proc.returncode == 0, log[-4000:]

    assert trained(log) == {0: 4, 1: 4, 2: 4, 3: 4}, log[-4000:]
    for once in ('training epoch  0', 'MODEL EVAL', 'Training time', 'Epoch: [0][1/3]'):
        assert log.count(once) == 1, once
    assert re.findall(r'^Test: evaluated (\d+) images$', log, flags=re.M) == [str(VAL_IMAGES)]
    assert_received_on_every_rank(log, master_port)
    trainer_args = next(line for line in log.splitlines() if line.startswith('Namespace('))
    assert 'process_per_node=2,' in trainer_args and 'world_size=4' in trainer_args  # main.py's default: 8
    assert_launched_over_ssh(hosts, log, '--no-aux-logits --process-per-node=2')


def start_long_resnet_run(hosts, dataset, output_dir, *extra):
    """The README's variables and demo_resnet.py, started directly (the wrapper is the process), for 20 epochs."""
    args = ['demo_resnet.py', '--world-size', '4', '--device', 'cpu', '--model', 'resnet18', '--batch-size', '2',
            '--workers', '2', '--epochs', '20', '--print-freq', '2', '--num-eval-steps', '1', '--data-path', dataset,
            '--output-dir', output_dir, *extra]
    proc = hosts.start(args, env=hosts.env(**README_VARIABLES))
    deadline = time.monotonic() + WAIT_S
    while 'demo_resnet.py' not in command_line(proc.pid):  # ip netns exec becomes the wrapper: signals reach it
        assert proc.poll() is None and time.monotonic() < deadline, command_line(proc.pid)
        time.sleep(0.05)
    return proc


def describe(pid):
    """pid, parent, state and command line of a process, for a failure message."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return f'{pid} (parent {fields[1]}, state {fields[0]}): {command_line(pid)[:200]!r}'
    except OSError:
        return f'{pid} (gone)'



def test_killing_the_ranks_of_one_host_ends_the_whole_job_within_a_minute(hosts, dataset, tmp_path):
    proc = start_long_resnet_run(hosts, dataset, str(tmp_path))
    read_until(proc, r'^Epoch: \[0\]  \[2/3\]', timeout=180)  # DDP steps are collective: all 4 ranks train
    assert sorted(hosts.ranks_on(1).values()) == [0, 1]
    remote = hosts.ranks_on(2)
    assert sorted(remote.values()) == [2, 3]
    for pid in remote:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    log = hosts.finish(proc, timeout=90)
    ended_after = time.monotonic() - killed
    assert proc.returncode != 0 and ended_after < 60, (proc.returncode, ended_after, log[-3000:])
    print(f'the job ended {ended_after:.1f} s after the kill, exit status {proc.returncode}')
    assert re.search(r'rank [23] with PID \d+ on node \S+ exited on signal 9', log), log[-3000:]
    deadline = time.monotonic() + 20  # nothing left behind on either host: no rank, no loader process
    while (hosts.rank_processes(1) or hosts.rank_processes(2)) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = hosts.rank_processes(1) + hosts.rank_processes(2)
    assert not left, [describe(pid) for pid in left]


def job_left_on(hosts):
    """What of a job still runs on either host: ranks, their loader processes, mpirun, orted."""
    return [pid for host in (1, 2) for pid in hosts.pids(host)
            if rank_of(pid) is not None or re.search(r'\b(mpirun|orted)\b', command_line(pid))]


def test_kill_9_of_the_wrapper_ends_the_job_on_both_hosts_within_30_s_and_rank_0_saves(hosts, dataset, tmp_path):
    """Issue 20: before, mpirun (in a process group of its own) and the ranks of both hosts trained on."""
    out = tmp_path / 'out'
    proc = start_long_resnet_run(hosts, dataset, str(out), '--save-checkpoint')
    read_until(proc, r'^Epoch: \[0\]  \[0/3\]', timeout=180)
    assert sorted(hosts.ranks_on(2).values()) == [2, 3]
    proc.kill()  # the wrapper alone: the kernel sends mpirun the wrapper's stop signal (SIGUSR1), which it forwards
    killed = time.monotonic()
    log = hosts.finish(proc, timeout=90)  # mpirun inherited the wrapper's stdout: its lines still come
    while job_left_on(hosts) and time.monotonic() - killed < 30:
        time.sleep(0.5)
    assert not job_left_on(hosts), [command_line(pid) for pid in job_left_on(hosts)]
    stopped = re.search(r'Stopped by SIGUSR1: saved epoch (\d+) ', log)
    assert stopped, log[-3000:]
    assert (out / 'checkpoint.pth').is_file()
    assert 'Traceback' not in log


def test_sigterm_to_the_wrapper_saves_a_checkpoint_with_ranks_on_both_hosts(hosts, dataset, tmp_path):
    out = tmp_path / 'out'
    proc = start_long_resnet_run(hosts, dataset, str(out), '--save-checkpoint')
    read_until(proc, r'^Epoch: \[0\]  \[0/3\]', timeout=180)
    assert sorted(hosts.ranks_on(2).values()) == [2, 3]
    proc.send_signal(signal.SIGTERM)  # the wrapper alone; it passes the stop to mpirun as SIGUSR1
    log = hosts.finish(proc, timeout=120)
    assert proc.returncode == 0, log[-4000:]
    assert 'SIGTERM received: asking the trainer to stop after its step and save (SIGUSR1 through mpirun' in log
    stopped = STOPPED.search(log)
    assert stopped and stopped.group(1) == 'SIGUSR1' and stopped.group(2) == '0', log[-3000:]
    if stopped.group(3):  # every rank of both hosts stopped after the same step
        assert int(stopped.group(4)) == (int(stopped.group(3)) + 1) * 2 * 4
    path = stopped.group(5)
    assert os.path.isfile(path) and path.startswith(str(out))
    assert 'Traceback' not in log


def test_torchrun_with_c10d_rendezvous_trains_on_the_two_hosts(hosts, dataset, tmp_path):
    """The README's torchrun line, one torchrun per host. Both test hosts share this machine's host name, so
    each names its own address (--local-addr) and host 1 says it holds the rendezvous (is_host)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), 'torchrun')
    runner = [torchrun] if os.path.exists(torchrun) else [sys.executable, '-m', 'torch.distributed.run']
    endpoint = f'{ADDRESSES[0]}:{free_port()}'
    procs = []
    for host, address in zip((1, 2), ADDRESSES):
        own = ['--rdzv-conf', 'is_host=1'] if host == 1 else []
        procs.append(hosts.start([
            *runner, '--nnodes', '2', '--nproc-per-node', '2', '--rdzv-backend', 'c10d', '--rdzv-endpoint', endpoint,
            *own, '--local-addr', address, os.path.join(REPO, 'train.py'), *QUICK, '--model', 'resnet18',
            '--data-path', dataset, '--output-dir', str(tmp_path / f'host{host}'), *TINY_IMAGES],
            host=host, env=hosts.env(HCCL_SOCKET_IFNAME=INTERFACE)))
    logs = [hosts.finish(proc) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert trained(logs[0]) == {0: 4, 1: 4} and trained(logs[1]) == {2: 4, 3: 4}
    assert re.findall(r'^Test: evaluated (\d+) images$', logs[0], flags=re.M) == [str(VAL_IMAGES)]
    assert 'Start training' not in logs[1]  # rank 0 alone prints the log
    for rank in (2, 3):
        assert re.search(rf'^\| rank {rank} received: HCCL_SOCKET_IFNAME={INTERFACE} MASTER_ADDR={ADDRESSES[0]} '
                         rf'MASTER_PORT=\d+; gloo uses interface {INTERFACE}', logs[1], flags=re.M), logs[1][-3000:]
