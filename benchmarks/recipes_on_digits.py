"""Every named recipe, scaled down to the same budget (epochs, batch) next to the 1.4.0 default, on real small
data: scikit-learn's digits written as JPEG folders (benchmarks/digits_dataset.py). Top-1 per recipe over seeds.

    python benchmarks/recipes_on_digits.py                # digits at 32 px, 10 epochs, batch 32, resnet18, seeds 0 1 2
    python benchmarks/recipes_on_digits.py --recipes lars nvidia-90e --seeds 0

Scaling, for E epochs at one rank x B: every recipe runs with the flags `--recipe NAME` expands to at global batch
B (its LR by the recipe's own batch rule: linear for nvidia/torchvision-v2/collapse, the nearest published LARS
row; the nvidia recipes with their ResNet-50 values, on the model trained here), then `--epochs E -b B`; lengths
given in epochs (warm-up, LARS decay horizon, the 1.4.0 step size) shrink by E / the recipe's epochs, and the
LR-collapse phases (iterations at 4096) are rescaled to E epochs of this dataset at batch B. torchvision-v2 keeps
its FixRes ratio (train crop 176/224 of the others', val resize 232/224). An `ffcv-*` recipe keeps its own model's
values (rn50: resnet50's LR rule, rn18: resnet18's) on the model trained here; its resolutions are scaled by
TRAIN / 224 (the train crop of this run against ImageNet's 224): --min-res 160, --max-res 192, --res-rounding 32,
validation crop 256 and resize 293 each times TRAIN / 224, rounded (at least 1); its ramp epochs and LR peak epoch
shrink by E / the recipe's epochs. Evaluation after every epoch; the last ` * Acc@1` (and `Test: EMA Acc@1` with
EMA) is reported, with the mean training time per epoch at each training resolution (from metrics.jsonl). Nothing
is asserted: this prints a table.
"""
import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from classification import recipes, schedules  # noqa: E402

# One compute thread per run: two cores shared with loader workers (and other runs); more threads oversubscribe
# them and a step got 10x slower here.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS='1')
RECIPE_EPOCHS = {'habana-1.4': 90, 'nvidia-90e': 90, 'nvidia-250e': 250, 'lr-collapse-72e': 72.29, 'lars': 35,
                 'torchvision-v2': 600}
DEFAULT_RECIPES = [*RECIPE_EPOCHS, 'ffcv-rn50-16e']
IMAGENET_CROP = 224


def ffcv_epochs(name):
    return int(name.rsplit('-', 1)[1].rstrip('e'))


def scaled_pixels(value, train_crop):
    return str(max(round(value * train_crop / IMAGENET_CROP), 1))


def ffcv_budget(tokens, name, epochs, train_crop):
    """The ffcv recipe's tokens with its resolutions scaled by train_crop / 224 and its epochs by epochs / its own."""
    shrink = epochs / ffcv_epochs(name)
    out = list(tokens)

    def scale(flag, new_value):
        at = out.index(flag) + 1
        out[at] = new_value(out[at])
    for flag in ('--min-res', '--max-res', '--val-resize-size', '--val-crop-size'):
        scale(flag, lambda value: scaled_pixels(int(value), train_crop))
    for flag in ('--start-ramp', '--end-ramp'):
        scale(flag, lambda value: str(round(int(value) * shrink)))  # rounding keeps end >= start
    scale('--lr-peak-epoch', lambda value: f'{float(value) * shrink:.4g}')
    return out + ['--res-rounding', scaled_pixels(32, train_crop)]


def run(cmd, log_path, env=None):
    """Run cmd with its output in log_path; (output, seconds). A failed run ends the benchmark with its log's tail."""
    started = time.time()
    with open(log_path, 'w') as log:
        log.write(shlex.join(cmd) + '\n')
        log.flush()
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    with open(log_path) as log:
        text = log.read()
    if code != 0:
        sys.exit(f'failed (exit {code}): {shlex.join(cmd)}\n{text[-3000:]}')
    return text, time.time() - started


def iterations_per_epoch(data_path, batch):
    train = os.path.join(data_path, 'train')
    images = sum(len(files) for _, _, files in os.walk(train))
    return math.ceil(images / batch) - int(images % batch == 1)


def collapse_phases(epochs, ipe, batch):
    """The spec 2.4 phases for E epochs of ipe iterations at batch B: LRs x B/4096, lengths in proportion."""
    length = epochs * ipe / 22610  # the recipe's 22 610 iterations become E epochs
    lr = batch / recipes.COLLAPSE_BATCH
    phases = []
    for text in recipes.COLLAPSE_PHASES:
        phase = schedules.parse_phase(text)
        shrunk = phase.scaled(1 / length)  # lengths x length (its LRs are set below)
        phases.append(schedules.Phase(
            iterations=shrunk.iterations, base_lr=phase.base_lr * lr, warmup_iterations=shrunk.warmup_iterations,
            warmup_start_lr=phase.warmup_start_lr * lr, horizon=shrunk.horizon, power=phase.power,
            weight_decay=phase.weight_decay, augment=phase.augment).describe())
    return phases


