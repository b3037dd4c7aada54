"""Distributed start-up, and one clear line when the ranks do not meet or one stops answering.

Which rank a process is comes from its launcher's variables (mpirun, torchrun, SLURM). The ranks meet at
MASTER_ADDR:MASTER_PORT; under a launcher that names its job, a port derived from the job's id stands in for
an unset MASTER_PORT, so that two jobs on one machine do not collide. Every wait (the rendezvous and each
collective) is bounded by --dist-timeout. Each rank sends a heartbeat to the rendezvous store from a thread,
so that when a collective times out, the ranks still running can tell which rank stopped answering.
"""
import builtins
import datetime
import functools
import io
import json
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
import zlib
from typing import NamedTuple

import torch.distributed as dist

from .cli import CleanExit, UsageError, whole_seconds

DEFAULT_TIMEOUT_S = 600
DEFAULT_MASTER_ADDR = 'localhost'
DEFAULT_MASTER_PORT = 12355

# Launchers and the variables through which each one tells a process where it stands:
# (name, rank, world size, local rank, the command that starts all ranks). torchrun first, as upstream.
LAUNCHER_ENVIRONMENTS = (
    ('torchrun', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'torchrun'),
    ('OpenMPI', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_LOCAL_RANK', 'mpirun'),
    ('MPICH/Intel MPI', 'PMI_RANK', 'PMI_SIZE', 'MPI_LOCALRANKID', 'mpiexec'),
    ('SLURM', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'srun'),
)

# Variables that name the job the same way on all of its ranks and differently for each job: OpenMPI
# (PMIX_NAMESPACE; OMPI_MCA_ess_base_jobid before PMIx), then a SLURM job step.
JOB_ID_VARIABLES = (('PMIX_NAMESPACE',), ('OMPI_MCA_ess_base_jobid',), ('SLURM_JOB_ID', 'SLURM_STEP_ID'))
# Derived ports: below Linux's ephemeral range (32768-60999), so they do not meet outgoing connections.
JOB_PORTS = range(20000, 30000)

MAX_HEARTBEAT_INTERVAL_S = 5.0
STORE_ANSWER_WAIT_S = 5.0


# ---------------------------------------------------------------------------------------------------
# Who this process is


def discover_ranks(environ=None):
    """Return (rank, world_size, local_rank, launcher name) from the launcher's environment.

    Falls back to mpi4py when it is installed and no variable is set; (0, 1, 0, None) otherwise.
    """
    environ = os.environ if environ is None else environ
    found = launcher_environment(environ)
    if found:
        name, rank_var, size_var, local_var, _ = found
        rank, size = whole_number(environ, rank_var), whole_number(environ, size_var)
        local = whole_number(environ, local_var) if local_var in environ else rank
        return rank, size, local, name
    try:
        from mpi4py import MPI
    except ImportError:
        return 0, 1, 0, None
    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), comm.Get_rank(), 'mpi4py'


def launcher_environment(environ):
    """The first entry of LAUNCHER_ENVIRONMENTS whose rank and world size variables are both set."""
    for entry in LAUNCHER_ENVIRONMENTS:
        if entry[1] in environ and entry[2] in environ:
            return entry
    return None


def whole_number(environ, name):
    value = environ[name].strip()
    if not value.isdigit():
        raise UsageError(f"{name}: expected a whole number, got '{environ[name]}'")
    return int(value)


def variables_read(environ):
    """'NAME=value ...' of the launcher variables that gave this process its rank ('' when none did)."""
    found = launcher_environment(environ)
    if not found:
        return ''
    return ' '.join(f'{name}={environ[name]}' for name in found[1:4] if name in environ)


def launch_command(environ):
    found = launcher_environment(environ)
    return found[4] if found else 'mpirun'


def variables_received(environ):
    """'NAME=value ...' of the HCCL_ and MASTER_ variables in the environment, as the launcher set them (mpirun -x
    forwards them to every host: this shows what reached a rank on a remote one)."""
    return ' '.join(f'{name}={environ[name]}' for name in sorted(environ) if name.startswith(('HCCL_', 'MASTER_')))


