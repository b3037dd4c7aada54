"""launcher.py in-process: core counting, where ranks go, the mpirun lines of spec 2.3, the custom-LR lists.

Expected commands are written from the spec (TrainingRunner 1.4.0), not from the program's output.
"""
import os
import shutil
import subprocess

import pytest

from conftest import REPO
from classification import launcher
from classification.launcher import Placement, Topology
from classification.cli import UsageError

TRAINER = ['python', '/opt/demo/train.py', '--model=resnet50']
HOST_56_CORES = Topology(cores=56, sockets=2)


def test_physical_cores_are_distinct_socket_core_pairs_of_usable_cpus():
    listing = subprocess.run(['lscpu', '-p=CPU,CORE,SOCKET'], capture_output=True, text=True, check=True).stdout
    usable = os.sched_getaffinity(0)
    rows = [line.split(',') for line in listing.splitlines() if not line.startswith('#')]
    pairs = {(socket, core) for cpu, core, socket in rows if int(cpu) in usable}
    assert launcher.detected_topology() == Topology(cores=len(pairs), sockets=len({s for s, _ in pairs}))


def test_core_count_override_stands_in_for_another_host():
    environ = {'DEMO_PHYSICAL_CORES': '56', 'DEMO_CPU_SOCKETS': '2'}
    assert launcher.host_topology(environ) == HOST_56_CORES


@pytest.mark.parametrize('value', ['0', 'many', '-4', '7.5'])
def test_bad_core_count_override_names_the_variable(value):
    with pytest.raises(UsageError, match='^DEMO_PHYSICAL_CORES: expected a whole number'):
        launcher.host_topology({'DEMO_PHYSICAL_CORES': value})


def test_world_size_one_runs_the_trainer_itself_even_with_hosts_set():
    placement = launcher.place_ranks(1, 0, {'MULTI_HLS_IPS': '10.0.0.1,10.0.0.2'})
    launch = launcher.plan_launch(TRAINER, placement, HOST_56_CORES, {})
    assert (launch.command, launch.exports, launch.notice) == (TRAINER, {}, '')


@pytest.mark.parametrize('ranks, topology, cores_per_rank', [
    (8, HOST_56_CORES, 7),           # the README's manual example: 2 x 28 cores, 8 cards
    (8, Topology(16, 1), 2),
    (2, Topology(2, 1), 1),          # this 2-core machine with --world-size 2
    (3, Topology(8, 1), 2),          # leftover cores stay unused
])
def test_one_host_binds_each_rank_to_its_share_of_cores(ranks, topology, cores_per_rank):
    launch = launcher.plan_launch(TRAINER, Placement(ranks), topology, {})
    assert launch.command == ['mpirun', '-n', str(ranks), '--bind-to', 'core', '--map-by', f'slot:PE={cores_per_rank}',
                              '--rank-by', 'core', '--report-bindings', '--allow-run-as-root'] + TRAINER
    assert (launch.exports, launch.notice) == ({}, '')


def test_more_ranks_than_cores_runs_oversubscribed_with_one_thread_each():
    launch = launcher.plan_launch(TRAINER, Placement(8), Topology(2, 1), {})
    assert launch.command == ['mpirun', '-n', '8', '--oversubscribe', '--bind-to', 'none', '--rank-by', 'core',
                              '--allow-run-as-root'] + TRAINER
    assert launch.exports == {'OMP_NUM_THREADS': '1'}
    assert launch.notice.startswith('note: 8 ranks on 2 physical cores: running oversubscribed and unbound')
    assert '\n' not in launch.notice


def test_oversubscribed_run_keeps_the_users_thread_count():
    launch = launcher.plan_launch(TRAINER, Placement(8), Topology(2, 1), {'OMP_NUM_THREADS': '3'})
    assert launch.exports == {}
    assert launch.notice.endswith('OMP_NUM_THREADS=3')


def test_ranks_spread_evenly_over_the_hosts():
    placement = launcher.place_ranks(16, 0, {'MULTI_HLS_IPS': '10.10.100.101,10.10.100.102'})
    assert placement == Placement(16, ('10.10.100.101', '10.10.100.102'), 8)