def recipe_flags(name, epochs, ipe, batch, crops):
    """The recipe's own flags for this batch (resnet50's values for the per-model nvidia recipes: the flags a
    `--recipe NAME` run prints as its equivalent command line), then the flags that scale it to the budget."""
    recipe = recipes.RECIPES[name]
    tokens = recipe.flags(recipe.models[0] if recipe.models else 'resnet50', batch)[0]
    train_crop, val_resize, val_crop = crops
    common = ['--epochs', str(epochs), '-b', str(batch), '--epochs-between-evals', '1', '--eval-offset-epochs', '0']
    if name.startswith('ffcv-'):
        return ffcv_budget(tokens, name, epochs, train_crop) + common
    shrink = epochs / RECIPE_EPOCHS[name]
    budget = common + ['--train-crop-size', str(train_crop), '--val-resize-size', str(val_resize), '--val-crop-size',
                       str(val_crop)]
    if name == 'habana-1.4':
        budget += ['--lr-step-size', str(max(round(30 * shrink), 1))]
    elif name in ('nvidia-90e', 'nvidia-250e'):
        budget += ['--lr-warmup-epochs', f'{8 * shrink:.4g}']
    elif name == 'lr-collapse-72e':
        at = tokens.index('--lr-phases')
        tokens = tokens[:at]  # the phases were the last flag; replaced by the budget's
        budget += ['--lr-phases', *collapse_phases(epochs, ipe, batch)]
    elif name == 'lars':
        budget += ['--lr-warmup-epochs', f'{3 * shrink:.4g}', '--lr-decay-epochs', f'{36 * shrink:.4g}']
    elif name == 'torchvision-v2':
        budget += ['--lr-warmup-epochs', f'{5 * shrink:.4g}', '--train-crop-size', str(round(train_crop * 176 / 224)),
                   '--val-resize-size', str(round(val_resize * 232 / 224))]
    return tokens + budget


def seconds_per_epoch_by_resolution(output_dir, train_crop):
    """{training resolution: mean training seconds per epoch} from the run's metrics.jsonl."""
    times = {}
    with open(os.path.join(output_dir, 'metrics.jsonl')) as records:
        for line in records:
            record = json.loads(line)
            if record['type'] == 'epoch':
                times.setdefault(record.get('train.resolution', train_crop), []).append(record['train.time'])
    return {size: statistics.mean(values) for size, values in sorted(times.items())}


def final(pattern, text):
    found = re.findall(pattern, text, flags=re.M)
    return float(found[-1]) if found else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-path', default='', help='ImageFolder with train/ and val/ (default: digits, written now)')
    p.add_argument('--size', type=int, default=32, help='side of the digits written without --data-path')
    p.add_argument('--model', default='resnet18', help='the model of every run')
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--crops', type=int, nargs=3, default=[28, 32, 28], metavar=('TRAIN', 'VAL_RESIZE', 'VAL_CROP'))
    p.add_argument('--recipes', nargs='+', default=DEFAULT_RECIPES, choices=list(recipes.RECIPES))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--logs', default='', help='folder for the runs\' logs (default: a temporary folder)')
    args = p.parse_args()
    logs = args.logs or tempfile.mkdtemp(prefix='recipes-digits-')
    os.makedirs(logs, exist_ok=True)
    data_path = args.data_path or os.path.join(logs, 'digits')
    if not args.data_path:
        run([sys.executable, os.path.join(HERE, 'digits_dataset.py'), data_path, '--size', str(args.size)],
            os.path.join(logs, 'dataset.log'))
    ipe = iterations_per_epoch(data_path, args.batch_size)
    rows = []
    for name in args.recipes:
        flags = recipe_flags(name, args.epochs, ipe, args.batch_size, args.crops)
        top1, ema, epoch_times = [], [], {}
        for seed in args.seeds:
            cmd = ['nice', '-n', '10', sys.executable, os.path.join(ROOT, 'train.py'), '--device', 'cpu',
                   '--data-path', data_path, '--dl-worker-type', 'MP', '--workers', str(args.workers), '--print-freq', '50',
                   '--seed', str(seed),
                   '--deterministic', '--output-dir', os.path.join(logs, f'{name}-{seed}'), '--model', args.model,
                   *flags]
            text, seconds = run(cmd, os.path.join(logs, f'{name}-{seed}.log'), env=ONE_THREAD)
            top1.append(final(r'^ \* Acc@1 ([\d.]+)', text))
            ema.append(final(r'^Test: EMA Acc@1 ([\d.]+)', text))
            for size, seconds_each in seconds_per_epoch_by_resolution(os.path.join(logs, f'{name}-{seed}'),
                                                                      args.crops[0]).items():
                epoch_times.setdefault(size, []).append(seconds_each)
            print(f'{name} seed {seed}: top-1 {top1[-1]}' + (f', EMA {ema[-1]}' if ema[-1] is not None else '')
                  + f' ({seconds:.0f} s)', flush=True)
        per_resolution = ', '.join(f'{size} px {statistics.mean(t):.1f}' for size, t in sorted(epoch_times.items()))
        rows.append((name, top1, ema, per_resolution, ' '.join(flags)))
    print(f'\n{args.model}, {args.epochs} epochs x {ipe} iterations at batch {args.batch_size}, seeds '
          f'{" ".join(map(str, args.seeds))}; logs in {logs}\n')
    print('| recipe | top-1 mean ± std | runs | EMA top-1 | s per epoch at each training resolution | flags |')
    print('|---|---|---|---|---|---|')
    for name, top1, ema, per_resolution, flags in rows:
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        ema_text = f'{statistics.mean(ema):.2f}' if all(e is not None for e in ema) else ''
        print(f'| {name} | {statistics.mean(top1):.2f} ± {spread:.2f} | {" ".join(f"{t:.2f}" for t in top1)} | '
              f'{ema_text} | {per_resolution} | `{flags}` |')


if __name__ == '__main__':
    main()
