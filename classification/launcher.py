"""The one launcher behind demo_resnet.py, demo_mobilenet.py and demo_googlenet.py.

A demo wrapper is a parser plus a function that turns its flags into the trainer's argument list;
everything else is here: the flags the wrappers share, where the ranks go (this machine or the hosts in
MULTI_HLS_IPS), the mpirun line that puts them there (Habana's TrainingRunner 1.4.0), `--dry-run`,
and running the trainer so that its exit status becomes the wrapper's.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from . import cli, faults, recipes, REPO_ROOT
from .cli import UsageError

HERE = REPO_ROOT  # the trainers and the op lists

# What TrainingRunner forwards to every host with `mpirun -x` when it is set (its order).
FORWARDED_VARIABLES = (
    'MAX_WAIT_ATTEMPTS', 'LOG_LEVEL_ALL', 'LOG_LEVEL_SYN_API', 'LD_LIBRARY_PATH', 'PYTORCH_MODULES_ROOT_PATH',
    'BUILD_ROOT_LATEST', 'PYTHONPATH', 'HABANA_LOGS', 'GC_KERNEL_PATH', 'HCCL_BOX_SIZE', 'HCCL_OVER_TCP',
    'HCCL_COMM_ID', 'HCCL_SOCKET_IFNAME', 'SOCKET_NTHREADS', 'NSOCK_PERTHREAD', 'HCCL_DEFAULT_NIC_COUNT',
    'PT_HCCL_SLICE_SIZE_MB', 'HCCL_OVER_OFI', 'MULTI_HLS_IPS', 'https_proxy', 'HTTPS_PROXY', 'http_proxy',
    'HTTP_PROXY', 'MULTI_STREAMS_ENABLE',
)
DEFAULT_MASTER_PORT = '12345'
DEFAULT_SSHD_PORT = '3022'
DEFAULT_MPI_ROOT = '/usr/local/openmpi'  # Habana's container
# mpirun (OpenMPI 4.1) ends a job it is told to stop, or whose rank died, by sending each rank SIGCONT, then
# SIGTERM, then SIGKILL, odls_base_sigkill_timeout seconds apart: 1 s by default, too short for a rank to
# finish its step and save. Launched ranks get this much instead, unless the user set it.
MPIRUN_KILL_GRACE_VARIABLE = 'OMPI_MCA_odls_base_sigkill_timeout'
MPIRUN_KILL_GRACE = '5'

# The Habana README spells one flag with a single dash (multinode example vi); read it as meant.
SINGLE_DASH_SPELLINGS = {'-custom-lr-values': '--custom-lr-values',
                         '-custom-lr-milestones': '--custom-lr-milestones'}

DECIMAL = re.compile(r'^([0-9]+)?[.][0-9]+$')
WHOLE_NUMBER = re.compile(r'^[0-9]+$')

ORIGINAL_DEFAULT_DATA_PATH = '/root/software/data/pytorch/imagenet/ILSVRC2012/'

# ---------------------------------------------------------------------------------------------------
# This machine's cores


@dataclass(frozen=True)
class Topology:
    cores: int    # physical cores this process may run on
    sockets: int


def detected_topology():
    """Physical cores = distinct (socket, core) pairs among the CPUs this process may use."""
    pairs = set()
    for cpu in os.sched_getaffinity(0):
        folder = f'/sys/devices/system/cpu/cpu{cpu}/topology'
        try:
            pairs.add((read_int(f'{folder}/physical_package_id'), read_int(f'{folder}/core_id')))
        except (OSError, ValueError):  # no sysfs topology: count the CPU as a core of its own
            pairs.add((0, cpu))
    return Topology(cores=len(pairs), sockets=len({socket for socket, _ in pairs}))


def read_int(path):
    with open(path) as f:
        return int(f.read())


def host_topology(environ):
    """This machine's topology; DEMO_PHYSICAL_CORES / DEMO_CPU_SOCKETS stand in for other hosts."""
    detected = detected_topology()
    return Topology(cores=positive_int_variable(environ, 'DEMO_PHYSICAL_CORES', detected.cores),
                    sockets=positive_int_variable(environ, 'DEMO_CPU_SOCKETS', detected.sockets))


