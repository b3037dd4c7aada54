"""Distributed start-up, and one clear line when the ranks do not meet or one stops answering.

Which rank a process is comes from its launcher's variables (mpirun, torchrun, SLURM). The ranks meet at
MASTER_ADDR:MASTER_PORT; under a launcher that names its job, a port derived from the job's id stands in for
an unset MASTER_PORT, so that two jobs on one machine do not collide. Every wait (the rendezvous and each
collective) is bounded by --dist-timeout. Each rank sends a heartbeat to the rendezvous store from a thread,
so that when a collective times out, the ranks still running can tell which rank stopped answering; a watch
beside it (PeerWatch) gives the same lines from those heartbeats and a small gloo group of its own when the
main backend does not raise (NCCL's watchdog aborts the process instead).
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

import torch
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
    global _heartbeat, _watch
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
    if meeting.store:  # every rank or none: they share the --dist-url
        _watch = watch_peers(_heartbeat, timeout_s)
    return Ranks(rank, world_size, local_rank, True)


def watch_peers(heartbeat, timeout_s):
    """Start this rank's PeerWatch, with its liveness group (gloo, created by every rank here)."""
    group = dist.new_group(backend='gloo', timeout=datetime.timedelta(seconds=timeout_s))
    return PeerWatch(heartbeat, Liveness(group), judges_silence=timeout_s >= JUDGES_SILENCE_FROM_TIMEOUT_S).start()


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
_watch = None


def progress(epoch, step):
    """Note the training step this rank is at (for the timeout report); cheap, never syncs a device."""
    if _heartbeat is not None:
        _heartbeat.record(epoch, step)


class Heartbeat:
    """Writes this rank's wall time and training position to the rendezvous store every few seconds, from a
    thread of its own: a rank that waits in a collective keeps beating, a stopped or frozen one does not.
    (Ages compare wall clocks of different hosts; cluster clocks agree to far better than the timeout.)

    While a PeerWatch watches, each round also reads every rank's heartbeat, noting on this host's monotonic
    clock when each one last changed (no clock of another host counts there). A rank whose run ends as
    planned says so in its last heartbeat ('ended': 'finished'), so that the others do not take its closing
    connections for a failure."""

    KEY = 'heartbeat/{}'

    def __init__(self, rank, world_size, timeout_s, store):
        self.rank, self.world_size, self.timeout_s, self.store = rank, world_size, timeout_s, store
        self.position = None  # (epoch, step) of the last training step begun
        self.interval_s = min(MAX_HEARTBEAT_INTERVAL_S, timeout_s / 10)
        self.ended = None  # 'finished' once this rank's run has ended as planned
        self.watching = False
        self.latest = (0.0, {})  # (monotonic time the read began, {rank: heartbeat or None})
        self.answered_at = time.monotonic()  # when the store last answered a whole round
        self.heard_at = dict.fromkeys(range(world_size), self.answered_at)  # when each beat last changed
        self.store_lost = False
        self.wake = threading.Event()
        self.thread = None
        if store:
            self.thread = threading.Thread(target=self._beat, name='heartbeat', daemon=True)
            self.thread.start()

    def record(self, epoch, step):
        first = self.position is None
        self.position = (epoch, step)
        if first:  # beat at once: the start of training is where a rank is most often reported from
            self.wake.set()

    def beat_text(self):
        return json.dumps({'time': time.time(), 'position': self.position, 'ended': self.ended})

    def _beat(self):
        try:
            client = store_client(self.store, self.timeout_s)
            while self.ended is None:
                client.set(self.KEY.format(self.rank), self.beat_text())
                if self.watching:
                    began = time.monotonic()
                    self.take_in(began, beats_in(client, self.world_size))
                self.answered_at = time.monotonic()
                if self.wake.wait(self.interval_s):
                    self.wake.clear()
        except RuntimeError:  # the store is gone (rank 0 ended) or stopped answering: nothing left to tell
            self.store_lost = True

    def take_in(self, began, beats):
        previous = self.latest[1]
        for rank, beat in beats.items():
            if beat != previous.get(rank):
                self.heard_at[rank] = began
        self.latest = (began, beats)

    def forgive(self, now):
        """This process was itself stopped or starved: what its clock saw of the others does not count."""
        self.answered_at = now
        self.heard_at = dict.fromkeys(self.heard_at, now)

    def silent_peers(self, after_s):
        """{rank: last heartbeat or None} of the other ranks whose heartbeat has not changed over after_s of
        rounds the store answered. Counted to the last answered round, not to now: while the store itself is
        silent (rank 0 frozen), every beat read before looks a little staler than the store's last answer,
        and it is the store that must be named."""
        beats = self.latest[1]
        return {rank: beats.get(rank) for rank, heard in self.heard_at.items()
                if rank != self.rank and self.answered_at - heard > after_s}

    def a_rank_finished(self):
        return any(beat and beat.get('ended') == 'finished' for beat in self.latest[1].values())

    def fresh_beats(self, wait_s):
        """The heartbeats of a round that began after this call, or None when the store does not give them
        within wait_s."""
        asked = time.monotonic()
        self.wake.set()
        while time.monotonic() < asked + wait_s and not self.store_lost:
            began, beats = self.latest
            if began >= asked:
                return beats
            time.sleep(0.05)
        return None

    def finish(self, wait_s):
        """Mark this rank's run as ended as planned; on rank 0, whose store holds the marks, wait up to wait_s
        for every rank's mark before the store goes with this process."""
        self.ended = 'finished'
        self.wake.set()
        if self.thread is None:
            return
        self.thread.join(STORE_ANSWER_WAIT_S)  # a beat in flight lands before the mark
        try:
            client = store_client(self.store, self.timeout_s)
            key = self.KEY.format(self.rank)
            client.set(key, self.beat_text())
            client.check([key])  # an answer: the store holds the mark before this rank's connections close
            deadline = time.monotonic() + wait_s
            while self.rank == 0 and time.monotonic() < deadline and not all_ended(beats_in(client, self.world_size)):
                time.sleep(0.1)
        except RuntimeError:  # the store is gone: no one is left to read the mark
            return

    def report(self):
        return timeout_report(self.rank, self.world_size, self.timeout_s, self.store)


