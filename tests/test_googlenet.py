"""main.py (the GoogLeNet trainer) end to end on CPU: real JPEG folders, real subprocesses, real
mpirun with two gloo ranks (through demo_googlenet.py), real checkpoints read back with weights_only
into torchvision's googlenet; and its HPU step order through the SDK double (conftest)."""
import os
import re
import sys

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import GoogLeNetOutputs

from conftest import REPO, HPUDeviceOnCPU, run_script

from classification import devices, metrics
import main

# 15 px is GoogLeNet's smallest input (main.GOOGLENET_MIN_INPUT); 16 keeps CPU steps cheapest.
GOOGLENET_TINY = ['--train-crop-size', '16', '--val-resize-size', '18', '--val-crop-size', '16']
QUICK = ['--device', 'cpu', '--batch-size', '8', '--workers', '0', *GOOGLENET_TINY]
CLASSES = 4  # jpeg_dataset: 4 classes, 12 train and 5 val images each
VAL_IMAGES = 20


def run_main(data_path, cwd, *extra, expect_rc=0):
    result = run_script([os.path.join(REPO, 'main.py'), '--data-path', data_path, *QUICK, *extra], cwd=cwd)
    assert result.returncode == expect_rc, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def torchvision_googlenet(aux_logits):
    return torchvision.models.googlenet(num_classes=CLASSES, aux_logits=aux_logits, init_weights=False)


def epoch_accuracies(log):
    """Top-1 of each validation, in epoch order."""
    return [float(a) for a in re.findall(r'^ \* Acc@1 (\S+) Acc@5 \S+$', log, flags=re.M)]


# --- command line ---------------------------------------------------------------------------------

def test_cli_defaults_match_habana_1_4_0():
    args = main.get_args_parser().parse_args(['--data-path', 'd'])
    expected = dict(is_amp=False, batch_size=256, dataset_type='Imagenet', device='hpu', distributed=False,
                    dist_url='env://', dl_worker_type='MP', process_per_node=8, evaluate=False,
                    enable_lazy=False, epochs=90, gpu=0, is_hmp=False, hmp_opt_level='O1', hmp_verbose=False,
                    lr=0.1, lr_step_size=30, lr_gamma=0.1, model='googlenet', momentum=0.9,
                    no_aux_logits=False, num_train_steps=sys.maxsize, print_interval=1, pretrained=False,
                    resume=None, save_checkpoint=1, seed=None, start_epoch=0, weight_decay=1e-4, workers=10,
                    output_dir='.', train_crop_size=224, val_resize_size=256, val_crop_size=224)
    assert {k: getattr(args, k) for k in expected} == expected
    assert os.path.basename(args.hmp_bf16) == 'ops_bf16_googlenet.txt' and os.path.isfile(args.hmp_bf16)
    assert os.path.basename(args.hmp_fp32) == 'ops_fp32_googlenet.txt' and os.path.isfile(args.hmp_fp32)


def test_cli_short_flags_and_bare_save_checkpoint_like_the_original():
    parse = main.get_args_parser().parse_args
    args = parse(['--data-path', 'd', '-p', '20', '-e', '-j', '12', '-b', '128', '--learning-rate', '0.07',
                  '--weight-decay', '5e-5', '--dl-worker-type', 'habana', '--save-checkpoint'])
    assert (args.print_interval, args.evaluate, args.workers, args.batch_size) == (20, True, 12, 128)
    assert (args.lr, args.weight_decay, args.dl_worker_type, args.save_checkpoint) == (0.07, 5e-5, 'HABANA', 5)
    assert parse(['--data-path', 'd', '--save-checkpoint', '3']).save_checkpoint == 3


# --- model and loss -------------------------------------------------------------------------------

def test_aux_loss_is_main_plus_three_tenths_of_both_aux_heads():
    torch.manual_seed(0)
    logits, aux2, aux1 = (torch.randn(6, CLASSES) for _ in range(3))
    target = torch.randint(CLASSES, (6,))
    ce = nn.CrossEntropyLoss()
    loss = main.training_loss(ce, GoogLeNetOutputs(logits, aux2, aux1), target)
    assert torch.allclose(loss, ce(logits, target) + 0.3 * (ce(aux2, target) + ce(aux1, target)))
    assert torch.equal(main.training_loss(ce, logits, target), ce(logits, target))


