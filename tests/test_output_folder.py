"""--output-dir in real conditions (docs/guarantees.md): a file in the way, a read-only or full disk, two
runs sharing one folder, and checkpoints written by the originals' scripts."""
import argparse
import hashlib
import os
import re
import resource
import signal
import subprocess
import threading
import time

import pytest
import torch
import torchvision

from conftest import TINY_IMAGES, mpirun_prefix, read_until, run_script, start_process

from classification import checkpoints, output_folder
import main
import train
from classification.cli import CleanExit, UsageError

QUICK = ['--device', 'cpu', '--model', 'resnet18', '--batch-size', '4', '--print-freq', '2', *TINY_IMAGES]
GOOGLENET_QUICK = ['--device', 'cpu', '--batch-size', '4', '--train-crop-size', '16', '--val-resize-size', '18',
                   '--val-crop-size', '16']


@pytest.fixture
def keep_sigterm_handler():
    """train.main installs its SIGTERM handler; give pytest its own back."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def run_in_process(trainer, argv):
    trainer.main(trainer.get_args_parser().parse_args(argv))


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only): the way to get a really full or read-only file system."""
    mounted = []

    def mount(name, options):
        folder = tmp_path / name
        folder.mkdir()
        result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f'cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {result.stderr.strip()}')
        mounted.append(folder)
        return folder
    yield mount
    for folder in mounted:
        subprocess.run(['umount', '-l', str(folder)], check=False)


def fill(folder):
    """Write until the file system is full."""
    fd = os.open(folder / 'filler', os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b'\0' * 4096)
    except OSError as err:
        assert err.errno == 28
    finally:
        os.close(fd)


def sha1(path):
    with open(path, 'rb') as f:
        return hashlib.sha1(f.read()).hexdigest()


def temp_files(folder):
    return [name for name in os.listdir(folder) if name.endswith('.tmp')]


# --- item 11: the folder is checked before any work starts ---------------------------------------------

@pytest.mark.parametrize('trainer', [train, main])
@pytest.mark.parametrize('where', ['the folder', 'a parent'])
def test_a_file_in_the_way_of_output_dir_is_refused_before_any_work(trainer, where, tmp_path):
    (tmp_path / 'results').write_text('a file')
    output = tmp_path / 'results' / ('' if where == 'the folder' else 'run1')
    with pytest.raises(UsageError, match=rf"^--output-dir: '{tmp_path}/results' is a file, not a folder; give a "
                                         r'folder path'):
        run_in_process(trainer, ['--data-path', str(tmp_path / 'no-data'), '--output-dir', str(output), *QUICK[:2]])
    assert (tmp_path / 'results').read_text() == 'a file'


@pytest.mark.parametrize('trainer', [train, main])
def test_a_read_only_output_dir_is_refused_before_any_work(trainer, tmpfs, tmp_path):
    read_only = tmpfs('ro', 'ro,size=1m')
    with pytest.raises(UsageError, match=rf"^--output-dir: cannot write to '{read_only}': \[Errno 30\] Read-only "
                                         r'file system \(EROFS\); use a writable --output-dir$'):
        run_in_process(trainer, ['--data-path', str(tmp_path / 'no-data'), '--output-dir', str(read_only), *QUICK[:2]])


@pytest.mark.parametrize('trainer', [train, main])
def test_a_full_output_dir_is_refused_before_any_work(trainer, tmpfs, tmp_path):
    full = tmpfs('full', 'size=1m')
    fill(full)
    with pytest.raises(UsageError, match=rf"^--output-dir: cannot write to '{full}': \[Errno 28\] No space left on "
                                         r'device \(ENOSPC\); free some space there or use another --output-dir$'):
        run_in_process(trainer, ['--data-path', str(tmp_path / 'no-data'), '--output-dir', str(full), *QUICK[:2]])
    assert sorted(os.listdir(full)) == ['filler']  # no probe file left