def gloo_interface_from_hccl(environ):
    """HCCL_SOCKET_IFNAME, for gloo, when GLOO_SOCKET_IFNAME is unset and it names interfaces of this host
    (not a subnet): the README's multi-node commands name the hosts' interface there, and gloo otherwise
    takes the address of the host name, on a multi-host run often one the other hosts cannot reach."""
    names = environ.get('HCCL_SOCKET_IFNAME', '').strip()
    if environ.get('GLOO_SOCKET_IFNAME') or not names:
        return None
    local = {name for _, name in socket.if_nameindex()}
    return names if set(names.split(',')) <= local else None


# ---------------------------------------------------------------------------------------------------
# Where the ranks meet


def job_identity(environ):
    """('NAME=value', value) of the first JOB_ID_VARIABLES entry that is set, else None."""
    for names in JOB_ID_VARIABLES:
        if environ.get(names[0]):
            present = [name for name in names if environ.get(name)]
            return ' '.join(f'{name}={environ[name]}' for name in present), '.'.join(environ[n] for n in present)
    return None


def job_port(job_id):
    """A port in JOB_PORTS that every rank of the job computes alike from its id (crc32: stable across runs)."""
    return JOB_PORTS[zlib.crc32(job_id.encode()) % len(JOB_PORTS)]


def meeting_point(environ):
    """(MASTER_ADDR, MASTER_PORT, where the port came from): MASTER_PORT when set, else a port derived from
    the job's id, else 12355 (MASTER_ADDR: localhost)."""
    address = environ.get('MASTER_ADDR') or DEFAULT_MASTER_ADDR
    if environ.get('MASTER_PORT'):
        return address, port_number(environ['MASTER_PORT']), 'set'
    job = job_identity(environ)
    if job:
        return address, job_port(job[1]), f'derived from {job[0]}'
    return address, DEFAULT_MASTER_PORT, 'default'


def port_number(text):
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"MASTER_PORT: expected a port number from 1 to 65535, got '{text}'")
    return int(text)


def store_address(dist_url, environ):
    """(host, port) of the rendezvous store for env:// and tcp:// URLs; None for others (file://)."""
    if dist_url == 'env://':
        return environ['MASTER_ADDR'], int(environ['MASTER_PORT'])
    parsed = urllib.parse.urlparse(dist_url)
    if parsed.scheme == 'tcp' and parsed.hostname and parsed.port:
        return parsed.hostname, parsed.port
    return None


def free_port_suggestion():
    """A port of JOB_PORTS that nothing listens on now, to suggest for MASTER_PORT."""
    for port in random.sample(JOB_PORTS, 50):
        with socket.socket() as s:
            try:
                s.bind(('', port))
                return port
            except OSError:
                continue
    return JOB_PORTS.start


# ---------------------------------------------------------------------------------------------------
# Start-up


def add_timeout_flag(parser):
    parser.add_argument('--dist-timeout', default=DEFAULT_TIMEOUT_S, type=whole_seconds, metavar='SECONDS',
                        help='longest wait, in seconds, for the other ranks: at start-up and in every collective; '
                             'then the run stops naming the rank that stopped answering '
                             f'(default: {DEFAULT_TIMEOUT_S} = 10 minutes)')


class Ranks(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    distributed: bool


def start(dist_url, timeout_s, backend_for_local_rank):
    """Who this process is, from its launcher's variables; with more than one rank, the process group is
    started too, waiting at most `timeout_s` seconds (--dist-timeout) for the other ranks.

    `backend_for_local_rank` is the device layer's hook that prepares this process for its collective
    backend and names it. Returns Ranks.
    """
    global _heartbeat
    rank, world_size, local_rank, launcher = discover_ranks()
    if world_size <= 1:
        print('Not using distributed mode')
        return Ranks(rank, world_size, local_rank, False)
    received = variables_received(os.environ)
    address, port, port_source = meeting_point(os.environ)
    os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] = address, str(port)
    backend = backend_for_local_rank(local_rank)
    interface = gloo_interface_from_hccl(os.environ) if backend == 'gloo' else None
    if interface:
        os.environ['GLOO_SOCKET_IFNAME'] = interface
    meeting = Meeting(rank, world_size, timeout_s, dist_url, store_address(dist_url, os.environ), port_source,
                      variables_read(os.environ) or launcher, launch_command(os.environ))
    say(f'| distributed init (rank {rank}, {launcher}): {meeting.describe()}')
    say(f'| rank {rank} received: {received or "no HCCL_ or MASTER_ variables"}'
        + (f'; gloo uses interface {interface} (HCCL_SOCKET_IFNAME)' if interface else ''))
    meeting.start_process_group(backend)
    note = mpirun_kill_grace_note(os.environ) if rank == 0 and launcher == 'OpenMPI' else None
    if note:
        say(note)
    setup_for_distributed(rank == 0)
    _heartbeat = Heartbeat(rank, world_size, timeout_s, meeting.store)
    return Ranks(rank, world_size, local_rank, True)


