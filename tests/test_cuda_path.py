"""The CUDA path, checked on the CPU where the CPU can show it (issue 18; docs/devices.md, docs/guarantees.md):
--amp (float16 with loss scaling, bfloat16), a skipped overflow step against a divergence, the scaler in
checkpoints, a resume across device kinds, one host transfer per logged step, DDP's bucket size, TF32 and the
deterministic settings, and the refusals of bad precision flags. What only a GPU shows is in
benchmarks/gpu_check.py."""
import os
import re
import traceback

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import main as googlenet
import train
from conftest import TINY_IMAGES, HPUDeviceOnCPU, run_in_process, run_script, start_process, read_until

from classification import devices, metrics, stopping, training

FP16 = torch.float16


def tiny_model():
    """A conv net small enough for float16 autocast on a CPU (tens of times slower than float32 there)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def fp16_run(init_scale=2.0 ** 8):
    dev = devices.create('cpu', channels_last=False, amp_dtype=FP16)
    dev.scaler = torch.amp.GradScaler('cpu', init_scale=init_scale)
    model = dev.prepare_model(tiny_model())
    optimizer = dev.make_optimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
    return dev, model, optimizer


def batch(poisoned=False):
    generator = torch.Generator().manual_seed(1)
    image, target = torch.randn(4, 3, 8, 8, generator=generator), torch.tensor([0, 1, 2, 3])
    if poisoned:
        image[0, 0, 0, 0] = float('inf')  # a float16 overflow in the forward: the loss is not finite
    return image, target


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_float16_amp_autocasts_and_scales_the_loss_and_bfloat16_needs_no_scaler():
    dev, model, optimizer = fp16_run()
    output, loss = training.train_step(model, nn.CrossEntropyLoss(), optimizer, dev, *batch())
    assert output.dtype == FP16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert dev.precision_settings() == {'amp': 'float16', 'loss_scaling': True, 'hmp': False}
    bf16 = devices.create('cpu', amp_dtype=torch.bfloat16)
    assert bf16.scaler is None and bf16.precision_settings()['amp'] == 'bfloat16'
    with bf16.autocast():
        assert tiny_model()(batch()[0]).dtype == torch.bfloat16
    assert devices.create('cpu').scaler is None


def test_a_step_the_scaler_skips_for_overflow_is_not_a_divergence_and_is_reported(capsys):
    dev, model, optimizer = fp16_run()
    watch = stopping.NonFiniteLossWatch(dev.torch_device, dev.scaler)
    loss_fn = nn.CrossEntropyLoss()
    for step, poisoned in enumerate((False, True, False)):
        before = params(model)
        _, loss = training.train_step(model, loss_fn, optimizer, dev, *batch(poisoned))
        watch.track(loss, step, 0.1)
        changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert changed != poisoned  # the overflow step left every weight as it was
    watch.check(epoch=0)  # no NonFiniteLoss: one skipped step is an overflow, not a divergence
    assert dev.scaler.get_scale() == 2.0 ** 7  # halved once
    assert 'note: epoch 0: float16 overflow: the loss scaler skipped 1 step(s)' in capsys.readouterr().out


def test_an_overflow_step_leaves_the_optimizer_state_untouched_so_the_next_step_is_finite():
    """Fused SGD would take the inf gradients into its momentum on the skipped step (the device layer does not
    fuse under a scaler)."""
    dev, model, optimizer = fp16_run(init_scale=2.0 ** 60)
    training.train_step(model, nn.CrossEntropyLoss(), optimizer, dev, *batch())  # skipped: gradients overflow
    assert not optimizer.state and not optimizer.defaults.get('fused')
    dev.scaler.update(new_scale=2.0 ** 4)
    training.train_step(model, nn.CrossEntropyLoss(), optimizer, dev, *batch())
    assert all(torch.isfinite(p).all() for p in model.parameters()) and optimizer.state


def test_an_overflow_that_left_batchnorm_statistics_non_finite_stops_at_the_epochs_end():
    dev, model, optimizer = fp16_run()
    watch = stopping.NonFiniteLossWatch(dev.torch_device, dev.scaler)
    _, loss = training.train_step(model, nn.CrossEntropyLoss(), optimizer, dev, *batch())
    watch.track(loss, 0, 0.1)
    watch.check(0, model)  # finite statistics: the epoch ends as usual
    _, loss = training.train_step(model, nn.CrossEntropyLoss(), optimizer, dev, *batch(poisoned=True))
    watch.track(loss, 1, 0.1)
    with pytest.raises(stopping.NonFiniteLoss, match='epoch 3: BatchNorm running statistics are not finite'):
        watch.check(3, model)


def test_a_gradient_overflow_with_a_finite_loss_is_skipped_and_reported(capsys):
    dev, model, optimizer = fp16_run(init_scale=2.0 ** 60)  # scaled float16 gradients overflow
    watch = stopping.NonFiniteLossWatch(dev.torch_device, dev.scaler)
    before = params(model)
    _, loss = training.train_step(model, nn.CrossEntropyLoss(), optimizer, dev, *batch())
    watch.track(loss, 0, 0.1)
    assert torch.isfinite(loss) and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    watch.check(epoch=0)
    assert 'skipped 1 step(s)' in capsys.readouterr().out and dev.scaler.get_scale() == 2.0 ** 59


def test_a_non_finite_loss_on_several_steps_in_a_row_under_float16_is_a_divergence():
    dev, model, optimizer = fp16_run()
    watch = stopping.NonFiniteLossWatch(dev.torch_device, dev.scaler)
    for step in range(stopping.NonFiniteLossWatch.SKIPS_IN_A_ROW):
        _, loss = training.train_step(model, nn.CrossEntropyLoss(), optimizer, dev, *batch(poisoned=True))
        watch.track(loss, 10 + step, 0.1)
    with pytest.raises(stopping.NonFiniteLoss, match=r'non-finite loss at epoch 2, 5 steps in a row from step 10 '
                                                     r'under --amp float16 .*\(lr 0.1\)'):
        watch.check(epoch=2)


def test_without_a_scaler_one_non_finite_loss_stops_as_before():
    watch = stopping.NonFiniteLossWatch('cpu')
    watch.track(torch.tensor(1.0), 0, 0.1)
    watch.track(torch.tensor(float('nan')), 1, 0.2)
    with pytest.raises(stopping.NonFiniteLoss, match=r'at epoch 0, step 1 \(lr 0.2\)'):
        watch.check(0)


def test_the_scaler_state_is_saved_as_upstreams_scaler_key_and_restored_on_resume(tmp_path, capsys):
    dev, model, optimizer = fp16_run(init_scale=2.0 ** 5)
    path = str(tmp_path / 'checkpoint.pth')
    fields = {'epoch': 0, 'args': {}, **training.schedule_fields(None)}
    training.save_checkpoint(dev, model, optimizer, fields, [path], model_name='tiny', classes=['a', 'b', 'c', 'd'])
    saved = torch.load(path, weights_only=True)
    assert saved['scaler']['scale'] == 2.0 ** 5
    fresh, model2, optimizer2 = fp16_run()
    training.resume(saved, fresh, model2, optimizer2, None, 'model')
    assert fresh.scaler.get_scale() == 2.0 ** 5
    training.resume(saved, devices.create('cpu'), model2, optimizer2, None, 'model')
    assert "the checkpoint's loss scaler state (--amp float16) is not used" in capsys.readouterr().out
    del saved['scaler']
    training.resume(saved, fresh, model2, optimizer2, None, 'model')
    assert 'the checkpoint has no loss scaler state' in capsys.readouterr().out


# --- a resume across device kinds ------------------------------------------------------------------------------

def written_on_cuda():
    """The random states a CUDA run saves: the CPU generator's and the GPU's (a philox seed and offset)."""
    return {'cpu': torch.get_rng_state(), 'cuda': torch.zeros(16, dtype=torch.uint8)}


def test_a_cuda_checkpoint_resumed_on_the_cpu_restores_the_cpu_state_and_says_what_it_did_not(capsys):
    state = written_on_cuda()
    expected = torch.rand(3, generator=torch.Generator().set_state(state['cpu']))
    devices.create('cpu').set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    out = capsys.readouterr().out
    assert re.search(r'^note: --resume: the checkpoint comes from another device kind; its cuda random state is '
                     r'not used on --device cpu$', out, re.M), out


def test_a_cpu_checkpoint_resumed_on_cuda_restores_what_is_there_without_a_keyerror(capsys):
    cuda = object.__new__(devices.CUDADevice)  # its set-up needs a GPU; restoring a CPU-only state does not
    cuda.index = 0
    state = {'cpu': torch.get_rng_state()}
    expected = torch.rand(3, generator=torch.Generator().set_state(state['cpu']))
    cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    assert 'it has no cuda random state (written on another device kind)' in capsys.readouterr().out


def test_checkpoints_of_cpu_and_hpu_runs_move_across_and_hold_host_tensors(sdk, tmp_path, capsys):
    for writer, reader in ((devices.create('cpu'), HPUDeviceOnCPU(channels_last=False)),
                           (HPUDeviceOnCPU(channels_last=False), devices.create('cpu'))):
        model = writer.prepare_model(tiny_model())
        optimizer = writer.make_optimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0)
        with writer.checkpoint_state(model, optimizer) as (model_state, optimizer_state):
            assert all(t.device.type == 'cpu' for t in model_state.values())
        reader.set_rng_state({'cpu': torch.get_rng_state()})
        assert 'note:' not in capsys.readouterr().out  # both use the CPU generator alone


def test_the_restore_note_names_missing_and_unused_states():
    assert devices.rng_restore_note('cpu', {'cpu'}, {'cpu'}, {'cpu'}) is None
    note = devices.rng_restore_note('cuda', {'cpu', 'hpu'}, {'cpu'}, {'cpu', 'cuda'})
    assert 'its hpu random state is not used on --device cuda' in note and 'it has no cuda random state' in note


# --- one host transfer per logged step -------------------------------------------------------------------------

class HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for a tensor's value (.item(): aten._local_scalar_dense), leaving
    out upstream's SmoothedValue (utils.py), which reads tensors it builds on the host from Python floats."""

    def __init__(self):
        super().__init__()
        self.items = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self._in_smoothed_value():
            self.items += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _in_smoothed_value():
        return any(frame.filename.endswith('utils.py') and frame.name in ('median', 'avg', 'global_avg', 'max')
                   for frame in traceback.extract_stack())


