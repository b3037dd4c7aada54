"""--data-path synthetic, the benchmark modes (benchmark_modes.py) and --compile: in-process on CPU with a tiny crop,
plus one mpirun run (slow, mpi)."""
import json
import re

import numpy as np
import pytest
import torch

from conftest import mpirun_prefix, run_in_process, run_script

from classification import benchmark_modes, data, devices, distributed, loaders
import main as googlenet_trainer
import train
from classification.cli import UsageError

TINY = ['--device', 'cpu', '--model', 'resnet18', '--workers', '0', '--train-crop-size', '32',
        '--val-resize-size', '40', '--val-crop-size', '32']


def synthetic(world_size=1, rank=0, batch_size=8, images=None):
    settings = loaders.LoaderSettings(batch_size=batch_size, seed=1, train_crop_size=32, val_crop_size=24,
                                      synthetic_images=images)
    ranks = distributed.Ranks(rank=rank, world_size=world_size, local_rank=rank, distributed=world_size > 1)
    placement = devices.LoaderPlacement(torch.device('cpu'), pin_memory=False, worker_start_method=None)
    return loaders.build(loaders.SYNTHETIC, settings, ranks, placement)


def test_synthetic_batches_are_one_normalised_uint8_batch_of_the_right_shape_with_imagenet_steps():
    dataset = synthetic(world_size=2, rank=1, images=50)  # 25 per rank: 8, 8, 8, and a single one left out
    assert dataset.kind == 'SYNTHETIC' and len(dataset.classes) == 1000
    batches = list(dataset.train)
    assert len(dataset.train) == len(batches) == 3
    raw = dataset.train.loader.images(32)  # the uint8 batch, made once, normalised on the device as FAST's
    assert raw.dtype == torch.uint8 and raw.shape == (8, 3, 32, 32)
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    for images, targets in batches:
        assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
        assert images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(images, (raw.float() / 255 - mean) / std)
        assert targets.dtype == torch.int64 and 0 <= targets.min() and targets.max() < 1000
    val = [images.shape[0] for images, _ in dataset.val]  # 25000 of ImageNet's 50000 per rank, the last batch short
    assert len(val) == 3125 and val[-1] == 8 and dataset.val.loader.images(24).shape[-1] == 24
    assert len(synthetic(batch_size=256).train) == 5005  # ImageNet's 1,281,167 images at batch 256, as Habana's log


def test_latency_percentiles_and_throughput_of_known_step_times():
    times = [ms / 1000 for ms in range(1, 101)]  # 1 ms .. 100 ms
    result = benchmark_modes.summarise(times, batch_size=4, window_seconds=10.0)
    assert result['iterations'] == 100 and result['img_per_s'] == pytest.approx(40.0)
    lat = result['latency_ms']
    assert lat['mean'] == pytest.approx(50.5)
    assert (lat['p90'], lat['p95'], lat['p99']) == pytest.approx(tuple(np.percentile(range(1, 101), [90, 95, 99])))
    assert lat['p90'] == pytest.approx(90.1) and lat['p99'] == pytest.approx(99.01)  # linear interpolation
    assert benchmark_modes.summarise([0.5, 0.5], 2)['img_per_s'] == pytest.approx(4.0)  # window: the steps' sum


@pytest.mark.parametrize('mode, sizes', [('benchmark-inference', ['1', '2']),
                                         ('benchmark-training', ['2', '3'])])  # batch 1 cannot train BatchNorm here
def test_benchmark_modes_print_the_table_and_write_the_json(mode, sizes, tmp_path, capsys):
    out = tmp_path / 'bench.json'
    argv = ['--data-path', 'synthetic', '--output-dir', str(tmp_path), *TINY, '--mode', mode, '--bench-warmup', '1',
            '--bench-iterations', '2', '--benchmark-batch-sizes', *sizes, '--benchmark-json', str(out)]
    assert run_in_process(train, argv) == 0
    log = capsys.readouterr().out
    assert f'{mode}: resnet18 on cpu (fp32, channels-last), synthetic data, 1 rank(s); 1 warm-up step(s) left out, ' \
           '2 measured per batch size' in log
    assert 'synchronised after' in log and '| batch | img/s | img/s all ranks | latency mean ms |' in log
    assert [int(b) for b in re.findall(r'^\| (\d+) \| [\d.]+ \|', log, flags=re.M)] == [int(s) for s in sizes]
    report = json.loads(out.read_text())
    assert {'mode', 'model', 'device', 'data', 'warmup_steps', 'measured_steps', 'world_size', 'synchronised',
            'img_per_s', 'results'} <= set(report)
    assert (report['mode'], report['warmup_steps'], report['measured_steps'], report['world_size']) == (mode, 1, 2, 1)
    for size, result in zip(sizes, report['results']):
        assert result['batch_size'] == int(size) and result['iterations'] == 2
        assert set(result['latency_ms']) == {'mean', 'p90', 'p95', 'p99'}
        assert result['img_per_s'] > 0 and result['img_per_s_all_ranks'] == result['img_per_s']
        assert result['img_per_s_per_rank'] == [result['img_per_s']] and result['first_step_s'] > 0
    assert not list(tmp_path.glob('*.pth'))  # a benchmark saves no checkpoint


