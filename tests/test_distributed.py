"""train.py under a real `mpirun -np 2` (OpenMPI), gloo on CPU."""
import re

from conftest import TINY_IMAGES, mpirun_prefix, run_script


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