def positive_int_variable(environ, name, default):
    value = environ.get(name, '').strip()
    if not value:
        return default
    if not WHOLE_NUMBER.match(value) or int(value) < 1:
        raise UsageError(f"{name}: expected a whole number of at least 1, got '{value}'")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Where the ranks go


@dataclass(frozen=True)
class Placement:
    world_size: int
    hosts: tuple = ()          # empty: every rank on this machine
    process_per_node: int = 0  # ranks on each host (multi-node only)


def multi_node_hosts(environ):
    """The hosts in MULTI_HLS_IPS (the part of each entry before a '-', as the original)."""
    value = environ.get('MULTI_HLS_IPS', '').strip()
    if not value:
        return ()
    hosts = tuple(entry.split('-')[0].strip() for entry in value.split(','))
    if not all(hosts):
        raise UsageError(f"MULTI_HLS_IPS: empty host in '{value}'; give addresses separated by commas")
    return hosts


def place_ranks(world_size, process_per_node, environ):
    """Spread world_size ranks over MULTI_HLS_IPS when it is set, else keep them on this machine."""
    if world_size < 1:
        raise UsageError(f'--world-size must be at least 1, got {world_size}')
    hosts = multi_node_hosts(environ)
    if world_size == 1 or not hosts:
        return Placement(world_size)
    if world_size % len(hosts):
        raise UsageError(f'--world-size {world_size} does not divide evenly over the {len(hosts)} hosts in '
                         f'MULTI_HLS_IPS; use a multiple of {len(hosts)}')
    per_host = world_size // len(hosts)
    if process_per_node and process_per_node != per_host:
        raise UsageError(f'--process-per-node {process_per_node} does not match --world-size {world_size} over '
                         f'the {len(hosts)} hosts in MULTI_HLS_IPS ({per_host} per host); '
                         f'set --process-per-node {per_host}')
    return Placement(world_size, hosts, per_host)


def check_slurm_allocation(placement, environ):
    """Inside a SLURM allocation (SLURM_JOB_ID) the wrapper's mpirun places its ranks on the allocation's task
    slots (SLURM_TASKS_PER_NODE), so a --world-size beyond them is refused here, in one line, instead of by
    mpirun's page of text; and so is a wrapper started as several tasks of a step (srun -n N), each of which would
    start a job of its own."""
    job = environ.get('SLURM_JOB_ID')
    if not job or placement.world_size == 1:
        return
    step_tasks = environ.get('SLURM_STEP_NUM_TASKS', '')
    if step_tasks.isdigit() and int(step_tasks) > 1:
        raise UsageError(f'this wrapper is one of {step_tasks} tasks of SLURM step {job}.{environ.get("SLURM_STEP_ID")} '
                         f'(srun -n {step_tasks}), and each would start its own {placement.world_size} ranks: run it '
                         'once in the job script, without srun (its mpirun uses the allocation), or start train.py '
                         f'itself with srun -n {placement.world_size}')
    tasks_per_node = environ.get('SLURM_TASKS_PER_NODE', '')
    slots = allocation_slots(tasks_per_node)
    if not placement.hosts and slots and placement.world_size > slots:
        raise UsageError(f'--world-size {placement.world_size}: SLURM job {job} has {slots} task slot(s) '
                         f'(SLURM_TASKS_PER_NODE={tasks_per_node}), where mpirun places the ranks; ask for '
                         f'{placement.world_size} (#SBATCH --ntasks={placement.world_size}) or lower --world-size')


def allocation_slots(tasks_per_node):
    """The task slots of SLURM_TASKS_PER_NODE ('2(x3),1': 7); 0 when it cannot be read."""
    total = 0
    for entry in filter(None, tasks_per_node.split(',')):
        match = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', entry.strip())
        if not match:
            return 0
        total += int(match.group(1)) * int(match.group(2) or 1)
    return total


# ---------------------------------------------------------------------------------------------------
# The command line