def test_a_logged_step_reads_the_device_once_and_top_k_runs_where_the_logits_are(monkeypatch):
    dev = devices.create('cpu', channels_last=False)
    reads = []
    real_read = dev.read_scalars
    monkeypatch.setattr(dev, 'read_scalars', lambda tensors: reads.append(len(tensors)) or real_read(tensors))
    model = dev.prepare_model(tiny_model())
    optimizer = dev.make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    loader = [batch() for _ in range(6)]
    with HostReads() as host:
        images, stopped = train.train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, loader, dev, 0, print_freq=2)
    assert (images, stopped) == (24, None)
    assert reads == [4, 4, 4]  # steps 0, 2, 4: loss, top-1, top-5 and the finite check in one read each
    assert host.items == 1  # the end-of-epoch finite check only; no .item() per value
    assert dev.accuracy_on_device and not devices.HPUDevice.accuracy_on_device  # hpu keeps Habana's CPU copy


def test_read_scalars_is_one_stacked_transfer_of_floats():
    dev = devices.create('cpu')
    values = dev.read_scalars([torch.tensor(1.5), torch.tensor(2, dtype=torch.int64), torch.tensor(2.0 ** 62)])
    assert values == [1.5, 2.0, 2.0 ** 62] and dev.read_scalars([]) == []