def test_a_failed_write_names_the_path_and_errno_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    """A write that fails half-way, without privileges: RLIMIT_FSIZE makes writes past 64 KiB fail (EFBIG;
    Python ignores SIGXFSZ) just as a full disk does (ENOSPC: see the tmpfs tests)."""
    path = tmp_path / 'checkpoint.pth'
    output_folder.atomic_save({'w': torch.zeros(10)}, str(path))
    before = sha1(path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(CleanExit) as failed:
            output_folder.atomic_save({'w': torch.zeros(1_000_000)}, str(path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(failed.value) == (f'could not save {path}: [Errno 27] File too large (EFBIG); '
                                 'the previous checkpoint is unchanged')
    assert failed.value.exit_code == 1
    assert sha1(path) == before and temp_files(tmp_path) == []


# --- item 12: unique temporary files and the folder lock ---------------------------------------------------

def test_concurrent_saves_to_one_path_never_collide(tmp_path):
    path, errors = str(tmp_path / 'checkpoint.pth'), []

    def save_repeatedly(value):
        try:
            for _ in range(40):
                output_folder.atomic_save({'w': torch.full((20_000,), float(value))}, path)
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(repr(err))
    threads = [threading.Thread(target=save_repeatedly, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert torch.load(path, weights_only=True)['w'].unique().numel() == 1  # one writer's file, whole
    assert temp_files(tmp_path) == []


def test_the_lock_refuses_a_second_holder_naming_the_first_and_goes_away_on_release(tmp_path):
    first = output_folder.lock_folder(str(tmp_path))
    with pytest.raises(UsageError, match=rf"^--output-dir: '{tmp_path}' is in use by another run \(pid {os.getpid()}, "
                                         r'started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); use another --output-dir$'):
        output_folder.lock_folder(str(tmp_path))
    first.release()
    assert os.listdir(tmp_path) == []
    output_folder.lock_folder(str(tmp_path)).release()


def test_claiming_a_folder_removes_only_the_temporary_files_of_interrupted_saves(tmp_path):
    leftover = tmp_path / '.checkpoint.pth.4242.0a1b2c3d.tmp'
    leftover.write_bytes(b'half a checkpoint')
    users = [tmp_path / 'notes.tmp', tmp_path / '.vimrc.tmp', tmp_path / 'model_0.pth']
    for path in users:
        path.write_text('keep')
    output_folder.claim(str(tmp_path), rank=0)
    assert not leftover.exists() and all(path.exists() for path in users)
    output_folder.claim(str(tmp_path / 'rank1'), rank=1)  # other ranks do not write: nothing made
    assert not (tmp_path / 'rank1').exists()


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_a_second_run_on_the_same_output_dir_is_refused_and_kill_9_frees_the_folder(jpeg_dataset, tmp_path, loader):
    out = tmp_path / 'out'
    common = ['train.py', '--data-path', jpeg_dataset, '--output-dir', str(out), *QUICK, '--workers', '2',
              '--dl-worker-type', loader, '--save-checkpoint']
    first = start_process([*common, '--epochs', '50'])
    try:
        read_until(first, r'^Epoch: \[0\]  \[ ?0/')
        second = run_script([*common, '--epochs', '1'], timeout=60)
        assert second.returncode == 2, second.stdout[-1500:] + second.stderr[-1500:]
        refusal = (rf"error: --output-dir: '{out}' is in use by another run \(pid {first.pid}, started "
                   r'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\); use another --output-dir\n')
        assert re.fullmatch(refusal, second.stderr), second.stderr
        assert 'Epoch' not in second.stdout
        first.kill()  # kill -9 of the trainer alone: its loader workers may outlive it for a moment
        first.wait()
        output_folder.lock_folder(str(out)).release()  # free at once: the workers never held the lock
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()


# --- item 11: a save that fails mid-run ---------------------------------------------------------------

def checkpoint_size(model_name, num_classes):
    """About the bytes of a train.py checkpoint: the weights, one momentum buffer each, and the buffers."""
    model = torchvision.models.get_model(model_name, num_classes=num_classes)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * params + sum(b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_run_ends_the_run_at_once_keeping_the_previous_checkpoint(jpeg_dataset, tmpfs):
    size = checkpoint_size('mobilenet_v2', 4)
    disk = tmpfs('disk', f'size={size * 5 // 2}')  # room for epoch 0's two files, not for epoch 1's
    result = run_script(['train.py', '--data-path', jpeg_dataset, '--output-dir', str(disk), *QUICK, '--model',
                         'mobilenet_v2', '--workers', '2', '--dl-worker-type', 'MP', '--epochs', '4',
                         '--num-train-steps', '2', '--num-eval-steps', '0', '--save-checkpoint'], timeout=180)
    assert result.returncode == 1, result.stdout[-1500:] + result.stderr[-1500:]
    assert result.stderr.strip() == (f'error: could not save {disk}/model_1.pth: [Errno 28] No space left on device '
                                     '(ENOSPC); the previous checkpoint is unchanged')
    assert 'Epoch: [2]' not in result.stdout  # stopped at once
    assert sorted(os.listdir(disk)) == ['checkpoint.pth', 'metrics.jsonl', 'model_0.pth']  # no temp file, no lock
    checkpoint = torch.load(disk / 'checkpoint.pth', weights_only=True)
    assert checkpoint['epoch'] == 0 and sha1(disk / 'checkpoint.pth') == sha1(disk / 'model_0.pth')


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize('launch', ['mpirun', 'demo_resnet.py'])
def test_a_failed_save_on_rank_0_ends_a_two_rank_job(jpeg_dataset, tmpfs, launch):
    disk = tmpfs('disk', 'size=1m')
    flags = ['--data-path', jpeg_dataset, '--output-dir', str(disk), '--device', 'cpu', '--model', 'resnet18',
             '--batch-size', '4', '--workers', '2', '--print-freq', '2', '--epochs', '3', '--num-train-steps', '1',
             '--num-eval-steps', '0', '--save-checkpoint']
    if launch == 'mpirun':
        command = mpirun_prefix(2) + ['train.py', *flags, '--dl-worker-type', 'MP', *TINY_IMAGES]
    else:
        command = ['demo_resnet.py', '--world-size', '2', '--dl-worker-type', 'FAST', *flags]
    started = time.time()
    result = run_script(command, timeout=240)
    assert result.returncode != 0, result.stdout[-1500:] + result.stderr[-1500:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert errors[0] == (f'error: could not save {disk}/model_0.pth: [Errno 28] No space left on device (ENOSPC); '
                         'the previous checkpoint is unchanged'), result.stderr[-3000:]
    assert all(line.startswith('error: another rank ended') for line in errors[1:]), errors  # rank 1, if in time
    assert 'Traceback' not in result.stderr
    assert 'Epoch: [1]' not in result.stdout and time.time() - started < 200
    assert os.listdir(disk) == ['metrics.jsonl']  # rank 0's records up to the failed save


# --- item 13: checkpoints written by the originals -----------------------------------------------------

def trained_state(model, lr):
    """A model and SGD optimizer after one real step (momentum buffers filled), then set to `lr`."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    model.train()
    output = model(torch.randn(2, 3, 32, 32))
    loss = (output.logits if hasattr(output, 'logits') else output).sum()
    loss.backward()
    optimizer.step()
    for group in optimizer.param_groups:
        group['lr'] = lr
    return optimizer, schedule


def small_model(num_classes):
    """Stands in for the named model where only the checkpoint's identity is checked (quicker to save)."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(2, num_classes))


def torchvision_reference_checkpoint(path, model_name='resnet18', num_classes=4, lr=0.0, small=False, **extra_args):
    """What torchvision's (and Habana's) references/classification/train.py saves: `args` is the Namespace."""
    model = small_model(num_classes) if small else torchvision.models.get_model(model_name, num_classes=num_classes)
    optimizer, schedule = trained_state(model, lr)
    args = argparse.Namespace(data_path='/data/imagenet', model=model_name, device='cuda', batch_size=32, epochs=90,
                              workers=16, lr=0.1, momentum=0.9, weight_decay=1e-4, lr_step_size=30, lr_gamma=0.1,
                              print_freq=10, output_dir='.', resume='', start_epoch=0, cache_dataset=False,
                              sync_bn=False, test_only=False, pretrained=False, apex=False, apex_opt_level='O1',
                              world_size=8, dist_url='env://', distributed=True, rank=0, gpu=0, **extra_args)
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': schedule.state_dict(), 'epoch': 0, 'args': args}, path)
    return model


def test_resume_of_a_torchvision_reference_checkpoint(jpeg_dataset, tmp_path, capsys, keep_sigterm_handler):
    reference = torchvision_reference_checkpoint(tmp_path / 'checkpoint.pth')  # its optimizer's lr is 0
    run_in_process(train, ['--data-path', jpeg_dataset, '--output-dir', str(tmp_path / 'out'), *QUICK,
                           '--workers', '0', '--dl-worker-type', 'MP', '--epochs', '2', '--num-train-steps', '2',
                           '--num-eval-steps', '1', '--save-checkpoint', '--resume', str(tmp_path / 'checkpoint.pth')])
    log = capsys.readouterr().out
    assert "was written by torchvision's reference train.py; resuming its model, optimizer" in log
    assert 'Epoch: [0]' not in log and 'Epoch: [1]' in log
    resumed = torch.load(tmp_path / 'out' / 'model_1.pth', weights_only=True)
    # lr 0 came with the optimizer state, so the weights are the reference's, unchanged by training
    assert all(torch.equal(resumed['model'][k], v) for k, v in reference.state_dict().items() if k.endswith('weight'))
    assert resumed['model_name'] == 'resnet18' and resumed['num_classes'] == 4


@pytest.mark.parametrize('source', ['pytorch/examples', 'Habana main.py'])
def test_main_py_resumes_an_imagenet_main_py_checkpoint(source, jpeg_dataset, tmp_path, capsys, keep_sigterm_handler):
    model = torchvision.models.resnet18(num_classes=4)
    optimizer, schedule = trained_state(model, lr=0.0)
    if source == 'pytorch/examples':  # the DDP-wrapped model's keys, the next epoch, `scheduler`
        checkpoint = {'epoch': 1, 'arch': 'resnet18', 'best_acc1': torch.tensor(25.0),
                      'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                      'optimizer': optimizer.state_dict(), 'scheduler': schedule.state_dict()}
    else:  # the last epoch run, `lr_scheduler`
        checkpoint = {'epoch': 0, 'arch': 'resnet18', 'best_acc1': 25.0, 'state_dict': model.state_dict(),
                      'optimizer': optimizer.state_dict(), 'lr_scheduler': schedule.state_dict()}
    torch.save(checkpoint, tmp_path / 'checkpoint.pth.tar')
    run_in_process(main, ['--data-path', jpeg_dataset, '--output-dir', str(tmp_path / 'out'), *GOOGLENET_QUICK,
                          '--model', 'resnet18', '--workers', '0', '--epochs', '2', '--num-train-steps', '2',
                          '--resume', str(tmp_path / 'checkpoint.pth.tar')])
    log = capsys.readouterr().out
    assert f"=> loaded checkpoint '{tmp_path}/checkpoint.pth.tar' (epoch 0)" in log
    assert 'training epoch  0' not in log and 'training epoch  1' in log
    resumed = torch.load(tmp_path / 'out' / 'checkpoint_1_cpu.pth.tar', weights_only=True)
    assert all(torch.equal(resumed['state_dict'][k], v) for k, v in model.state_dict().items() if k.endswith('weight'))


def other_schedule(path):
    torchvision_reference_checkpoint(path, small=True)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint['lr_scheduler'] = {'T_max': 90, 'eta_min': 0.0, 'base_lrs': [0.1], 'last_epoch': 1}
    torch.save(checkpoint, path)


def two_parameter_groups(path):
    torchvision_reference_checkpoint(path, small=True)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint['optimizer']['param_groups'].append(dict(checkpoint['optimizer']['param_groups'][0], params=[]))
    torch.save(checkpoint, path)


def unsafe_object(path):
    import pathlib
    torchvision_reference_checkpoint(path, small=True, output_dir_path=pathlib.PurePosixPath('/runs/1'))


@pytest.mark.parametrize('make, message', [
    (lambda p: torchvision_reference_checkpoint(p, model_name='resnet34', small=True),
     'holds a resnet34 model but --model is resnet18'),
    (lambda p: torchvision_reference_checkpoint(p, num_classes=10, small=True),
     'was trained on 10 classes but the dataset has 4'),
    (lambda p: torchvision_reference_checkpoint(p, opt='adamw', small=True),
     'was trained with --opt adamw; these trainers use SGD'),
    (two_parameter_groups, 'holds an optimizer with 2 parameter groups'),
    (other_schedule, 'holds a learning-rate schedule other than StepLR'),
    (unsafe_object, 'holds a Python object of type pathlib.PurePosixPath, which is not loaded because loading it '
                    'could run code from the file'),
])
def test_an_original_checkpoint_that_does_not_fit_is_refused_in_one_plain_line(make, message, tmp_path):
    path = tmp_path / 'checkpoint.pth'
    make(path)
    with pytest.raises(UsageError) as refused:
        checkpoints.load(str(path), 'resnet18', 4, ('model', 'optimizer', 'lr_scheduler', 'epoch'))
    text = str(refused.value)
    assert text.startswith(f"--resume: '{path}' ") and message in text
    assert '\x1b' not in text and '\n' not in text


def test_torch_error_text_is_printed_without_terminal_colour_codes():
    err = RuntimeError('Weights only load failed. \x1b[1mdo those steps only if you trust the source\x1b[0m.\nmore')
    assert checkpoints.plain_text(err) == 'Weights only load failed. do those steps only if you trust the source.'