@pytest.mark.parametrize('extra, message', [
    (['--bench-iterations', '-1'], '--bench-iterations must be at least 1, got -1'),
    (['--bench-iterations', '0'], '--bench-iterations must be at least 1'),
    (['--bench-warmup', '-2'], '--bench-warmup must be at least 0, got -2'),
    (['--benchmark-batch-sizes', '4', '0'], '--benchmark-batch-sizes must all be at least 1, got 0'),
    (['--compile', '--bench-warmup', '0'], '--compile compiles in the first step of each batch size'),
])
def test_bad_benchmark_values_are_one_line_errors(extra, message, tmp_path, capsys):
    argv = ['--data-path', 'synthetic', '--output-dir', str(tmp_path), *TINY, '--mode', 'benchmark-inference', *extra]
    assert run_in_process(train, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and err.count('\n') == 1


def test_benchmark_check_refuses_an_unknown_mode():
    with pytest.raises(UsageError, match="--mode: unknown mode 'bench'"):
        benchmark_modes.check('bench', 1, 1, [1])


def test_compile_on_hpu_is_refused_in_one_line_before_any_data_is_read(sdk, tmp_path, capsys):
    argv = ['--data-path', str(tmp_path / 'none'), '--output-dir', str(tmp_path / 'out'), '--device', 'hpu',
            '--model', 'resnet18', '--compile']
    assert run_in_process(train, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --compile: on hpu, Habana's lazy mode is the graph compiler") and err.count('\n') == 1


def test_main_py_trains_and_validates_googlenet_on_synthetic_data(tmp_path, capsys):
    argv = ['--data-path', 'synthetic', '--output-dir', str(tmp_path), '--device', 'cpu', '--batch-size', '2',
            '--epochs', '1', '--num-train-steps', '2', '--workers', '0', '--train-crop-size', '32',
            '--val-crop-size', '32', '--val-resize-size', '40', '--save-checkpoint', '0']
    assert run_in_process(googlenet_trainer, argv) == 0
    log = capsys.readouterr().out
    assert 'Synthetic data: 1281167 training and 50000 validation images per epoch, 1000 classes' in log
    assert len(re.findall(r'^Epoch: \[0\]\[\s*\d+/640583\]', log, flags=re.M)) == 2  # 640584 less a trailing single
    assert 'Test: evaluated 4 images' in log  # validation bounded by --num-train-steps, as the original


@pytest.mark.slow  # torch.compile: 7 s
def test_compiled_run_saves_plain_keys_leaves_the_compiling_step_out_of_img_s_and_resumes(tmp_path, capsys,
                                                                                           monkeypatch, request):
    # torch.compile's aot_eager backend: the same wrapper (OptimizedModule, `_orig_mod`), dynamo's tracing and
    # AOT autograd, without inductor's C++ builds (70 s here); inductor itself: benchmarks/RESULTS.md 8.2.
    monkeypatch.setattr(devices.CPUDevice, 'compile',
                        lambda self, model: torch.compile(model, backend='aot_eager', dynamic=False))
    request.addfinalizer(torch._dynamo.reset)  # no compiled code left behind for later tests
    argv = ['--data-path', 'synthetic', '--output-dir', str(tmp_path), *TINY, '--batch-size', '4',
            '--dataset-size', '8', '--num-eval-steps', '1', '--save-checkpoint', '--compile']
    assert run_in_process(train, argv + ['--epochs', '1']) == 0
    log = capsys.readouterr().out
    assert re.search(r'^--compile: step 0 compiled the model \([\d.]+ s, data wait included\); img/s leaves it out$',
                     log, flags=re.M)
    rates = re.findall(r'^Epoch: \[0\]  \[\d/2\].*?img/s: (\S+)', log, flags=re.M)
    assert rates[0] == 'nan' and float(rates[1]) > 0
    state = torch.load(tmp_path / 'checkpoint.pth', map_location='cpu', weights_only=True)['model']
    assert not [k for k in state if '_orig_mod' in k]
    assert run_in_process(train, argv + ['--epochs', '2', '--resume', str(tmp_path / 'checkpoint.pth')]) == 0
    log = capsys.readouterr().out
    assert re.search(r'^Epoch: \[1\]  \[1/2\]', log, flags=re.M) and not re.search(r'^Epoch: \[0\]', log, flags=re.M)
    resumed = torch.load(tmp_path / 'model_1.pth', map_location='cpu', weights_only=True)['model']
    assert set(resumed) == set(state)


@pytest.mark.slow
@pytest.mark.mpi
def test_two_ranks_train_and_benchmark_on_synthetic_data_each_its_share(tmp_path):
    common = ['train.py', '--data-path', 'synthetic', *TINY, '--batch-size', '4']
    result = run_script(mpirun_prefix(2) + common + ['--output-dir', str(tmp_path / 'train'), '--dataset-size', '16',
                                                     '--epochs', '1', '--num-eval-steps', '1'], timeout=300)
    log = result.stdout
    assert result.returncode == 0, log[-3000:] + result.stderr[-3000:]
    assert sorted(re.findall(r'^\| rank (\d): trained on 8 images$', log, flags=re.M)) == ['0', '1']
    assert len(re.findall(r'^Epoch: \[0\]  \[\d/2\]', log, flags=re.M)) == 2  # 16 images / 2 ranks / 4 per batch
    assert 'Test: evaluated 8 images' in log  # one step of 4 on each rank, summed

    out = tmp_path / 'bench.json'
    result = run_script(mpirun_prefix(2) + common + ['--output-dir', str(tmp_path / 'bench'), '--mode',
                                                     'benchmark-training', '--bench-warmup', '1', '--bench-iterations',
                                                     '2', '--benchmark-json', str(out)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report['world_size'] == 2 and result.stdout.count('| batch | img/s |') == 1  # rank 0 prints
    row = report['results'][0]
    assert len(row['img_per_s_per_rank']) == 2 and row['img_per_s_all_ranks'] == pytest.approx(sum(row['img_per_s_per_rank']))