def test_hpu_lazy_step_cuts_the_graph_like_the_original_and_steps_without_casts(sdk):
    ops = [os.path.join(REPO, f'ops_{kind}_googlenet.txt') for kind in ('bf16', 'fp32')]
    dev = HPUDeviceOnCPU(channels_last=False, hmp=devices.HmpConfig(*ops), lazy_mode=True)
    dev.mark_points = devices.EXAMPLES_MARK_POINTS
    model = torchvision_googlenet(aux_logits=True)
    model.register_forward_pre_hook(lambda module, inputs: sdk.CALLS.append('forward'))

    def note_backward(module, inputs, output):
        output.logits.register_hook(lambda grad: sdk.CALLS.append('backward'))
    model.register_forward_hook(note_backward)
    optimizer = dev.make_optimizer(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))]
    sdk.CALLS.clear()
    main.train(loader, model, nn.CrossEntropyLoss(), optimizer, 0, dev, 1, num_train_steps=1)
    assert sdk.CALLS == ['mark_step', 'forward', 'backward', 'mark_step',
                         'hmp.disable_casts:enter', 'optimizer_step', 'hmp.disable_casts:exit', 'mark_step']


# --- real runs ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.parametrize('aux', [True, False], ids=['aux-logits', 'no-aux-logits'])
def test_demo_runs_two_ranks_under_mpirun_evaluates_exactly_and_saves_a_torchvision_checkpoint(
        jpeg_dataset, tmp_path, aux):
    # The demo has no image-size flags, so main.py trains at its default 224 px crops here.
    extra = [] if aux else ['--no-aux-logits']
    result = run_script([os.path.join(REPO, 'demo_googlenet.py'), '--world-size', '2', '--device', 'cpu',
                         '--data-path', jpeg_dataset, '--batch-size', '8', '--epochs', '1', '--num-train-steps', '2',
                         '--workers', '0', '--save-checkpoint', '1', *extra], cwd=tmp_path)
    log = result.stdout
    assert result.returncode == 0, log[-3000:] + result.stderr[-3000:]

    assert re.search(r'^command = mpirun -n 2 .*/main\.py ', log, flags=re.M)
    assert '| distributed init (rank 0' in log and '| distributed init (rank 1' in log
    assert 'Epoch: [0][0/3]' in log and 'Epoch: [0][1/3]' in log  # 24 of the 48 images per rank
    assert 'Epoch: [0][2/3]' not in log  # --num-train-steps 2
    assert f'Test: evaluated {VAL_IMAGES} images' in log  # each val image once, over both ranks
    assert len(epoch_accuracies(log)) == 1

    # Written by rank 0 only, into the current directory as the original does.
    checkpoint = load(tmp_path / 'checkpoint_0_cpu.pth.tar')
    assert (checkpoint['epoch'], checkpoint['arch'], checkpoint['num_classes']) == (0, 'googlenet', CLASSES)
    torchvision_googlenet(aux_logits=aux).load_state_dict(checkpoint['state_dict'], strict=True)
    assert len(checkpoint['state_dict']) == (364 if aux else 344)  # spec-torchvision section 4