@dataclass
class Launch:
    command: list
    exports: dict = field(default_factory=dict)  # set in the launched process's environment
    notice: str = ''                             # one line for the user, when the run is not as asked
    mpi_prefix: str = ''                         # multi-node: which OpenMPI --prefix names, and why


def plan_launch(trainer_command, placement, topology, environ):
    """The full command for `trainer_command` (interpreter, script, arguments) on `placement`."""
    if placement.world_size == 1:
        return Launch(list(trainer_command))
    if placement.hosts:
        return multi_node_launch(trainer_command, placement, topology, environ)
    return single_node_launch(trainer_command, placement.world_size, topology, environ)


def single_node_launch(trainer_command, ranks, topology, environ):
    cores_per_rank = topology.cores // ranks
    if cores_per_rank:
        return Launch(['mpirun', '-n', str(ranks), '--bind-to', 'core', '--map-by', f'slot:PE={cores_per_rank}',
                       '--rank-by', 'core', '--report-bindings', '--allow-run-as-root', *trainer_command])
    # The original failed here; a laptop or CI box can still run it, only slower.
    threads = environ.get('OMP_NUM_THREADS')
    exports = {} if threads else {'OMP_NUM_THREADS': '1'}
    notice = (f'note: {ranks} ranks on {topology.cores} physical cores: running oversubscribed and unbound '
              f'(mpirun --oversubscribe --bind-to none) with OMP_NUM_THREADS={threads or 1}')
    return Launch(['mpirun', '-n', str(ranks), '--oversubscribe', '--bind-to', 'none', '--rank-by', 'core',
                   '--allow-run-as-root', *trainer_command], exports, notice)


def multi_node_launch(trainer_command, placement, topology, environ):
    """TrainingRunner's multi-host line: hosts with slots, ssh port, forwarded variables, master address."""
    per_host = placement.process_per_node
    cores_per_rank = topology.cores // per_host
    first_host = placement.hosts[0]
    prefix, prefix_source = mpi_prefix(environ)
    prefix_line = f'mpirun --prefix {prefix} (where each host finds orted): {prefix_source}'
    command = ['mpirun', '--allow-run-as-root', *forwarded_variables(environ),
               '--prefix', prefix, *tcp_network(first_host),
               '-x', f'MASTER_ADDR={first_host}',
               '-x', f'MASTER_PORT={environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT}',
               '--mca', 'plm_rsh_args', f'-p {environ.get("DOCKER_SSHD_PORT") or DEFAULT_SSHD_PORT}']
    if cores_per_rank:
        slots = per_host * cores_per_rank
        command += ['--bind-to', 'core', '-H', host_slots(placement.hosts, slots), '-n', str(placement.world_size),
                    '--map-by', f'{ranks_per_host_mapping(per_host, topology.sockets)}:PE={cores_per_rank}',
                    '--rank-by', 'core', '--report-bindings']
        return Launch(command + list(trainer_command), mpi_prefix=prefix_line)
    command += ['--bind-to', 'none', '-H', host_slots(placement.hosts, per_host), '-n', str(placement.world_size),
                '--map-by', f'ppr:{per_host}:node', '--rank-by', 'core']
    notice = (f'note: {per_host} ranks per host but {topology.cores} physical cores here: running unbound '
              '(set DEMO_PHYSICAL_CORES to the hosts\' core count to bind)')
    return Launch(command + list(trainer_command), notice=notice, mpi_prefix=prefix_line)


def mpi_prefix(environ):
    """(prefix, where it came from): MPI_ROOT, else the installation of the mpirun on PATH, else Habana's
    container's /usr/local/openmpi (the original's only choice after MPI_ROOT). In Habana's container, which
    sets MPI_ROOT=/usr/local/openmpi and has its mpirun there, all three give the original's line."""
    if environ.get('MPI_ROOT'):
        return environ['MPI_ROOT'], 'MPI_ROOT'
    mpirun = shutil.which('mpirun', path=environ.get('PATH'))
    if mpirun:
        return (os.path.dirname(os.path.dirname(os.path.realpath(mpirun))),
                f'the installation of {mpirun} on PATH, MPI_ROOT being unset')
    return DEFAULT_MPI_ROOT, "Habana's container's OpenMPI, MPI_ROOT being unset and no mpirun on PATH"


