"""Predict with a checkpoint of train.py or main.py (or of torchvision's reference train.py and the original
GoogLeNet main.py): the top-5 classes of each image with their probabilities, and the accuracy of folders in
ImageFolder layout (one sub-folder per class, named as the class).

    python inference.py --checkpoint /out/model_89.pth --model resnet50 cat.jpg /data/imagenet/val

Images get the trainers' validation transform (data.eval_transform: resize, center crop, normalise) and run in
batches through the device layer as the trainers' evaluation does (--device, --channels-last, --hmp). Predictions
and accuracies go to stdout, notes to stderr.
"""
import argparse
import json
import os
import sys
from typing import NamedTuple

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from classification import checkpoints, cli, data, devices, training
from classification.cli import UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
TOP_K = 5
DEFAULT_RESIZE_SIZE, DEFAULT_CROP_SIZE = 256, 224  # the trainers' defaults


def note(line):
    print(f'note: {line}', file=sys.stderr, flush=True)


# --- The checkpoint and its model -----------------------------------------------------------------------------

def read_checkpoint(path, model_name):
    """The checkpoint at `path` (checkpoints.load: these trainers' or the originals'), checked to hold `model_name`
    when given; its model name otherwise decides."""
    if model_name:
        training.check_model_and_resume(model_name, None)
    return checkpoints.load(path, model_name or None, None, (), flag='--checkpoint', resuming=False)


def class_names(checkpoint, path):
    """The class names in label order; for a checkpoint without them, the indices '0', '1', ... (with a note)."""
    if checkpoint.get('classes') is not None:
        return list(checkpoint['classes'])
    count = checkpoint['num_classes']
    note(f"'{path}' records no class names (written before checkpoints kept them, or by the original scripts): "
         f'classes are shown as their indices 0-{count - 1}')
    return [str(index) for index in range(count)]


def model_weights(checkpoint, path, ema=False):
    """The state_dict to predict with: the trainer's model ('model': train.py and torchvision's reference;
    'state_dict': main.py), or with `ema` the moving average of the weights ('model_ema', --model-ema)."""
    if ema:
        if checkpoint.get('model_ema') is None:
            raise UsageError(f"--ema: '{path}' holds no EMA weights (its run had no --model-ema)")
        averaged = {k: v for k, v in checkpoint['model_ema'].items() if k != 'n_averaged'}
        return checkpoints.strip_wrapper_prefix(averaged)  # AveragedModel's keys are module.<name>
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    raise UsageError(f"--checkpoint: '{path}' holds no model weights ('model' or 'state_dict')")


def build_model(model_name, num_classes, weights, path, saved_args, blurpool=False):
    """The model the weights were trained as, weights loaded (on the CPU). GoogLeNet keeps its auxiliary heads
    when the weights have them, and torchvision's input transform when its run started from ImageNet weights;
    `blurpool`: the checkpoint's record that its run had --blurpool (BlurPool layers rebuilt)."""
    options = {}
    if model_name == 'googlenet':
        options = dict(aux_logits=any(k.startswith(('aux1.', 'aux2.')) for k in weights), init_weights=False,
                       transform_input=bool(saved_args.get('pretrained')))
    model = training.build_model(model_name, num_classes, blurpool=blurpool, **options)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UsageError(f"--checkpoint: '{path}': its weights do not fit {model_name}: "
                         f'{checkpoints.plain_text(err)}') from None
    return model


def hmp_lists(model_name, bf16_path, fp32_path):
    """--hmp's op lists: those given, else the model family's lists next to this script (as the demos pick them)."""
    family = 'googlenet' if model_name == 'googlenet' else 'Mobilenet' if 'mobilenet' in model_name else 'Resnet'
    return (bf16_path or os.path.join(HERE, f'ops_bf16_{family}.txt'),
            fp32_path or os.path.join(HERE, f'ops_fp32_{family}.txt'))


# --- Inputs ----------------------------------------------------------------------------------------------------

class Item(NamedTuple):
    path: str
    label: int     # index into the class list; -1 when the image has no known class
    folder: str    # the input folder whose accuracy it counts in (None: an image given alone, or not scored)


def list_inputs(inputs, classes):
    """Item per image: a file as given; a folder's images, sorted: those directly in it unscored, those in a
    sub-folder (any depth, as ImageFolder reads them) labelled by the sub-folder's name through `classes`. A
    sub-folder whose name is not a class is noted once per folder; its images are predicted, not scored."""
    class_to_idx = {name: index for index, name in enumerate(classes)}
    extensions = torchvision.datasets.folder.IMG_EXTENSIONS
    items = []
    for path in inputs:
        if os.path.isfile(path):
            items.append(Item(path, -1, None))
            continue
        if not os.path.isdir(path):
            raise UsageError(f"'{path}' does not exist; give image files or folders of images")
        entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        found = [Item(e.path, -1, None) for e in entries
                 if e.is_file() and torchvision.datasets.folder.has_file_allowed_extension(e.name, extensions)]
        subfolders = [e.name for e in entries if e.is_dir()]
        unknown = [name for name in subfolders if name not in class_to_idx]
        for name in subfolders:
            label = class_to_idx.get(name, -1)
            found += [Item(image, label, path if label >= 0 else None)
                      for image, _ in data.class_images(path, name, label, extensions)]
        if unknown:
            shown = ', '.join(unknown[:5]) + (', ...' if len(unknown) > 5 else '')
            note(f"{len(unknown)} sub-folder(s) of '{path}' are not classes of the checkpoint ({shown}): their "
                 'images are predicted but not scored')
        if not found:
            note(f"'{path}' holds no images (.jpg, .jpeg, .png, ...)")
        items += found
    return items