@pytest.mark.slow
def test_checkpoint_names_best_copies_resume_and_evaluate(jpeg_dataset, tmp_path):
    # Every second epoch, into the current directory.
    first = run_main(jpeg_dataset, tmp_path, '--epochs', '3', '--save-checkpoint', '2', '--seed', '1',
                     '--lr-step-size', '1').stdout
    accuracies = epoch_accuracies(first)
    assert len(accuracies) == 3
    names = {p.name for p in tmp_path.iterdir()}
    assert names - {'model_best1.pth.tar'} == {'checkpoint_1_cpu.pth.tar', 'checkpoint.pth', 'metrics.jsonl'}
    checkpoint = load(tmp_path / 'checkpoint_1_cpu.pth.tar')
    assert torch.equal(load(tmp_path / 'checkpoint.pth')['state_dict']['fc.weight'], checkpoint['state_dict']['fc.weight'])
    assert set(checkpoint) == {'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer', 'lr_scheduler', 'schedule',
                               'args', 'format_version', 'model_name', 'num_classes', 'classes'}
    assert checkpoint['classes'] == [f'class_{c:02d}' for c in range(CLASSES)]
    assert checkpoint['epoch'] == 1 and checkpoint['best_acc1'] == pytest.approx(max(accuracies[:2]))
    torchvision_googlenet(aux_logits=True).load_state_dict(checkpoint['state_dict'], strict=True)

    # Resume with a best top-1 every epoch beats (-1): the next epoch is a new best, so its checkpoint is
    # copied to model_best2, and the copy is that checkpoint.
    checkpoint['best_acc1'] = -1.0
    beatable = tmp_path / 'beatable.pth.tar'
    torch.save(checkpoint, beatable)
    best_run = tmp_path / 'best'
    run_main(jpeg_dataset, tmp_path, '--epochs', '3', '--save-checkpoint', '1', '--resume', str(beatable),
             '--output-dir', str(best_run))
    assert {p.name for p in best_run.iterdir()} == {'checkpoint_2_cpu.pth.tar', 'checkpoint.pth', 'model_best2.pth.tar',
                                                'metrics.jsonl'}
    saved, best = load(best_run / 'checkpoint_2_cpu.pth.tar'), load(best_run / 'model_best2.pth.tar')
    assert best['epoch'] == 2 and best['best_acc1'] == saved['best_acc1'] >= 0.0
    assert all(torch.equal(best['state_dict'][k], v) for k, v in saved['state_dict'].items())

    # Resume with a best top-1 no epoch can beat: best_acc1 must carry over, so no best copy.
    checkpoint['best_acc1'] = 100.0
    resumable = tmp_path / 'unbeatable.pth.tar'
    torch.save(checkpoint, resumable)
    out = tmp_path / 'resumed'
    second = run_main(jpeg_dataset, tmp_path, '--epochs', '3', '--save-checkpoint', '1', '--lr-step-size', '1',
                      '--resume', str(resumable), '--output-dir', str(out)).stdout
    assert f"=> loaded checkpoint '{resumable}' (epoch 1)" in second
    assert 'training epoch  2' in second and 'training epoch  1' not in second
    assert re.search(r'^END OF EPOCH \[2\]:\[1/1\]\tEpochTime ', second, flags=re.M)
    assert {p.name for p in out.iterdir()} == {'checkpoint_2_cpu.pth.tar', 'checkpoint.pth', 'metrics.jsonl'}
    resumed = load(out / 'checkpoint_2_cpu.pth.tar')
    assert resumed['best_acc1'] == 100.0
    # The step schedule went on from the checkpoint: three decays of 0.1 after epochs 0, 1 and 2.
    assert resumed['lr_scheduler']['last_epoch'] == 3
    assert resumed['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.1 * 0.1 ** 3)

    # --evaluate on the resumed weights reproduces the last validation exactly.
    evaluated = run_main(jpeg_dataset, tmp_path, '--evaluate', '--resume', str(out / 'checkpoint_2_cpu.pth.tar'),
                         '--output-dir', str(out)).stdout
    assert 'training epoch' not in evaluated and 'MODEL EVAL' in evaluated
    assert f'Test: evaluated {VAL_IMAGES} images' in evaluated
    assert epoch_accuracies(evaluated) == epoch_accuracies(second)
    assert {p.name for p in out.iterdir()} == {'checkpoint_2_cpu.pth.tar', 'checkpoint.pth', 'metrics.jsonl'}  # --evaluate: records only
    evaluation = metrics.read(str(out))[-2:]
    assert [r['type'] for r in evaluation] == ['header', 'val'] and evaluation[0]['mode'] == 'test-only'
    assert evaluation[1]['val.top1'] == pytest.approx(epoch_accuracies(second)[-1], abs=1e-3)


@pytest.mark.slow
def test_resume_with_the_other_aux_setting_is_one_clear_error(jpeg_dataset, tmp_path):
    run_main(jpeg_dataset, tmp_path, '--epochs', '1', '--num-train-steps', '1')
    result = run_main(jpeg_dataset, tmp_path, '--no-aux-logits', '--evaluate',
                      '--resume', str(tmp_path / 'checkpoint_0_cpu.pth.tar'), expect_rc=2)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume: '{tmp_path / 'checkpoint_0_cpu.pth.tar'}' was trained with the auxiliary "
        'classifiers; drop --no-aux-logits to resume it')