def forwarded_variables(environ):
    exports = []
    for name in FORWARDED_VARIABLES:
        if environ.get(name):
            exports += ['-x', f'{name}={environ[name]}']
    return exports


def tcp_network(first_host):
    """`--mca btl_tcp_if_include a.b.c.0/16` from the first host's IPv4 address (none for host names)."""
    octets = first_host.split('.')
    if len(octets) != 4 or not all(WHOLE_NUMBER.match(octet) for octet in octets):
        return []
    return ['--mca', 'btl_tcp_if_include', '.'.join(octets[:3] + ['0']) + '/16']


def host_slots(hosts, slots):
    return ','.join(f'{host}:{slots}' for host in hosts)


def ranks_per_host_mapping(per_host, sockets):
    """Ranks per socket when they split evenly over the sockets (the original also used it when they did
    not, which leaves ranks unplaced), else ranks per node."""
    if per_host >= sockets and per_host % sockets == 0:
        return f'ppr:{per_host // sockets}:socket'
    return f'ppr:{per_host}:node'


# ---------------------------------------------------------------------------------------------------
# Dry run and real run


def print_dry_run(launch):
    """What would run, ready to paste into a shell: comments, exports, then the command."""
    print('# --dry-run: nothing was started. To run it yourself:')
    forwarded = [launch.command[i + 1] for i, arg in enumerate(launch.command) if arg == '-x']
    if forwarded:
        print('# forwarded to every rank with mpirun -x: ' + ' '.join(forwarded))
    if launch.mpi_prefix:
        print(f'# {launch.mpi_prefix}')
    if launch.command[0] == 'mpirun':
        print(f'# runs with {MPIRUN_KILL_GRACE_VARIABLE}={MPIRUN_KILL_GRACE} unless set (time for ranks to save '
              'when mpirun is signalled)')
    for name, value in launch.exports.items():
        print(f'export {name}={shlex.quote(value)}')
    print(shlex.join(launch.command), flush=True)


def run(launch):
    """Run the command (no shell) and return its exit status, 128+N when signal N ended it.

    The command runs in a process group of its own, and the wrapper passes signals on: a stop signal
    (cli.STOP_SIGNALS) to the wrapper or to its whole group, as schedulers send it, reaches the trainer as
    a request to finish its step and save; to mpirun it goes as SIGUSR1, which mpirun forwards to every
    rank and then waits for them (SIGTERM would make mpirun kill them after odls_base_sigkill_timeout).
    SIGINT (Ctrl-C) is passed on as it is. When the wrapper dies, however it dies (kill -9 included), the
    command gets the same stop signal (faults.die_with_parent): every rank, on every host, finishes its step,
    rank 0 saves, and the job ends as after a SIGTERM to the wrapper. (A SIGTERM to mpirun would run its kill
    sequence instead, which across hosts ends rank 0's store before the other hosts' ranks agree on a step.)
    """
    if launch.mpi_prefix:
        print(launch.mpi_prefix)
    print('command = ' + shlex.join(launch.command), flush=True)
    env = {**os.environ, **launch.exports}
    through_mpirun = launch.command[0] == 'mpirun'
    if through_mpirun:
        env.setdefault(MPIRUN_KILL_GRACE_VARIABLE, MPIRUN_KILL_GRACE)
    stop_as = signal.SIGUSR1 if through_mpirun else signal.SIGTERM
    try:
        child = subprocess.Popen(launch.command, env=env, process_group=0,
                                 preexec_fn=faults.die_with_parent(stop_as, os.getpid()))
    except FileNotFoundError:
        raise UsageError(f"{launch.command[0]} not found on PATH: install OpenMPI (e.g. apt-get install "
                         "openmpi-bin) or run with --world-size 1") from None

    def pass_on_stop(signum, frame):
        child.send_signal(stop_as)  # first: after a SIGHUP the terminal the line goes to may be gone
        try:
            print(f'{signal.Signals(signum).name} received: asking the trainer to stop after its step and save'
                  + (' (SIGUSR1 through mpirun, which forwards it to every rank)' if through_mpirun else ''),
                  file=sys.stderr, flush=True)
        except OSError:
            pass

    handlers = dict.fromkeys(cli.STOP_SIGNALS, pass_on_stop)
    handlers[signal.SIGINT] = lambda *_: child.send_signal(signal.SIGINT)
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    with child:
        try:
            status = child.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    return status if status >= 0 else 128 - status


