"""Draw the curves of one or more runs from their metrics files (metrics.jsonl, docs/metrics.md).

    python plot_metrics.py runs/a runs/b/metrics.jsonl --output curves.png

One PNG, a 2x2 grid: loss, top-1/top-5 (train and val), learning rate and images per second, against the
fractional epoch (epoch + steps done / steps per epoch) or, where a file lacks what that needs, the record
number. Each run is labelled by its folder's name. A file holding several runs (a run started again in the
same --output-dir without --resume) is drawn from its last start; its resumes continue that curve.
"""
import math
import os
import sys

from classification import cli, metrics
from classification.cli import UsageError

PANELS = (  # (title, y label, [(field, line style, legend suffix)])
    ('loss', 'loss', [('train.loss', '-', 'train'), ('val.loss', 'o--', 'val'), ('val_ema.loss', 's:', 'val EMA')]),
    ('accuracy', '%', [('train.top1', '-', 'train top-1'), ('train.top5', ':', 'train top-5'),
                       ('val.top1', 'o--', 'val top-1'), ('val.top5', 'x--', 'val top-5'),
                       ('val_ema.top1', 's:', 'val EMA top-1')]),
    ('learning rate', 'lr', [('train.lr', '-', 'lr')]),
    ('throughput, all ranks', 'images/s', [('train.total_ips', '-', 'with data time'),
                                           ('train.compute_ips', '--', 'without data time')]),
)


def spans_decades(ax, decades=3):
    values = [y for line in ax.lines for y in line.get_ydata() if y is not None and y > 0]
    return bool(values) and max(values) / min(values) > 10 ** decades


def last_run(records):
    """The records from the last start of training without --resume (resumes and --test-only runs after it
    belong to it); the whole file when it has none."""
    starts = [i for i, r in enumerate(records)
              if r['type'] == 'header' and r.get('mode', 'train') == 'train' and not r.get('resumed_from')]
    return records[starts[-1]:] if starts else records


def positions(records):
    """(x values, axis name) for the records: fractional epochs where every train record has a header with its
    steps per epoch, else the record number."""
    xs, steps = [], None
    for record in records:
        if record['type'] == 'header':
            steps = record.get('steps_per_epoch')
            xs.append(None)
            continue
        epoch = record.get('epoch')
        if epoch is None:
            xs.append(None if record['type'] == 'val' else math.nan)
        elif record['type'] == 'train':
            xs.append(epoch + (record['step'] + 1) / steps if steps and record.get('step') is not None else math.nan)
        else:
            xs.append(epoch + 1)
    if any(isinstance(x, float) and math.isnan(x) for x in xs):
        return list(range(len(records))), 'record'
    return [0 if x is None else x for x in xs], 'epoch'


def load_run(path):
    records = last_run(metrics.read(path))
    if not any(r['type'] in ('train', 'val', 'epoch') for r in records):
        raise UsageError(f"'{metrics.file_path(path)}' has no train or val records to plot (only the start of a run)")
    return records


def run_label(path, taken):
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    label = os.path.basename(os.path.normpath(os.path.abspath(folder))) or folder
    while label in taken:
        label += "'"
    taken.add(label)
    return label


def plot(paths, output):
    runs = [(path, load_run(path)) for path in paths]  # every file is read before anything is drawn
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    taken, axis_names = set(), set()
    for index, (path, records) in enumerate(runs):
        colour, label = colours[index % len(colours)], run_label(path, taken)
        xs, axis_name = positions(records)
        axis_names.add(axis_name)
        for ax, (title, unit, fields) in zip(axes.flat, PANELS):
            for field, style, suffix in fields:
                points = [(x, r[field]) for x, r in zip(xs, records) if r.get(field) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=colour, label=f'{label} {suffix}', markersize=4)
    for ax, (title, unit, _) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xlabel(' or '.join(sorted(axis_names)))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize='small')
            if title in ('loss', 'learning rate') and spans_decades(ax):
                ax.set_yscale('log')  # a diverged validation loss or a decayed LR would flatten the rest
    figure.tight_layout()
    try:
        figure.savefig(output, dpi=100)
    except OSError as err:
        raise UsageError(f"--output: cannot write '{output}': {err.strerror or err}") from None
    finally:
        plt.close(figure)
    print(f'wrote {output} ({len(runs)} run{"s" if len(runs) > 1 else ""})')


def get_args_parser():
    parser = cli.ArgumentParser(description='Plot loss, accuracy, learning rate and throughput of runs from their '
                                            'metrics.jsonl files')
    parser.add_argument('runs', nargs='+', metavar='RUN', help='an --output-dir of a run, or its metrics.jsonl')
    parser.add_argument('--output', default='curves.png', help='the PNG to write (default: curves.png)')
    return parser


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    plot(args.runs, args.output)


if __name__ == '__main__':
    cli.run_cli(main, sys.argv[1:])
