"""inference.py: top-5 per image and folder accuracy from the trainers' checkpoints, and the class names those
checkpoints now record. One slow test trains with train.py and runs inference.py as a user would; the rest run
in-process on checkpoints a test writes."""
import argparse
import os
import re
import shutil

import pytest
import torch
import torchvision
from PIL import Image

from conftest import REPO, TINY_IMAGES, HPUDeviceOnCPU, run_in_process, run_script

from classification import checkpoints, cli, data, devices
import inference
import main as googlenet
import train

CLASSES = [f'class_{c:02d}' for c in range(4)]  # jpeg_dataset
RESIZE, CROP = 40, 32  # TINY_IMAGES
TOP5 = re.compile(r'^(?P<path>\S+): (?P<ranked>.+)$', flags=re.M)
ACCURACY = re.compile(r'^(?P<folder>\S+): Acc@1 (?P<acc1>\d+\.\d{3}) Acc@5 (?P<acc5>\d+\.\d{3}) over (?P<n>\d+) images',
                      flags=re.M)


def ranked(text):
    """[(class name, probability)] of one top-5 line's right-hand side."""
    return [(name, float(p)) for name, p in (pair.rsplit(' ', 1) for pair in text.split(', '))]


def predictions(out):
    return {m['path']: ranked(m['ranked']) for m in TOP5.finditer(out) if 'Acc@1' not in m['ranked']}


def run_inference(argv):
    """inference.py's __main__ in this process: the exit status (0 when main returns)."""
    try:
        cli.run_cli(inference.main, inference.get_args_parser().parse_args(argv))
        return 0
    except SystemExit as exit_:
        return exit_.code


def resnet18(seed):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=len(CLASSES)).eval()


def write_checkpoint(path, fields, classes=CLASSES, model_name='resnet18'):
    torch.save(checkpoints.stamp(dict(fields), model_name, len(CLASSES), classes), path)
    return str(path)


def train_py_fields(model):
    return {'model': model.state_dict(), 'epoch': 0, 'args': {'model': 'resnet18', 'val_resize_size': RESIZE,
                                                              'val_crop_size': CROP}}


def expected(model, path):
    """The top-5 of one image computed directly: the trainers' validation transform, softmax."""
    image = data.eval_transform(RESIZE, CROP)(Image.open(path).convert('RGB'))
    with torch.no_grad():
        probabilities = torch.softmax(model(image[None]), dim=1)[0]
    return [(CLASSES[i], probabilities[i].item()) for i in probabilities.argsort(descending=True).tolist()]


def assert_matches(got, want):
    assert [name for name, _ in got] == [name for name, _ in want]
    assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=2e-4)


def val_image(dataset, c=0, i=0):
    return os.path.join(dataset, 'val', f'class_{c:02d}', f'val_{c:02d}_{i:05d}.JPEG')


# --- end to end ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_inference_on_a_train_py_checkpoint_prints_top5_names_and_the_accuracy_train_py_printed(jpeg_dataset,
                                                                                                 tmp_path):
    trained = run_script(['train.py', '--data-path', jpeg_dataset, '--output-dir', str(tmp_path), '--model', 'resnet18',
                          '--device', 'cpu', '--dl-worker-type', 'MP', '--workers', '2', '--batch-size', '8',
                          '--epochs', '1', '--lr', '0.01', '--print-freq', '100', '--save-checkpoint', *TINY_IMAGES])
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    train_acc1 = re.search(r'^ \* Acc@1 (\S+) Acc@5 (\S+)$', trained.stdout, flags=re.M)
    checkpoint = os.path.join(tmp_path, 'model_0.pth')
    val = os.path.join(jpeg_dataset, 'val')
    singles = [val_image(jpeg_dataset, 0, 0), val_image(jpeg_dataset, 3, 1)]

    # --model and the sizes come from the checkpoint
    result = run_script(['inference.py', '--checkpoint', checkpoint, *singles, val, '--workers', '0',
                         '--channels-last', 'False'])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = predictions(result.stdout)
    assert set(singles) <= set(lines) and len(lines) == 20  # the two singles are val images too
    for top in lines.values():
        assert sorted(name for name, _ in top) == CLASSES  # 4 classes: all of them, by name
        assert all(0 <= p <= 1 for _, p in top) and sum(p for _, p in top) <= 1 + 1e-3
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    accuracy = ACCURACY.search(result.stdout)
    assert (accuracy['folder'], accuracy['n']) == (val, '20')
    assert (accuracy['acc1'], accuracy['acc5']) == train_acc1.groups()  # the same images, transform and weights
    assert 'images resized to 40, center crop 32' in result.stderr

    result = run_script(['inference.py', '--checkpoint', checkpoint, '--model', 'resnet18', val, '--hmp',
                         '--channels-last', 'True', '--batch-size', '7', '--workers', '0'])
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(predictions(result.stdout)) == 20 and ACCURACY.search(result.stdout)['n'] == '20'