def read_single_dash_spellings(argv):
    fixed = []
    for arg in argv:
        name, equals, value = arg.partition('=')
        if name in SINGLE_DASH_SPELLINGS:
            print(f"note: reading '{name}' as '{SINGLE_DASH_SPELLINGS[name]}'", file=sys.stderr, flush=True)
            arg = SINGLE_DASH_SPELLINGS[name] + equals + value
        fixed.append(arg)
    return fixed


# The demos' spellings of trainer flags that recipes set under train.py's names.
RECIPE_FLAG_SPELLINGS = {'--learning-rate': '--lr', '--weight-decay': '--wd'}


def with_recipe(command, parser, argv, args, world_size):
    """The trainer arguments with --recipe: the demo's own defaults give way to the recipe's values (a flag the
    recipe sets is passed on only when given on the demo's command line), then --recipe itself."""
    if args.recipe == recipes.DEFAULT:
        return command
    recipe = recipes.RECIPES[args.recipe]
    model = getattr(args, 'model', 'googlenet')
    given_dests = recipes.given_dests(parser, argv)
    batch = args.batch_size if 'batch_size' in given_dests else \
        recipes.recipe_batch_size(recipe, model, args.batch_size)
    tokens, _ = recipe.flags(model, world_size * batch) if not recipe.models or model in recipe.models else ([], [])
    recipe_flags = {token for token in tokens if token.startswith('--')}
    given = {flag for action in parser._actions for flag in action.option_strings
             if action.dest in given_dests}

    def dropped(item):
        flag = item.partition('=')[0]
        return RECIPE_FLAG_SPELLINGS.get(flag, flag) in recipe_flags and flag not in given
    return [item for item in command if not dropped(item)] + ['--recipe', args.recipe]


def print_schedule(trainer, command, world_size):
    """--print-schedule: the trainer prints the schedule for the world size, once, without mpirun."""
    return subprocess.call([sys.executable, os.path.join(HERE, trainer), *command, f'--world-size={world_size}',
                            '--print-schedule'])


def launch_demo(parser, trainer_args, trainer, print_namespace, argv):
    argv = read_single_dash_spellings(argv)
    args = parser.parse_args(argv)
    recipes.check_name(args.recipe)
    if args.recipe == 'list':
        print(recipes.listing())
        return 0
    if print_namespace:
        print(args)
    world_size = 8 if args.dist and args.world_size == 1 else args.world_size  # as the originals
    placement = place_ranks(world_size, args.process_per_node, os.environ)
    check_slurm_allocation(placement, os.environ)
    command = with_recipe(trainer_args(args, placement.process_per_node or None), parser, argv, args, world_size)
    if args.print_schedule:
        return print_schedule(trainer, command, world_size)
    trainer_command = [sys.executable, os.path.join(HERE, trainer), *command, *dist_timeout_args(args.dist_timeout),
                       *switches(args, ('--tensorboard',))]
    launch = plan_launch(trainer_command, placement, host_topology(os.environ), os.environ)
    if launch.notice:
        print(launch.notice, file=sys.stderr, flush=True)
    if args.dry_run:
        print_dry_run(launch)
        return 0
    return run(launch)


def main(parser, trainer_args, trainer, print_namespace=False):
    """A demo wrapper's entry point: `trainer_args(args, process_per_node)` gives the trainer's arguments,
    process_per_node being None unless the run spans hosts. Exits with the trainer's status."""
    sys.exit(cli.run_cli(launch_demo, parser, trainer_args, trainer, print_namespace, sys.argv[1:]))


