"""Does train.py (its default 1.4.0 recipe) train as well as a bare torchvision loop on the same real data?

    python benchmarks/compare_with_bare_loop.py                 # digits at 64 px, resnet18, seeds 0 1 2
    python benchmarks/compare_with_bare_loop.py --seeds 0 1 2 3 4 --epochs 6 --extra "--channels-last False"

For each seed it runs train.py (--device cpu --dl-worker-type MP --deterministic, its defaults otherwise:
SGD momentum 0.9, wd 1e-4, StepLR, cross entropy, channels_last) and benchmarks/bare_loop.py with the same
values, both under `nice -n 10`; it reads train.py's last ` * Acc@1 X` line and the bare loop's
`final top1 X`, and prints each run, the mean and sample std per trainer, and the difference of means.

Noise rule: the difference is called within noise when |mean_ours - mean_bare| < 2 * max(std_ours, std_bare)
/ sqrt(n) (n seeds per trainer: two standard errors of the noisier trainer's mean). Welch's t is printed too.
Without --data-path, the digits are written (benchmarks/digits_dataset.py) to a temporary folder first.

train.py runs from a snapshot of the repository's last commit (`git archive HEAD` into the temporary folder,
--code head, the default), so that edits made to the working tree while the runs go on cannot change the code
half-way (a forkserver worker importing a newer data.py than its trainer's fails); --code live runs the
working tree itself.
"""
import argparse
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


def run(cmd, log_path, cwd=ROOT):
    started = time.time()
    with open(log_path, 'w') as log:
        log.write(' '.join(shlex.quote(c) for c in cmd) + '\n')
        log.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path) as log:
        text = log.read()
    if proc.returncode != 0:
        sys.exit(f'failed (exit {proc.returncode}): {" ".join(cmd)}\n{text[-3000:]}')
    return text, time.time() - started


def last_float(pattern, text, what):
    found = re.findall(pattern, text)
    if not found:
        sys.exit(f'no {what} line in the output')
    return float(found[-1])


def summary(values):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else float('nan')
    return mean, std


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data-path', default='', help='ImageFolder with train/ and val/ (default: digits, written now)')
    p.add_argument('--size', type=int, default=64, help='image size of the digits written without --data-path')
    p.add_argument('--model', default='resnet18')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--lr-step-size', type=int, default=4)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--train-crop-size', type=int, default=56)
    p.add_argument('--val-resize-size', type=int, default=64)
    p.add_argument('--val-crop-size', type=int, default=56)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--extra', default='', help='more train.py flags, e.g. "--channels-last False"')
    p.add_argument('--no-deterministic', action='store_true', help='run train.py without --deterministic')
    p.add_argument('--only', choices=('ours', 'bare'), help='run one trainer only')
    p.add_argument('--code', choices=('head', 'live'), default='head',
                   help="train.py from a snapshot of git HEAD (default) or the working tree as it is")
    p.add_argument('--logs', default='', help='folder for the runs\' logs (default: a temporary folder)')
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix='compare-bare-')
    data = args.data_path
    if not data:
        data = os.path.join(work, f'digits{args.size}')
        subprocess.run([sys.executable, os.path.join(HERE, 'digits_dataset.py'), data, '--size', str(args.size)],
                       check=True)
    data = os.path.abspath(data)
    logs = args.logs or os.path.join(work, 'logs')
    os.makedirs(logs, exist_ok=True)
    code_root, code_name = ROOT, 'working tree'
    if args.code == 'head':
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout.strip()
        code_root, code_name = os.path.join(work, f'code-{commit}'), f'commit {commit} (git archive HEAD)'
        os.makedirs(code_root)
        archive = subprocess.run(['git', 'archive', 'HEAD'], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(['tar', '-x', '-C', code_root], input=archive, check=True)
    print(f'train.py from {code_name}: {code_root}', flush=True)

    common = ['--data-path', data, '--model', args.model, '--epochs', str(args.epochs), '-b', str(args.batch_size),
              '--lr', str(args.lr), '--lr-step-size', str(args.lr_step_size), '--workers', str(args.workers)]
    sizes = ['--train-crop-size', str(args.train_crop_size), '--val-resize-size', str(args.val_resize_size),
             '--val-crop-size', str(args.val_crop_size)]
    nice = ['nice', '-n', '10', sys.executable]
    results = {'ours': [], 'bare': []}
    for seed in args.seeds:
        if args.only != 'bare':
            out_dir = os.path.join(work, f'train-out-{seed}')
            cmd = nice + ['train.py', '--device', 'cpu', '--dl-worker-type', 'MP'] + common + [
                '--print-freq', '50', '--seed', str(seed)] + ([] if args.no_deterministic else ['--deterministic']) + [
                '--output-dir', out_dir] + sizes + shlex.split(args.extra)
            text, took = run(cmd, os.path.join(logs, f'ours-seed{seed}.log'), cwd=code_root)
            if 'Training time' not in text:  # a stop signal ends train.py early with exit 0 and a checkpoint
                sys.exit(f'train.py seed {seed} did not finish its {args.epochs} epochs (stopped by a signal?): '
                         f'see {logs}/ours-seed{seed}.log')
            results['ours'].append(last_float(r' \* Acc@1 ([0-9.]+)', text, "' * Acc@1'"))
            print(f'train.py   seed {seed}: top-1 {results["ours"][-1]:6.2f}  ({took:.0f} s)', flush=True)
        if args.only != 'ours':
            cmd = nice + [os.path.join(HERE, 'bare_loop.py')] + common + ['--seed', str(seed)] + sizes
            text, took = run(cmd, os.path.join(logs, f'bare-seed{seed}.log'))
            results['bare'].append(last_float(r'final top1 ([0-9.]+)', text, "'final top1'"))
            print(f'bare loop  seed {seed}: top-1 {results["bare"][-1]:6.2f}  ({took:.0f} s)', flush=True)

    print()
    print(f'flags: {" ".join(common + sizes)} --seed S' + (f' | train.py also: {args.extra}' if args.extra else '')
          + (' | train.py without --deterministic' if args.no_deterministic else ''))
    print(f'train.py: {code_name}; logs: {logs}')
    print('| trainer | ' + ' | '.join(f'seed {s}' for s in args.seeds) + ' | mean ± std |')
    print('|---|' + '---|' * len(args.seeds) + '---|')
    stats = {}
    for name, label in (('ours', 'train.py'), ('bare', 'bare loop')):
        if results[name]:
            stats[name] = summary(results[name])
            print(f'| {label} | ' + ' | '.join(f'{v:.2f}' for v in results[name])
                  + f' | {stats[name][0]:.2f} ± {stats[name][1]:.2f} |')
    if len(stats) == 2:
        n = len(args.seeds)
        (m1, s1), (m2, s2) = stats['ours'], stats['bare']
        diff = m1 - m2
        bound = 2 * max(s1, s2) / math.sqrt(n)
        se = math.sqrt(s1 ** 2 / n + s2 ** 2 / n)
        t = diff / se if se > 0 else float('inf')
        verdict = 'within noise' if abs(diff) < bound else 'BEYOND noise'
        print(f'\ndifference of means (train.py - bare): {diff:+.2f} points; rule |diff| < 2 x max std / sqrt({n}) '
              f'= {bound:.2f}: {verdict}; Welch t = {t:+.2f}')


if __name__ == '__main__':
    main()