def test_host_entries_keep_the_part_before_a_dash():
    assert launcher.multi_node_hosts({'MULTI_HLS_IPS': '10.0.0.1-gaudi0,10.0.0.2-gaudi1'}) == ('10.0.0.1', '10.0.0.2')


def test_world_size_that_does_not_divide_over_the_hosts_is_an_error():
    with pytest.raises(UsageError, match=r'^--world-size 12 does not divide evenly over the 5 hosts in MULTI_HLS_IPS'):
        launcher.place_ranks(12, 0, {'MULTI_HLS_IPS': 'a,b,c,d,e'})


def test_process_per_node_that_contradicts_the_hosts_is_an_error():
    with pytest.raises(UsageError, match=r'^--process-per-node 8 does not match .* \(4 per host\)'):
        launcher.place_ranks(8, 8, {'MULTI_HLS_IPS': '10.0.0.1,10.0.0.2'})


def test_multi_node_line_of_spec_2_3():
    environ = {'MPI_ROOT': '/opt/mpi', 'MASTER_PORT': '29500', 'DOCKER_SSHD_PORT': '2222', 'HCCL_OVER_OFI': '1',
               'HCCL_SOCKET_IFNAME': 'ens1', 'MULTI_HLS_IPS': '10.10.100.101,10.10.100.102', 'HOME': '/root'}
    placement = launcher.place_ranks(16, 0, environ)
    launch = launcher.plan_launch(TRAINER, placement, HOST_56_CORES, environ)
    assert launch.command == [
        'mpirun', '--allow-run-as-root', '-x', 'HCCL_SOCKET_IFNAME=ens1', '-x', 'HCCL_OVER_OFI=1',
        '-x', 'MULTI_HLS_IPS=10.10.100.101,10.10.100.102', '--prefix', '/opt/mpi',
        '--mca', 'btl_tcp_if_include', '10.10.100.0/16', '-x', 'MASTER_ADDR=10.10.100.101', '-x', 'MASTER_PORT=29500',
        '--mca', 'plm_rsh_args', '-p 2222', '--bind-to', 'core', '-H', '10.10.100.101:56,10.10.100.102:56',
        '-n', '16', '--map-by', 'ppr:4:socket:PE=7', '--rank-by', 'core', '--report-bindings'] + TRAINER


def test_multi_node_maps_per_node_when_ranks_do_not_split_over_sockets():
    placement = Placement(6, ('h1', 'h2'), 3)
    command = launcher.plan_launch(TRAINER, placement, Topology(24, 2), {'MPI_ROOT': '/m'}).command
    assert command[command.index('--map-by') + 1] == 'ppr:3:node:PE=8'
    assert command[command.index('-H') + 1] == 'h1:24,h2:24'
    assert 'btl_tcp_if_include' not in command  # host names: no network to derive, OpenMPI picks


def test_multi_node_with_fewer_cores_than_ranks_per_host_runs_unbound():
    placement = Placement(16, ('10.0.0.1', '10.0.0.2'), 8)
    launch = launcher.plan_launch(TRAINER, placement, Topology(2, 1), {'MPI_ROOT': '/m'})
    tail = launch.command[launch.command.index('--bind-to'):]
    assert tail == ['--bind-to', 'none', '-H', '10.0.0.1:8,10.0.0.2:8', '-n', '16', '--map-by', 'ppr:8:node',
                    '--rank-by', 'core'] + TRAINER
    assert launch.notice.startswith('note: 8 ranks per host but 2 physical cores here')


def test_mpi_prefix_without_mpi_root_is_the_installation_of_mpirun_on_path():
    prefix = launcher.mpi_prefix({'PATH': os.environ['PATH']})[0]
    assert os.path.realpath(os.path.join(prefix, 'bin', os.path.basename(shutil.which('mpirun')))) == \
        os.path.realpath(shutil.which('mpirun'))
    assert launcher.mpi_prefix({'PATH': '/nonexistent'})[0] == '/usr/local/openmpi'