# ---------------------------------------------------------------------------------------------------
# Flags and argument lists the wrappers share

EPILOG = ('--dry-run prints the command (and any variables it exports) without starting it. World size > 1 '
          'runs mpirun with cores per rank from this machine\'s physical cores (override: DEMO_PHYSICAL_CORES, '
          'DEMO_CPU_SOCKETS); with fewer cores than ranks it runs oversubscribed. MULTI_HLS_IPS=ip1,ip2,... '
          'spreads the ranks over those hosts (ssh port DOCKER_SSHD_PORT, default 3022).')


def demo_parser(description):
    return cli.ArgumentParser(description=description, epilog=EPILOG)


def add_loader_flag(parser, default):
    cli.add_loader_kind_arg(parser, default, help=f'data loader; FAST is this port\'s JPEG pipeline, DALI NVIDIA\'s '
                                                  f'(default: {default})')


def add_launch_flags(parser, world_size, process_per_node, dist_flag, world_size_short=()):
    parser.add_argument(*world_size_short, '--world-size', default=world_size, type=int,
                        help=f'number of devices (ranks); above 1 runs mpirun (default: {world_size})')
    parser.add_argument('--process-per-node', default=process_per_node, type=int, metavar='N',
                        help='ranks per host with MULTI_HLS_IPS (default: '
                             f'{process_per_node or "world size / hosts"})')
    parser.add_argument(dist_flag, dest='dist', action='store_true',
                        help='distribute training: with --world-size 1 this means 8 ranks')
    parser.add_argument('--dist-timeout', default=None, type=cli.whole_seconds, metavar='SECONDS',
                        help='passed to the trainer: longest wait for the other ranks (trainer default: 600)')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the command and exported variables, start nothing')
    cli.add_tensorboard_arg(parser)  # passed to the trainer
    parser.add_argument('--recipe', default=recipes.DEFAULT, metavar='NAME',
                        help='passed to the trainer: a named recipe whose values replace this script\'s defaults '
                             '(flags given here still win); "--recipe list" describes them')
    parser.add_argument('--print-schedule', action='store_true',
                        help='print the schedule for these flags and --world-size (the trainer, once), start nothing')


def add_train_py_flags(parser, model, dl_worker_type):
    """demo_resnet's flags (Habana 1.4.0); demo_mobilenet has the same with other defaults."""
    parser.add_argument('-p', '--data-path', default=ORIGINAL_DEFAULT_DATA_PATH, help='dataset (train/ and val/)')
    parser.add_argument('-m', '--model', default=model, help=f'model (default: {model})')
    parser.add_argument('-d', '--device', default='hpu', help='hpu, cuda or cpu (default: hpu)')
    parser.add_argument('-b', '--batch-size', default=128, type=int, help='batch size per device')
    parser.add_argument('--mode', default='lazy', choices=('lazy', 'eager'), help='hpu execution mode')
    parser.add_argument('--data-type', default='fp32', choices=('fp32', 'bf16'),
                        help='bf16: mixed precision with the op lists next to this script')
    parser.add_argument('-e', '--epochs', default=1, type=int, help='number of epochs (default: 1)')
    add_loader_flag(parser, dl_worker_type)
    parser.add_argument('--dl-time-exclude', default=True, type=cli.parse_bool,
                        help='Set to False to include data load time')
    parser.add_argument('-j', '--workers', default=10, type=int, help='data loading workers')
    parser.add_argument('--print-freq', default=1, type=int, help='print frequency')
    add_launch_flags(parser, world_size=8, process_per_node=0, dist_flag='--dist', world_size_short=('-w',))
    parser.add_argument('--num-train-steps', default=None, type=int,
                        help='training steps per epoch (default: the whole epoch)')
    parser.add_argument('--num-eval-steps', default=None, type=int,
                        help='evaluation steps (default: the whole validation set)')
    parser.add_argument('--custom-lr-values', default=None,
                        help='learning rates, comma-separated, e.g. 0.1,0.01,0.001 (with --custom-lr-milestones)')
    parser.add_argument('--custom-lr-milestones', default=None,
                        help='epochs at which each value starts, comma-separated, e.g. 0,30,60')
    parser.add_argument('--output-dir', default='.', help='where to save checkpoints')
    parser.add_argument('--channels-last', default=True, type=cli.parse_bool, help='channels-last input (True/False)')
    parser.add_argument('--deterministic', action='store_true', help='deterministic data loading')
    parser.add_argument('--seed', default=123, type=int, help='random seed')
    parser.add_argument('--resume', default='', metavar='PATH|auto',
                        help='checkpoint to resume from; auto: --output-dir\'s checkpoint.pth when it exists')
    parser.add_argument('--save-checkpoint', action='store_true', help='save a checkpoint after every epoch')