# --- log lines ------------------------------------------------------------------------------------

NUM = r' *-?\d+\.\d{3}'
TIME_FIELD = r'{name} (?P<{key}>{num}) \((?P<{key}_avg>{num})\)'
SCI = r'-?\d\.\d{4}e[+-]\d{2}'
PCT = r' *\d+\.\d{2}'


def train_line_pattern(epoch, with_compute_rate):
    fields = [TIME_FIELD.format(name='BatchTime', key='batch', num=NUM)]
    if with_compute_rate:
        fields.append(TIME_FIELD.format(name=r'imgs/s\(Exc\. DL\)', key='exc', num=NUM))
    fields += [TIME_FIELD.format(name=r'imgs/s\(Inc\. DL\)', key='inc', num=NUM),
               TIME_FIELD.format(name='DL Time', key='dl', num=NUM),
               rf'Loss (?P<loss>{SCI}) \((?P<loss_avg>{SCI})\)',
               rf'Acc@1 {PCT} \({PCT}\)', rf'Acc@5 {PCT} \({PCT}\)']
    return re.compile(rf'^Epoch: \[{epoch}\]\[(?P<i>\d)/6\]\t' + '\t'.join(fields) + '$', flags=re.M)


@pytest.mark.slow
def test_progress_lines_every_step_with_warm_up_left_out_of_the_averages(jpeg_dataset, tmp_path):
    log = run_main(jpeg_dataset, tmp_path, '--epochs', '1', '--num-train-steps', '3', '--print-interval', '1',
                   '--save-checkpoint', '0').stdout
    lines = list(train_line_pattern(0, with_compute_rate=True).finditer(log))
    assert [int(m['i']) for m in lines] == [0, 1, 2]  # --num-train-steps 3
    timing = ('batch', 'exc', 'inc', 'dl')
    for warm_up in lines[:2]:  # the first two print windows are not averaged ...
        assert all(float(warm_up[k + '_avg']) == 0 for k in timing)
    assert all(lines[2][k + '_avg'] == lines[2][k] for k in timing)  # ... the third is the first that is
    assert lines[0]['loss_avg'] == lines[0]['loss']  # loss and accuracy average from the start
    assert re.search(rf'^Test: \[0/3\]\tBatchTime {NUM} \({NUM}\)\timgs/s\(Inc\. DL\) {NUM} \({NUM}\)\t'
                     rf'Loss {SCI} \({SCI}\)\tAcc@1 {PCT} \({PCT}\)\tAcc@5 {PCT} \({PCT}\)$', log, flags=re.M)
    assert re.search(rf'^Test: evaluated {VAL_IMAGES} images\n \* Acc@1 \d+\.\d{{3}} Acc@5 \d+\.\d{{3}}$',
                     log, flags=re.M)
    assert re.search(rf'^END OF EPOCH \[0\]:\[1/1\]\tEpochTime {NUM} \({NUM}\)$', log, flags=re.M)
    assert [p.name for p in tmp_path.iterdir()] == ['metrics.jsonl']  # --save-checkpoint 0 saves nothing


@pytest.mark.slow
def test_progress_lines_at_a_print_interval(jpeg_dataset, tmp_path):
    log = run_main(jpeg_dataset, tmp_path, '--epochs', '2', '--num-train-steps', '2', '--print-interval', '2',
                   '--save-checkpoint', '0').stdout
    assert 'imgs/s(Exc. DL)' not in log  # only shown with --print-interval 1
    first, later = (list(train_line_pattern(e, with_compute_rate=False).finditer(log)) for e in (0, 1))
    assert [int(m['i']) for m in first] == [0] and [int(m['i']) for m in later] == [0]
    assert float(first[0]['batch_avg']) == 0  # warm-up: the run's first epoch only
    assert later[0]['batch_avg'] == later[0]['batch'] and later[0]['inc_avg'] == later[0]['inc']
    assert len(re.findall(r'^Test: \[\d/3\]', log, flags=re.M)) == 2  # one line per validation (i = 0)
    assert log.count('Test: evaluated 16 images') == 2  # validation also stops at --num-train-steps
