"""train.py under a real `mpirun -np 2` (OpenMPI), gloo on CPU."""
import re

import pytest

from conftest import TINY_IMAGES, mpirun_prefix, run_script

import devices
import utils


def test_two_ranks_train_rank_zero_prints_and_evaluation_counts_each_image_once(fresh_dataset, tmp_path):
    data = fresh_dataset(classes=3, train_per_class=8, val_per_class=3)  # 24 train, 9 val: odd over 2 ranks
    result = run_script(mpirun_prefix(2) + [
        'train.py', '--data-path', data, '--output-dir', str(tmp_path), '--device', 'cpu', '--model', 'resnet18',
        '--batch-size', '4', '--workers', '1', '--epochs', '2', '--print-freq', '1', '--dl-worker-type', 'MP',
        '--save-checkpoint', *TINY_IMAGES], timeout=300)
    log = result.stdout
    assert result.returncode == 0, log[-3000:] + result.stderr[-3000:]

    assert sorted(re.findall(r'^\| distributed init \(rank (\d), OpenMPI\)', log, flags=re.M)) == ['0', '1']
    assert sorted(re.findall(r'^\| rank (\d): trained on 24 images$', log, flags=re.M)) == ['0', '1']  # 12/rank/epoch
    for once in ('Namespace(', 'Start training', 'Training time'):
        assert log.count(once) == 1, once  # everything else comes from rank 0 only
    assert len(re.findall(r'^Epoch: \[0\]  \[\d/3\]', log, flags=re.M)) == 3  # 12 images / 4 per batch

    assert re.findall(r'^Test: evaluated (\d+) images$', log, flags=re.M) == ['9', '9']
    assert (tmp_path / 'checkpoint.pth').exists()


@pytest.mark.parametrize('environ, expected', [
    ({'OMPI_COMM_WORLD_RANK': '3', 'OMPI_COMM_WORLD_SIZE': '8', 'OMPI_COMM_WORLD_LOCAL_RANK': '3'}, (3, 8, 3, 'OpenMPI')),
    ({'PMI_RANK': '9', 'PMI_SIZE': '16', 'MPI_LOCALRANKID': '1'}, (9, 16, 1, 'MPICH/Intel MPI')),
    ({'RANK': '5', 'WORLD_SIZE': '6', 'LOCAL_RANK': '1'}, (5, 6, 1, 'torchrun')),
    ({'SLURM_PROCID': '7', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '3'}, (7, 8, 3, 'SLURM')),
    # torchrun inside an mpirun allocation: torchrun's own variables win, as upstream reads them first
    ({'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1', 'OMPI_COMM_WORLD_RANK': '0', 'OMPI_COMM_WORLD_SIZE': '1'},
     (1, 2, 1, 'torchrun')),
])
def test_rank_world_size_and_local_rank_come_from_each_launcher(environ, expected):
    assert utils.discover_ranks(environ) == expected


def test_a_plain_process_is_rank_zero_of_one():
    rank, size, local, launcher = utils.discover_ranks({})
    assert (rank, size, local) == (0, 1, 0)


@pytest.mark.parametrize('model_name, bucket_mb', [('resnet50', 100), ('mobilenet_v2', 100), ('resnet152', 200),
                                                   ('resnext101_32x4d', 200)])
def test_ddp_buckets_are_the_sizes_the_original_meant(model_name, bucket_mb):
    kwargs = devices.create('cpu').ddp_kwargs(model_name)
    assert kwargs['bucket_cap_mb'] == bucket_mb
    assert kwargs.get('forward_sync_buffers', kwargs.get('broadcast_buffers')) is False