TRAIN_PY_ALWAYS = ('--data-path', '--model', '--device', '--batch-size', '--epochs', '--workers', '--dl-worker-type',
                   '--dl-time-exclude', '--print-freq', '--output-dir', '--channels-last', '--seed')


def train_py_args(args, op_lists, process_per_node, hyperparameters=()):
    """train.py's arguments in the original order; `op_lists` names the ops_*_<name>.txt pair."""
    command = flag_values(args, TRAIN_PY_ALWAYS + tuple(hyperparameters))
    if args.mode == 'eager':
        command += ['--run-lazy-mode', 'False']
    if args.data_type == 'bf16':
        command += hmp_args(f'ops_bf16_{op_lists}.txt', f'ops_fp32_{op_lists}.txt')
    command += flag_values(args, [flag for flag in ('--num-train-steps', '--num-eval-steps')
                                  if value_of(args, flag) is not None])
    command += switches(args, ('--save-checkpoint',))
    command += custom_lr_args(args.custom_lr_values, args.custom_lr_milestones)
    command += switches(args, ('--deterministic',))
    command += flag_values(args, ['--resume'] if args.resume else [])
    return command + process_per_node_args(process_per_node)


def value_of(args, flag):
    return getattr(args, flag[2:].replace('-', '_'))


def flag_values(args, flags):
    """`--flag=value` for each flag, the value read from args (booleans as True/False)."""
    return [f'{flag}={value_of(args, flag)}' for flag in flags]


def switches(args, flags):
    return [flag for flag in flags if value_of(args, flag)]


def dist_timeout_args(seconds):
    return [] if seconds is None else [f'--dist-timeout={seconds}']


def process_per_node_args(process_per_node):
    return [] if process_per_node is None else [f'--process-per-node={process_per_node}']


def hmp_args(bf16_list, fp32_list):
    """Mixed precision with op lists named relative to this folder (absolute paths pass unchanged)."""
    return ['--hmp', '--hmp-bf16', os.path.join(HERE, bf16_list), '--hmp-fp32', os.path.join(HERE, fp32_list)]


def custom_lr_args(values, milestones):
    """The comma lists as train.py's space lists; both or neither, each item as the original checks it."""
    if values is None and milestones is None:
        return []
    if values is None or milestones is None:
        given, missing = (('--custom-lr-values', '--custom-lr-milestones') if milestones is None
                          else ('--custom-lr-milestones', '--custom-lr-values'))
        raise UsageError(f'{given}: needs {missing} as well (one learning rate per milestone epoch)')
    rates = comma_list('--custom-lr-values', values, DECIMAL, 'a decimal number with a dot, such as 0.1 or .1')
    epochs = comma_list('--custom-lr-milestones', milestones, WHOLE_NUMBER, 'a whole epoch number, such as 30')
    if len(rates) != len(epochs):
        raise UsageError(f'--custom-lr-values: {len(rates)} values but --custom-lr-milestones has {len(epochs)} '
                         'epochs; give one learning rate per milestone')
    return ['--custom-lr-values', *rates, '--custom-lr-milestones', *epochs]


def comma_list(flag, text, pattern, meaning):
    items = text.split(',')
    for item in items:
        if not pattern.match(item):
            raise UsageError(f"{flag}: '{item}' is not {meaning} (in '{text}'; separate items with commas)")
    return items