# --- DDP buckets, TF32, determinism -----------------------------------------------------------------------------

def test_hpu_keeps_habanas_buckets_and_bucket_cap_mb_overrides_them(sdk):
    dev = HPUDeviceOnCPU()
    assert dev.ddp_kwargs('resnet50')['bucket_cap_mb'] == 100
    assert dev.ddp_kwargs('googlenet', habana_bucket_cap_mb=googlenet.DDP_SETTINGS['habana_bucket_cap_mb'])[
        'bucket_cap_mb'] == 200
    assert dev.ddp_kwargs('resnet50', bucket_cap_mb=12.5)['bucket_cap_mb'] == 12.5


@pytest.fixture
def global_flags():
    """Restore the process-wide CUDA flags and variables a test sets."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             os.environ.get('CUBLAS_WORKSPACE_CONFIG'))
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2:4]
    torch.use_deterministic_algorithms(saved[4])
    os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)
    if saved[5] is not None:
        os.environ['CUBLAS_WORKSPACE_CONFIG'] = saved[5]


def test_tf32_sets_both_matmuls_and_convolutions(global_flags):
    devices.set_tf32(False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    devices.set_tf32(True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.skipif(torch.cuda.is_available(), reason='shows the order of set-up where no GPU is visible')
@pytest.mark.parametrize('script, flags', [(train, ['--deterministic']), (googlenet, ['--seed', '3'])])
def test_the_deterministic_settings_are_made_before_the_first_cuda_call(script, flags, global_flags, capsys,
                                                                        tmp_path):
    os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)
    torch.backends.cudnn.benchmark = True
    device = ['--device', 'cuda' if script is train else 'gpu']
    status = run_in_process(script, ['--data-path', 'synthetic', '--output-dir', str(tmp_path), *device, *flags])
    captured = capsys.readouterr()
    assert status == 2 and 'no CUDA GPU is visible' in captured.err  # the device came after them
    assert 'CUBLAS_WORKSPACE_CONFIG=:4096:8' in captured.out  # (run_in_process restores the environment after)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_without_determinism_no_cuda_flag_is_touched(global_flags, capsys, tmp_path):
    torch.backends.cudnn.deterministic = False
    run_in_process(train, ['--data-path', 'synthetic', '--output-dir', str(tmp_path), '--device', 'cuda'])
    assert not torch.backends.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()


# --- bad input ----------------------------------------------------------------------------------------------------

BAD_PRECISION = {
    'amp dtype': (['--amp', '--amp-dtype', 'float8'], r"argument --amp-dtype: invalid choice: 'float8'"),
    'amp with hmp': (['--amp', '--hmp'], r'--amp with --hmp: two mixed precisions at once'),
    'float16 on hpu': (['--amp', '--device', 'hpu'], r'--amp-dtype float16: Gaudi trains in bfloat16'),
    'amp dtype alone': (['--amp-dtype', 'bfloat16'], r'--amp-dtype bfloat16 does nothing without --amp'),
    'bucket zero': (['--bucket-cap-mb', '0'], r'argument --bucket-cap-mb: expected a positive number, got 0'),
    'bucket negative': (['--bucket-cap-mb', '-5'], r'argument --bucket-cap-mb: expected a positive number, got -5'),
    'bucket word': (['--bucket-cap-mb', 'big'], r"argument --bucket-cap-mb: expected a positive number, got 'big'"),
    'tf32 typo': (['--tf32', 'ture'], r"argument --tf32: expected True or False, got 'ture'"),
}


@pytest.mark.parametrize('script', [train, googlenet])
@pytest.mark.parametrize('case', list(BAD_PRECISION))
def test_bad_precision_and_gpu_flags_are_one_line_and_exit_2_before_any_work(script, case, capsys, tmp_path):
    flags, message = BAD_PRECISION[case]
    status = run_in_process(script, ['--data-path', 'synthetic', '--output-dir', str(tmp_path / 'out'), *flags])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and re.search(message, lines[0]), captured.err
    assert not (tmp_path / 'out').exists() and 'Creating model' not in captured.out


# --- end to end, as processes ----------------------------------------------------------------------------------

FP16_RUN = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--workers', '2', '--print-freq', '3',
            '--train-crop-size', '32', '--val-resize-size', '32', '--val-crop-size', '32', '--lr', '0.01',
            '--amp', '--epochs', '1', '--deterministic', '--save-checkpoint', '--num-eval-steps', '1']


def model_weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_float16_amp_stopped_mid_epoch_resumes_its_scaler_and_ends_with_the_uninterrupted_weights(
        jpeg_dataset, tmp_path, loader):
    import signal
    common = ['train.py', '--data-path', jpeg_dataset, *FP16_RUN, '--dl-worker-type', loader]
    straight = run_script([*common, '--output-dir', str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    header = metrics.read(tmp_path / 'straight' / metrics.FILE_NAME)[0]
    assert header['precision'] == {'amp': 'float16', 'loss_scaling': True, 'hmp': False}

    proc = start_process([*common, '--output-dir', str(tmp_path / 'cut')])
    read_until(proc, r'^Epoch: \[0\]  \[ 6/12\]')
    os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0 and 'Traceback' not in log, log[-3000:]
    checkpoint = torch.load(tmp_path / 'cut' / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch_position'] and checkpoint['scaler']['scale'] > 0

    resumed = run_script([*common, '--output-dir', str(tmp_path / 'cut'), '--workers', '1', '--print-freq', '2',
                          '--resume', str(tmp_path / 'cut' / 'checkpoint.pth')])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert 'note: --resume' not in resumed.stdout  # the scaler and the random state were both there
    straight_model, resumed_model = (model_weights(tmp_path / d / 'model_0.pth') for d in ('straight', 'cut'))
    assert all(torch.equal(straight_model[k], resumed_model[k]) for k in straight_model)


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_of_a_gpu_run_resumes_on_the_cpu_with_a_note_and_the_same_weights(
        jpeg_dataset, tmp_path):
    """A CUDA run's checkpoint differs from a CPU one's by its 'cuda' random state (tensors are on the host):
    the CPU run restores the rest, says so, and ends where the uninterrupted run does."""
    import signal
    common = ['train.py', '--data-path', jpeg_dataset, '--device', 'cpu', '--model', 'resnet18', '--batch-size', '4',
              '--workers', '2', '--print-freq', '3', *TINY_IMAGES, '--epochs', '1', '--deterministic',
              '--save-checkpoint', '--num-eval-steps', '1']
    straight = run_script([*common, '--output-dir', str(tmp_path / 'straight')])
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-2000:]
    proc = start_process([*common, '--output-dir', str(tmp_path / 'cut')])
    read_until(proc, r'^Epoch: \[0\]  \[ 6/12\]')
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.communicate(timeout=180) and proc.returncode == 0
    path = tmp_path / 'cut' / 'checkpoint.pth'
    checkpoint = torch.load(path, weights_only=True)
    checkpoint['rng_state']['cuda'] = torch.zeros(16, dtype=torch.uint8)  # as a GPU run writes it
    torch.save(checkpoint, path)
    resumed = run_script([*common, '--output-dir', str(tmp_path / 'cut'), '--resume', str(path)])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert 'its cuda random state is not used on --device cpu' in resumed.stdout
    straight_model, resumed_model = (model_weights(tmp_path / d / 'model_0.pth') for d in ('straight', 'cut'))
    assert all(torch.equal(straight_model[k], resumed_model[k]) for k in straight_model)