# --- in-process ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('trainer', [train, googlenet], ids=['train.py', 'main.py'])
def test_the_trainers_checkpoints_record_the_class_names_in_label_order(jpeg_dataset, tmp_path, trainer, capsys):
    common = ['--data-path', jpeg_dataset, '--output-dir', str(tmp_path), '--device', 'cpu', '--workers', '0',
              '--dl-worker-type', 'MP', '--batch-size', '8', '--epochs', '1', '--num-train-steps', '1', *TINY_IMAGES]
    if trainer is train:
        argv, saved = [*common, '--model', 'resnet18', '--num-eval-steps', '0', '--save-checkpoint'], 'model_0.pth'
    else:
        argv, saved = [*common, '--no-aux-logits'], 'checkpoint_0_cpu.pth.tar'
    assert run_in_process(trainer, argv) == 0, capsys.readouterr().err
    checkpoint = torch.load(tmp_path / saved, weights_only=True)
    assert checkpoint['classes'] == CLASSES and checkpoint['num_classes'] == 4
    assert checkpoint['args']['val_crop_size'] == CROP


def test_an_old_checkpoint_without_class_names_prints_indices_and_says_so_once(jpeg_dataset, tmp_path, capsys):
    model = resnet18(0)
    path = write_checkpoint(tmp_path / 'old.pth', train_py_fields(model), classes=None)
    image = val_image(jpeg_dataset)
    assert run_inference(['--checkpoint', path, image, '--workers', '0']) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and 'records no class names' in notes[0] and 'indices 0-3' in notes[0]
    want = [(str(CLASSES.index(name)), p) for name, p in expected(model, image)]
    assert_matches(predictions(out)[image], want)


def test_a_sub_folder_that_is_not_a_class_is_noted_and_not_scored(jpeg_dataset, tmp_path, capsys):
    model = resnet18(1)
    path = write_checkpoint(tmp_path / 'm.pth', train_py_fields(model))
    folder = tmp_path / 'val'
    shutil.copytree(os.path.join(jpeg_dataset, 'val', 'class_01'), folder / 'class_01')
    shutil.copytree(os.path.join(jpeg_dataset, 'val', 'class_02'), folder / 'unsorted')
    assert run_inference(['--checkpoint', path, str(folder), '--workers', '0']) == 0
    out, err = capsys.readouterr()
    assert len(predictions(out)) == 10  # all predicted ...
    assert ACCURACY.search(out)['n'] == '5'  # ... only class_01 scored
    top1 = [top[0][0] for p, top in predictions(out).items() if '/class_01/' in p]
    assert float(ACCURACY.search(out)['acc1']) == pytest.approx(100 * top1.count('class_01') / 5, abs=1e-3)
    assert [line for line in err.splitlines() if line.startswith('note:')] == [
        f"note: 1 sub-folder(s) of '{folder}' are not classes of the checkpoint (unsorted): their images are "
        'predicted but not scored']


def test_an_unreadable_image_is_skipped_with_one_line_naming_it(jpeg_dataset, tmp_path, capsys):
    path = write_checkpoint(tmp_path / 'm.pth', train_py_fields(resnet18(2)))
    folder = tmp_path / 'val'
    shutil.copytree(os.path.join(jpeg_dataset, 'val', 'class_00'), folder / 'class_00')
    broken = folder / 'class_00' / 'broken.JPEG'
    broken.write_bytes(b'not a jpeg')
    json_path = tmp_path / 'out.json'
    assert run_inference(['--checkpoint', path, str(folder), '--workers', '0', '--batch-size', '2',
                          '--output-json', str(json_path)]) == 0
    out, err = capsys.readouterr()
    skipped = [line for line in err.splitlines() if 'broken.JPEG' in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"note: skipped: cannot decode image '{broken}'")
    accuracy_line = [line for line in out.splitlines() if ' Acc@1 ' in line]
    assert len(predictions(out)) == 5 and accuracy_line[0].endswith('over 5 images (1 unreadable skipped)')
    summary = inference.json.loads(json_path.read_text())
    assert len(summary['images']) == 5 and summary['skipped'][0]['path'] == str(broken)
    assert summary['folders'][0]['images'] == 5 and summary['images'][0]['label'] == 'class_00'