def beats_in(client, world_size):
    """{rank: heartbeat or None} as the store holds them now (one request when every rank has beaten and this
    torch has multi_get)."""
    keys = [Heartbeat.KEY.format(rank) for rank in range(world_size)]
    if hasattr(client, 'multi_get') and client.check(keys):
        return {rank: json.loads(value) for rank, value in enumerate(client.multi_get(keys))}
    return {rank: json.loads(client.get(key)) if client.check([key]) else None for rank, key in enumerate(keys)}


def all_ended(beats):
    return all(beat and beat.get('ended') for beat in beats.values())


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
            beats.update(beats_in(client, world_size))
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


def ended_line(words):
    return f'another rank ended ({words}), so this rank stops too; that rank\'s own output says why'


def peer_failure(err):
    """PeerStopped with the line for `err` when a collective failed because another rank stopped answering
    (a timeout) or ended (its connection closed); None for any other error."""
    if not isinstance(err, RuntimeError):  # gloo's errors and torch's DistError family are RuntimeErrors
        return None
    if is_timeout(err) and from_collectives(err):
        return PeerStopped(_heartbeat.report())
    if peer_ended(err):
        return PeerStopped(ended_line(peer_ended(err)))
    return None


def end_process_groups():
    """Destroy the process groups of a run that ended as planned, once every rank knows it did (heartbeat
    marks, so that the ranks' watchers do not take the closing connections for a failure). Left to the
    interpreter's exit, gloo's worker threads can abort a rank that finished ("terminate called without an
    active exception", exit 134: seen on rank 1 of a finished 2-rank run; pytorch issue 190489)."""
    if _heartbeat is not None:
        _heartbeat.finish(wait_s=FINISH_WAIT_S)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def reporting_stopped_peers(main):
    """`main`, where a collective that fails because another rank stopped answering (a timeout) or ended
    (its connection closed) ends the run with one line instead of a traceback: exit status 1. Beside it, the
    PeerWatch of a distributed run says the same from the heartbeats and the liveness group, when the main
    backend does not raise (NCCL's watchdog aborts the process); whichever comes first has the last word."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            result = main(*args, **kwargs)
        except BaseException as err:
            if _watch is not None:
                _watch.take_last_word()
            failure = peer_failure(err) if _heartbeat is not None else None
            if failure:
                raise failure from None
            raise
        if _watch is not None:
            _watch.take_last_word()
        end_process_groups()
        return result
    return run


# ---------------------------------------------------------------------------------------------------
# The watch: the same lines when the main backend does not raise

# A rank whose heartbeat has not changed for this long is frozen (SIGSTOP, a hung host) or gone: three
# heartbeat intervals at the longest interval (5 s), so more intervals where --dist-timeout makes them shorter.
# A rank that computes, evaluates, saves or compiles keeps beating: its heartbeat thread runs beside that.
SILENT_AFTER_S = 3 * MAX_HEARTBEAT_INTERVAL_S
# Silence is judged only where the verdict (at most SILENT_AFTER_S + an interval + a tick after the last beat) comes
# well before the process group's own timeout, NCCL's watchdog included; with shorter timeouts that timeout
# comes first and, on gloo, names the rank as before.
JUDGES_SILENCE_FROM_TIMEOUT_S = 2 * SILENT_AFTER_S
# How often the watch looks: the liveness group's all-reduce (a closed connection is news within a tick) and
# the silence, from the heartbeats read once per interval.
WATCH_TICK_S = 0.5
# How long rank 0, at a planned end, waits for the other ranks' marks before its store goes.
FINISH_WAIT_S = SILENT_AFTER_S
LAST_WORD_WAIT_S = 10.0


class Liveness:
    """A tiny all-reduce after another on a gloo group of its own, from the watch's thread: a rank whose
    process ended closes its connections, and gloo says so at once ('Connection closed by peer'), whatever
    the main backend does meanwhile; a frozen rank only leaves the all-reduce waiting."""

    def __init__(self, group):
        self.group, self.work, self.ended = group, None, None

    def poll(self):
        """(monotonic time, gloo's words) once an all-reduce failed because a rank ended; None until then."""
        if self.ended or self.group is None:
            return self.ended
        try:
            if self.work is None:
                self.work = dist.all_reduce(torch.zeros(1), group=self.group, async_op=True)
            if self.work.is_completed():
                self.work.wait()
                self.work = None
        except RuntimeError as err:  # a failed gloo group is done with; only a rank's end is news here
            self.group = None
            words = peer_ended(err)
            self.ended = (time.monotonic(), words) if words else None
        return self.ended


class PeerWatch:
    """Watches the other ranks from a thread of this one, through the heartbeats and the liveness group, and
    ends this rank with the line the failed collective would give (exit status 1) when another rank ended or,
    where `judges_silence`, has been silent for `silent_after_s`: NCCL ends a collective that cannot complete
    by aborting the process after --dist-timeout (its watchdog), not with a Python exception.

    The main thread takes the last word as the run ends, however it ends (take_last_word): from then on the
    watch says nothing, and the one line of a failure comes from one of them only."""

    def __init__(self, heartbeat, liveness, judges_silence, silent_after_s=SILENT_AFTER_S):
        self.heartbeat, self.liveness = heartbeat, liveness
        self.judges_silence, self.silent_after_s = judges_silence, silent_after_s
        self.last_word = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name='peer watch', daemon=True)

    def start(self):
        self.heartbeat.watching = True
        self.thread.start()
        return self

    def _watch(self):
        last = time.monotonic()
        while not self.stopping.wait(WATCH_TICK_S):
            now = time.monotonic()
            if now - last > self.heartbeat.interval_s:  # late by more than a heartbeat: this process was stopped
                self.heartbeat.forgive(now)
            last = now
            line = self.verdict(now)
            if line:
                self.end_this_rank(line)
                return

    def verdict(self, now):
        """The failure line when another rank ended or went silent, else None."""
        if self.heartbeat.a_rank_finished():  # the run ends as planned: closing connections are no news
            self.stopping.set()
            return None
        ended = self.liveness.poll() if self.liveness else None
        if ended:
            beats = self.heartbeat.fresh_beats(STORE_ANSWER_WAIT_S)  # read after the connection closed
            if beats and any(beat and beat.get('ended') == 'finished' for beat in beats.values()):
                self.stopping.set()
                return None
            return ended_line(ended[1])
        if self.judges_silence:
            return self.silence(now)
        return None

    def silence(self, now):
        hb = self.heartbeat
        rather = f'so this rank stops now rather than wait out --dist-timeout {hb.timeout_s} s'
        if hb.rank != 0 and now - hb.answered_at > self.silent_after_s:
            where = f'{hb.store[0]}:{hb.store[1]}'
            return (f'rank 0 stopped answering (its rendezvous store at {where} did not answer for '
                    f'{self.silent_after_s:.0f} s), {rather}')
        silent = hb.silent_peers(self.silent_after_s)
        if silent:
            return f'{stopped_ranks(silent, time.time())}; no heartbeat for {self.silent_after_s:.0f} s, {rather}'
        return None

    def end_this_rank(self, line):
        """Print the line and end the process (the main thread may be inside a collective that never
        returns), unless the main thread already took the last word. Loader workers end with the process
        (they watch its pidfd)."""
        if not self.last_word.acquire(blocking=False):
            return
        sys.stderr.write(f'error: {line}\n')  # as cli.run_cli writes a CleanExit
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(PeerStopped.exit_code)

    def take_last_word(self):
        """From the main thread as the run ends: the watch stops and stays silent. Should the watch already be
        printing its line, wait for it to end the process."""
        if not self.last_word.acquire(blocking=False):
            time.sleep(LAST_WORD_WAIT_S)
            os._exit(PeerStopped.exit_code)
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(STORE_ANSWER_WAIT_S + WATCH_TICK_S)