class Images(Dataset):
    """(image tensor or None, item index, label, why it could not be read) per item."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        try:
            image = self.transform(data.checked_pil_loader(item.path))
        except data.UnreadableImage as err:  # the decode failures and the size limit of the trainers' loaders
            return None, index, item.label, str(err).removeprefix('--data-path: ')
        return image, index, item.label, ''


def collate(samples):
    """(images, labels, item indices) of the images read, and (index, reason) of those that were not."""
    read = [s for s in samples if s[0] is not None]
    images = torch.stack([s[0] for s in read]) if read else None
    labels = torch.tensor([s[2] for s in read], dtype=torch.int64)
    return images, labels, [s[1] for s in read], [(s[1], s[3]) for s in samples if s[0] is None]


def make_loader(items, transform, batch_size, workers, start_method):
    """Batches of the items in order; `workers` processes read them when there is more than one batch (for one,
    starting them would take longer than reading it here)."""
    workers = workers if len(items) > batch_size else 0
    options = dict(num_workers=workers, multiprocessing_context=start_method) if workers > 0 else {}
    return DataLoader(Images(items, transform), batch_size=batch_size, shuffle=False, collate_fn=collate, **options)


# --- Prediction ------------------------------------------------------------------------------------------------

def predict(model, dev, images, labels, k=TOP_K, tta_flip=False):
    """(top-k probabilities, top-k class indices) of a batch, on the CPU, as the trainers evaluate: the device's
    layout and mixed precision around the forward (`tta_flip`: the logits of each image and of its mirror
    summed, --tta-flip)."""
    with torch.no_grad():
        images, labels = dev.to_device(images, labels)
        dev.mark_step('eval_input')
        with dev.autocast():
            output = training.eval_logits(model, images, tta_flip)
        probabilities, indices = torch.softmax(output.float(), dim=1).topk(k, dim=1)
    return probabilities.cpu(), indices.cpu()


class Score:
    """Top-1 and top-5 hits of one input folder."""

    def __init__(self):
        self.images = self.top1 = self.top5 = 0

    def add(self, label, indices):
        self.images += 1
        self.top1 += int(indices[0] == label)
        self.top5 += int(label in indices[:TOP_K])

    def percent(self, hits):
        return 100.0 * hits / max(self.images, 1)


def run(model, dev, loader, items, classes, tta_flip=False):
    """Print each image's top-5 as its batch comes back; returns (per-image results, scores per input folder,
    skipped (path, reason))."""
    k = min(TOP_K, len(classes))
    results, scores, skipped = [], {item.folder: Score() for item in items if item.folder is not None}, []
    for images, labels, indices, unreadable in loader:
        for index, reason in unreadable:
            note(f'skipped: {reason}')
            skipped.append((items[index].path, reason))
        if images is None:
            continue
        probabilities, top = predict(model, dev, images, labels, k, tta_flip)
        for index, probs, classes_of in zip(indices, probabilities.tolist(), top.tolist()):
            item = items[index]
            ranked = [(classes[c], p) for c, p in zip(classes_of, probs)]
            print(f'{item.path}: ' + ', '.join(f'{name} {p:.4f}' for name, p in ranked))
            if item.folder is not None:
                scores[item.folder].add(item.label, classes_of)
            results.append(dict(path=item.path, label=classes[item.label] if item.label >= 0 else None,
                                top5=[dict(name=name, probability=p) for name, p in ranked]))
    return results, scores, skipped


def report_accuracy(scores, skipped_count):
    for folder, score in scores.items():
        print(f'{folder}: Acc@1 {score.percent(score.top1):.3f} Acc@5 {score.percent(score.top5):.3f} '
              f'over {score.images} images' + (f' ({skipped_count} unreadable skipped)' if skipped_count else ''))


def write_json(path, checkpoint_path, model_name, classes_recorded, results, scores, skipped):
    summary = dict(checkpoint=checkpoint_path, model=model_name, class_names_recorded=classes_recorded,
                   images=results, skipped=[dict(path=p, reason=r) for p, r in skipped],
                   folders=[dict(path=folder, images=s.images, acc1=s.percent(s.top1), acc5=s.percent(s.top5))
                            for folder, s in scores.items()])
    try:
        with open(path, 'w') as f:
            json.dump(summary, f, indent=1)
    except OSError as err:
        raise UsageError(f"--output-json: cannot write '{path}': {err}") from None


def main(args):
    cli.check_at_least((('--batch-size', args.batch_size, 1), ('--workers', args.workers, 0)))
    checkpoint = read_checkpoint(args.checkpoint, args.model)
    model_name = checkpoint['model_name']
    saved_args = checkpoint.get('args') if isinstance(checkpoint.get('args'), dict) else {}
    resize_size = args.val_resize_size or saved_args.get('val_resize_size') or DEFAULT_RESIZE_SIZE
    crop_size = args.val_crop_size or saved_args.get('val_crop_size') or DEFAULT_CROP_SIZE
    cli.check_at_least((('--val-crop-size', crop_size, 1), ('--val-resize-size', resize_size, crop_size)))
    classes = class_names(checkpoint, args.checkpoint)
    hmp = training.hmp_config(args.is_hmp, *hmp_lists(model_name, args.hmp_bf16, args.hmp_fp32), args.hmp_opt_level,
                              args.hmp_verbose)
    dev = devices.create(args.device, channels_last=args.channels_last, hmp=hmp, lazy_mode=args.run_lazy_mode)
    dev.mark_points = frozenset({'eval_input'})  # as the trainers' evaluation cuts the lazy graph
    weights = model_weights(checkpoint, args.checkpoint, args.ema)
    model = dev.prepare_eval_model(build_model(model_name, len(classes), weights, args.checkpoint, saved_args,
                                               bool(checkpoint.get('blurpool'))))
    tta_flip = args.tta_flip if args.tta_flip is not None else bool(saved_args.get('tta_flip'))
    print(f"{model_name} from '{args.checkpoint}'{' (EMA weights)' if args.ema else ''}, {len(classes)} classes, on "
          f'{dev.torch_device}; images resized to {resize_size}, center crop {crop_size}'
          + ('; logits summed with the mirror\'s (--tta-flip)' if tta_flip else ''), file=sys.stderr)

    items = list_inputs(args.inputs, classes)
    loader = make_loader(items, data.eval_transform(resize_size, crop_size), args.batch_size, args.workers,
                         dev.worker_start_method)
    results, scores, skipped = run(model, dev, loader, items, classes, tta_flip)
    report_accuracy(scores, len(skipped))
    if args.output_json:
        write_json(args.output_json, args.checkpoint, model_name, checkpoint.get('classes') is not None, results,
                   scores, skipped)


def get_args_parser(add_help=True):
    parser = cli.ArgumentParser(description='Top-5 classes of images, and the accuracy of class folders, from a '
                                'train.py or main.py checkpoint', add_help=add_help)
    parser.add_argument('inputs', nargs='+', metavar='IMAGE_OR_FOLDER',
                        help='image files, and folders of images; a folder with one sub-folder per class '
                             '(ImageFolder layout, e.g. <data-path>/val) also gets its top-1/top-5 accuracy')
    parser.add_argument('--checkpoint', required=True, help='a checkpoint of train.py (model_<epoch>.pth, '
                        'checkpoint.pth), main.py (*.pth.tar) or torchvision\'s reference train.py')
    parser.add_argument('--model', default=None,
                        help='model name; must match the checkpoint\'s (default: the one the checkpoint holds)')
    parser.add_argument('--ema', action='store_true', help='predict with the EMA weights (runs with --model-ema)')
    parser.add_argument('--device', default='cpu', choices=('hpu', 'cuda', 'cpu'), help='device (default: cpu)')
    parser.add_argument('-b', '--batch-size', default=32, type=int, help='images per batch (default: 32)')
    parser.add_argument('-j', '--workers', default=2, type=int, help='image-loading worker processes, used when there is more than one batch (default: 2)')
    parser.add_argument('--channels-last', default='True', type=cli.parse_bool,
                        help='images (and on hpu weights) in channels-last layout (True/False)')
    parser.add_argument('--run-lazy-mode', default='True', type=cli.parse_bool,
                        help='run in lazy execution mode (hpu; True/False)')
    cli.add_hmp_args(parser, bf16_default='', fp32_default='')
    parser.add_argument('--val-resize-size', default=None, type=int,
                        help='resize size (default: the checkpoint\'s training run\'s, else 256)')
    parser.add_argument('--val-crop-size', default=None, type=int,
                        help='center crop size (default: the checkpoint\'s training run\'s, else 224)')
    parser.add_argument('--tta-flip', action=argparse.BooleanOptionalAction, default=None,
                        help='sum the logits of each image and of its mirror (default: as the checkpoint\'s run '
                             'validated)')
    parser.add_argument('--output-json', default=None, metavar='FILE',
                        help='also write every prediction and accuracy to FILE as JSON')
    return parser


if __name__ == '__main__':
    cli.run_cli(main, get_args_parser().parse_args(sys.argv[1:]))