def mpirun_kill_grace_note(environ):
    """A SIGTERM to mpirun starts its kill sequence: SIGCONT, SIGTERM, SIGKILL to every rank, odls_base_sigkill_timeout
    seconds apart (1 s unless set; the demo wrappers set it and turn a SIGTERM into SIGUSR1). A note for the run's log
    when it was left at 1 s: enough to save only where a step is short."""
    if 'OMPI_MCA_odls_base_sigkill_timeout' in environ:
        return None
    return ('| note: a SIGTERM to mpirun leaves the ranks 1 s between its SIGTERM and SIGKILL to save '
            '(odls_base_sigkill_timeout); stop this job with kill -USR1 <mpirun pid>, or start mpirun with '
            '--mca odls_base_sigkill_timeout 30')


def broadcast_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP runs without broadcasting buffers at
    each forward, for speed, so before evaluating and saving, all ranks are made to hold the model that is
    saved."""
    if dist.is_available() and dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, 0)


def say(line):
    """Print a line with one write, so that mpirun does not interleave it with another rank's."""
    sys.stdout.write(line + '\n')
    sys.stdout.flush()


def setup_for_distributed(is_master):
    """Silence print() on every rank but the first, unless a call passes force=True."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            # One write per call (text and line end together): mpirun merges the ranks' outputs write by write.
            line = io.StringIO()
            builtin_print(*args, **{**kwargs, 'file': line, 'flush': False})
            out = kwargs.get('file') or sys.stdout
            out.write(line.getvalue())
            if kwargs.get('flush'):
                out.flush()

    builtins.print = print


class RendezvousFailed(CleanExit):
    """The ranks did not all meet: a missing peer or a port already taken."""


class Meeting:
    """The rendezvous of one rank, and what to tell the user when it fails."""

    def __init__(self, rank, world_size, timeout_s, dist_url, store, port_source, variables, starter):
        self.rank, self.world_size, self.timeout_s, self.dist_url = rank, world_size, timeout_s, dist_url
        self.store = store              # (host, port) of the rendezvous store, None for file://
        self.port_source = port_source  # how MASTER_PORT was chosen (env:// only)
        self.variables, self.starter = variables, starter
        self.where = f'{store[0]}:{store[1]}' if store else dist_url

    def describe(self):
        """One line: where the ranks meet, what said so, how long this rank waits."""
        where = f' at {self.where} (MASTER_PORT: {self.port_source})' if self.dist_url == 'env://' else ''
        return (f'{self.dist_url}{where}; rank and world size from {self.variables}; '
                f'waits up to --dist-timeout {self.timeout_s} s')

    def start_process_group(self, backend):
        self.started = time.monotonic()
        if self.rank > 0 and self.store:
            self.wait_for_rank_zero()
        try:
            dist.init_process_group(backend=backend, init_method=self.dist_url, world_size=self.world_size,
                                    rank=self.rank, timeout=datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as err:  # torch's DistError family is RuntimeError
            raise self.explain(err) from None

    def wait_for_rank_zero(self):
        """Wait for rank 0's store to listen, here rather than in torch, whose client logs a C++ stack
        trace at each retry when the wait is long."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                socket.create_connection(self.store, timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise self.missing_peers(f"nothing answered at {self.where} (rank 0's rendezvous)") from None
                time.sleep(0.2)

    def explain(self, err):
        text = str(err)
        if 'EADDRINUSE' in text or 'address already in use' in text.lower():
            return self.port_taken()
        if not is_timeout(err):
            return err
        joined = re.search(r'(\d+)/(\d+) clients joined', text)
        if joined:
            return self.missing_peers(f'only {joined.group(1)} of {joined.group(2)} ranks joined at {self.where}')
        return self.missing_peers(f'the ranks did not all meet at {self.where} ({text.splitlines()[0]})')

    def missing_peers(self, what):
        waited = time.monotonic() - getattr(self, 'started', time.monotonic() - self.timeout_s)
        after = (f'after {self.timeout_s} s (--dist-timeout)' if waited >= 0.9 * self.timeout_s
                 else f'after {waited:.0f} s (before --dist-timeout {self.timeout_s} s ran out)')
        return RendezvousFailed(
            f'{self.variables}: these variables make this process rank {self.rank} of {self.world_size}, but '
            f'{after} {what}. If this process is not one of a job\'s ranks '
            f'(e.g. a shell inside an allocation), unset {variable_names(self.variables)}; otherwise start all '
            f'{self.world_size} ranks together with {self.starter}')

    def port_taken(self):
        if self.dist_url != 'env://':
            return RendezvousFailed(f'--dist-url {self.dist_url}: the port is already in use on this machine '
                                    '(another job?); give a free port')
        chosen = '' if self.port_source == 'set' else f' ({self.port_source})'
        return RendezvousFailed(
            f'MASTER_PORT={self.store[1]}{chosen}: the port is already in use on this machine (another job?); '
            f'set MASTER_PORT to a free one, e.g. MASTER_PORT={free_port_suggestion()} (with mpirun, also '
            'pass -x MASTER_PORT)')


def variable_names(variables):
    names = [item.split('=')[0] for item in variables.split() if '=' in item]
    return ' '.join(names) if names else 'the launcher variables'


# ---------------------------------------------------------------------------------------------------
# Heartbeats, and the rank that stopped answering

_heartbeat = None


def progress(epoch, step):
    """Note the training step this rank is at (for the timeout report); cheap, never syncs a device."""
    if _heartbeat is not None:
        _heartbeat.record(epoch, step)


class Heartbeat:
    """Writes this rank's wall time and training position to the rendezvous store every few seconds, from a
    thread of its own: a rank that waits in a collective keeps beating, a stopped or frozen one does not.
    (Ages compare wall clocks of different hosts; cluster clocks agree to far better than the timeout.)"""

    KEY = 'heartbeat/{}'

    def __init__(self, rank, world_size, timeout_s, store):
        self.rank, self.world_size, self.timeout_s, self.store = rank, world_size, timeout_s, store
        self.position = None  # (epoch, step) of the last training step begun
        self.interval_s = min(MAX_HEARTBEAT_INTERVAL_S, timeout_s / 10)
        self.first_step = threading.Event()
        if store:
            threading.Thread(target=self._beat, name='heartbeat', daemon=True).start()

    def record(self, epoch, step):
        first = self.position is None
        self.position = (epoch, step)
        if first:  # beat at once: the start of training is where a rank is most often reported from
            self.first_step.set()

    def _beat(self):
        try:
            client = store_client(self.store, self.timeout_s)
            while True:
                client.set(self.KEY.format(self.rank), json.dumps({'time': time.time(), 'position': self.position}))
                if self.first_step.wait(self.interval_s):
                    self.first_step.clear()
        except RuntimeError:  # the store is gone (rank 0 ended) or stopped answering: nothing left to tell
            return

    def report(self):
        return timeout_report(self.rank, self.world_size, self.timeout_s, self.store)


def timeout_report(rank, world_size, timeout_s, store, answer_wait_s=STORE_ANSWER_WAIT_S):
    """One line on why a collective of `rank` timed out, from the heartbeats in the store."""
    limit = f'the process group timed out after --dist-timeout {timeout_s} s'
    if not store:
        return f'a rank stopped answering (no heartbeats without a TCP rendezvous); {limit}'
    beats = read_heartbeats(store, world_size, answer_wait_s)
    if beats is None:
        return (f'rank 0 stopped answering (its rendezvous store at {store[0]}:{store[1]} did not answer within '
                f'{answer_wait_s:.0f} s either); {limit}')
    now = time.time()
    silent = {other: beat for other, beat in beats.items()
              if other != rank and (beat is None or now - beat['time'] > timeout_s / 2)}
    if silent:
        return f'{stopped_ranks(silent, now)}; {limit}'
    return (f'every rank still sends heartbeats, but a collective waited in vain: a rank is stuck or runs other '
            f'steps ({positions(beats)}); {limit}')


def store_client(address, timeout_s):
    return dist.TCPStore(address[0], address[1], is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


ABANDONED_READ_TIMEOUT_S = 3600  # the reader's own timeout; only its caller's wait counts


def read_heartbeats(address, world_size, wait_s):
    """{rank: heartbeat or None} from the store, or None when it does not answer within wait_s (a stopped
    store holder never answers: the read runs in a thread that is left behind)."""
    beats = {}

    def read():
        try:
            client = store_client(address, ABANDONED_READ_TIMEOUT_S)  # longer than the wait: no C++ log
            for rank in range(world_size):
                key = Heartbeat.KEY.format(rank)
                beats[rank] = json.loads(client.get(key)) if client.check([key]) else None
        except RuntimeError:  # the store timed out or closed: the caller sees the beats missing
            return

    reader = threading.Thread(target=read, name='heartbeat reader', daemon=True)
    reader.start()
    reader.join(wait_s)
    return None if reader.is_alive() or len(beats) < world_size else beats


def stopped_ranks(silent, now):
    ranks = sorted(silent)
    details = []
    for rank in ranks[:4]:
        beat = silent[rank]
        heard = 'never heard' if beat is None else (f'last heard {now - beat["time"]:.0f} s ago, '
                                                   f'{position_text(beat["position"])}')
        details.append(heard if len(ranks) == 1 else f'rank {rank} {heard}')
    more = f'; {len(ranks) - 4} more' if len(ranks) > 4 else ''
    who = f'rank {ranks[0]}' if len(ranks) == 1 else 'ranks ' + ', '.join(map(str, ranks))
    return f'{who} stopped answering ({"; ".join(details)}{more})'


def position_text(position):
    return 'before its first training step' if position is None else f'at epoch {position[0]} step {position[1]}'


def positions(beats):
    return ', '.join(f'rank {rank} {position_text(beat["position"] if beat else None)}'
                     for rank, beat in sorted(beats.items())[:8])


class PeerStopped(CleanExit):
    """A collective failed because another rank stopped answering or ended."""


def is_timeout(err):
    return re.search(r'timed out|timeout', str(err), re.IGNORECASE) is not None


def from_collectives(err):
    """torch.distributed's own errors, and gloo's (plain RuntimeErrors that name their source file)."""
    return isinstance(err, dist.DistError) or re.search(r'gloo|nccl|hccl|c10d', str(err), re.IGNORECASE)


def peer_ended(err):
    """gloo's words for a peer whose process ended, e.g. 'Connection closed by peer [10.0.0.2]:4312'."""
    found = re.search(r'Connection (?:closed|reset) by peer( \S+\d)?', str(err))
    return found.group(0) if found else None


def end_process_groups():
    """Destroy the process groups of a run that ended as planned. Left to the interpreter's exit, gloo's worker
    threads can abort a rank that finished ("terminate called without an active exception", exit 134: seen on
    rank 1 of a finished 2-rank run; pytorch issue 190489)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reporting_stopped_peers(main):
    """`main`, where a collective that fails because another rank stopped answering (a timeout) or ended
    (its connection closed) ends the run with one line instead of a traceback: exit status 1."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
            end_process_groups()
            return result
        except RuntimeError as err:  # gloo's errors and torch's DistError family
            if _heartbeat is None:
                raise
            if is_timeout(err) and from_collectives(err):
                raise PeerStopped(_heartbeat.report()) from None
            if peer_ended(err):
                raise PeerStopped(f'another rank ended ({peer_ended(err)}), so this rank stops too; that '
                                  'rank\'s own output says why') from None
            raise
    return run