def test_custom_lr_comma_lists_become_space_lists():
    assert launcher.custom_lr_args('0.1,.01,0.001', '0,30,60') == [
        '--custom-lr-values', '0.1', '.01', '0.001', '--custom-lr-milestones', '0', '30', '60']
    assert launcher.custom_lr_args(None, None) == []


@pytest.mark.parametrize('values, milestones, message', [
    ('0.1,1e-3', '0,30', "^--custom-lr-values: '1e-3' is not a decimal number with a dot"),
    ('0.1,1', '0,30', "^--custom-lr-values: '1' is not a decimal number"),
    ('0.1,0.01', '0,3.5', "^--custom-lr-milestones: '3.5' is not a whole epoch number"),
    ('0.1, 0.01', '0,30', "^--custom-lr-values: ' 0.01' is not"),
    ('0.1,0.01', None, '^--custom-lr-values: needs --custom-lr-milestones as well'),
    (None, '0,30', '^--custom-lr-milestones: needs --custom-lr-values as well'),
    ('0.1,0.01,0.001', '0,30', '^--custom-lr-values: 3 values but --custom-lr-milestones has 2 epochs'),
])
def test_bad_custom_lr_lists_are_errors_naming_the_flag(values, milestones, message):
    with pytest.raises(UsageError, match=message):
        launcher.custom_lr_args(values, milestones)


def test_single_dash_custom_lr_spellings_are_read_as_meant(capsys):
    argv = ['-custom-lr-values', '0.1', '-custom-lr-milestones=0', '--model', 'x', '-custom']
    assert launcher.read_single_dash_spellings(argv) == [
        '--custom-lr-values', '0.1', '--custom-lr-milestones=0', '--model', 'x', '-custom']
    assert capsys.readouterr().err.count('note: reading') == 2


# Spec section 6: the op lists of the original, one op a line, no newline after the last.
OP_LISTS = {
    'ops_bf16_Resnet.txt': 'addmm avg_pool2d bmm conv2d dot max_pool2d mm mv relu t linear',
    'ops_bf16_Mobilenet.txt': 'addmm avg_pool2d bmm conv2d dot max_pool2d mm mv relu6 t linear',
    'ops_bf16_googlenet.txt': 'addmm avg_pool2d bmm conv2d dot max_pool2d mm mv relu t linear',
    'ops_fp32_Resnet.txt': 'cross_entropy log_softmax nll_loss softmax topk',
    'ops_fp32_Mobilenet.txt': 'cross_entropy log_softmax nll_loss softmax topk',
    'ops_fp32_googlenet.txt': 'cross_entropy log_softmax nll_loss softmax topk',
}


@pytest.mark.parametrize('name', sorted(OP_LISTS))
def test_op_lists_of_the_original_are_at_the_top_level(name):
    with open(os.path.join(REPO, name)) as f:
        assert f.read() == OP_LISTS[name].replace(' ', '\n')


def test_mpi_prefix_says_where_it_came_from():
    assert launcher.mpi_prefix({'MPI_ROOT': '/usr/local/openmpi', 'PATH': os.environ['PATH']}) == (
        '/usr/local/openmpi', 'MPI_ROOT')
    prefix, source = launcher.mpi_prefix({'PATH': os.environ['PATH']})
    assert source == f"the installation of {shutil.which('mpirun')} on PATH, MPI_ROOT being unset"
    assert launcher.mpi_prefix({'PATH': '/nonexistent'}) == (
        '/usr/local/openmpi', "Habana's container's OpenMPI, MPI_ROOT being unset and no mpirun on PATH")
    placement = Placement(4, ('10.0.0.1', '10.0.0.2'), 2)
    launch = launcher.plan_launch(TRAINER, placement, HOST_56_CORES, {'PATH': os.environ['PATH']})
    assert launch.mpi_prefix == f'mpirun --prefix {prefix} (where each host finds orted): {source}'
    assert launch.command[launch.command.index('--prefix') + 1] == prefix
    assert launcher.plan_launch(TRAINER, Placement(4), HOST_56_CORES, {}).mpi_prefix == ''  # one host: no --prefix