def test_a_checkpoint_of_another_model_or_a_missing_input_is_one_line(jpeg_dataset, tmp_path, capsys):
    path = write_checkpoint(tmp_path / 'm.pth', train_py_fields(resnet18(0)))
    assert run_inference(['--checkpoint', path, '--model', 'resnet50', val_image(jpeg_dataset)]) == 2
    assert capsys.readouterr().err == f"error: --checkpoint: '{path}' holds a resnet18 model but --model is resnet50\n"
    assert run_inference(['--checkpoint', path, str(tmp_path / 'nothing.jpg')]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: '{tmp_path / 'nothing.jpg'}' does not exist")
    assert run_inference(['--checkpoint', path, '--ema', val_image(jpeg_dataset)]) == 2
    assert 'holds no EMA weights' in capsys.readouterr().err


def test_ema_main_py_and_torchvision_reference_checkpoints_predict_with_their_weights(jpeg_dataset, tmp_path, capsys):
    image = val_image(jpeg_dataset, 2, 3)
    model, averaged = resnet18(3), resnet18(4)
    ema = torch.optim.swa_utils.AveragedModel(averaged, use_buffers=True)
    ema_path = write_checkpoint(tmp_path / 'ema.pth', dict(train_py_fields(model), model_ema=ema.state_dict()))
    reference = tmp_path / 'reference.pth'  # torchvision's reference train.py: no stamp, args a Namespace
    torch.save({'model': model.state_dict(), 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 3,
                'args': argparse.Namespace(model='resnet18', opt='adamw')}, reference)
    torch.manual_seed(5)
    net = torchvision.models.googlenet(num_classes=4, aux_logits=True, init_weights=False).eval()
    main_path = write_checkpoint(tmp_path / 'g.pth.tar', {'state_dict': net.state_dict(), 'arch': 'googlenet',
                                                          'epoch': 0, 'args': {'pretrained': False}},
                                 model_name='googlenet')
    sizes = ['--val-resize-size', str(RESIZE), '--val-crop-size', str(CROP), '--workers', '0', image]
    errors = ''
    for argv, want in (([ema_path, '--ema'], averaged), ([ema_path], model), ([str(reference)], model),
                       ([main_path], net)):
        assert run_inference(['--checkpoint', *argv, *sizes]) == 0, argv
        out, err = capsys.readouterr()
        errors += err
        names = {str(i): name for i, name in enumerate(CLASSES)} if argv == [str(reference)] else {}
        got = [(names.get(name, name), p) for name, p in predictions(out)[image]]  # the reference's: indices
        assert_matches(got, expected(want, image))
    assert "was written by torchvision's reference train.py; using its model weights" in errors  # adamw: no matter


def test_on_hpu_the_device_layer_converts_hmp_cuts_the_graph_per_batch_and_lays_weights_filters_last(sdk, jpeg_dataset):
    hmp = devices.HmpConfig(os.path.join(REPO, 'ops_bf16_Resnet.txt'), os.path.join(REPO, 'ops_fp32_Resnet.txt'))
    dev = HPUDeviceOnCPU(channels_last=False, hmp=hmp)
    dev.mark_points = frozenset({'eval_input'})
    assert any(c[0] == 'hmp.convert' for c in sdk.CALLS if isinstance(c, tuple))
    model = dev.prepare_eval_model(resnet18(0))
    items = inference.list_inputs([os.path.join(jpeg_dataset, 'val')], CLASSES)
    loader = inference.make_loader(items, data.eval_transform(RESIZE, CROP), 8, 0, dev.worker_start_method)
    sdk.CALLS.clear()
    results, scores, skipped = inference.run(model, dev, loader, items, CLASSES)
    assert sdk.CALLS == ['mark_step'] * 3 and len(results) == 20 and not skipped  # 3 batches of up to 8

    permuting = HPUDeviceOnCPU(channels_last=True)
    assert permuting.prepare_eval_model(resnet18(0)).conv1.weight.shape == (7, 7, 3, 64)  # RSCK, as in training
