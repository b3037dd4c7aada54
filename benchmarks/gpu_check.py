"""The prepared GPU check (issue 18): one command to run first on a machine with a GPU, about 5 minutes on one
H100/H200 (--quick: about 2), that says PASS or FAIL with its figure for each check, prints a table and writes
gpu_check.json.

    python benchmarks/gpu_check.py                   # cuda: resnet50, batch 256, 224 px; all the rows
    python benchmarks/gpu_check.py --quick           # cuda: the rows marked quick below
    python benchmarks/gpu_check.py --device cpu      # tiny sizes, any machine (the slow test tier runs it)

Every check runs the real entry points as subprocesses (train.py, main.py, inference.py, sample_data.py) with
--output-dir in a temporary folder, and reads what they write: the benchmark JSON of train.py's --mode
benchmark-training / benchmark-inference, the train windows of metrics.jsonl (img/s and the wait for data) and
the checkpoints (torch.load(weights_only=True), every tensor compared bit for bit). Rows (q: in --quick):

  train.*     resnet50 training img/s on synthetic data, channels-last (benchmark-training: warm-up steps left
              out, each measured step synchronised): fp32 with TF32 (q), --hmp bf16, --amp bf16 eager (q) and
              --compile, --amp fp16; GoogLeNet through main.py --amp bf16 (q; training loop, metrics.jsonl);
              each with the share of the measured time spent waiting for data and its peak GPU memory
  repeat.*    train.py --deterministic twice (q) and main.py --seed twice: bitwise-identical weights, and their
              img/s against the same trainer's default run (training loop, same steps)
  resume.*    a SIGTERM mid-epoch and a resume: the weights of the uninterrupted --deterministic run (q); a
              CPU-written mid-epoch checkpoint resumed on the GPU, and a GPU-written one on the CPU (with
              --device cpu both are cpu -> cpu, as the rows say)
  data.*      the same model on real JPEGs (sample_data.py --imagenet-like, written to local disk) through
              --dl-worker-type FAST with as many workers as cores, with (q) and without the CUDA prefetch, and
              through --dl-worker-type DALI (q; decoding on the GPU, device 'mixed', with as many CPU threads as
              cores; its CPU operators with --device cpu) against FAST; each with the CPU the whole job used
              (CPU-seconds per image and cores busy in the steps after the warm-up, its loader workers included)
              and the cores that would keep the GPU at the synthetic run's pace (repeat.train_default's img/s).
              Where NVIDIA DALI is not installed (nvidia-dali-cuda130, about 480 MB) the DALI row says so, SKIP:
              not measured, not a failure
  infer.*     latency mean/p90/p99 at batch 1 and 256: train.py --mode benchmark-inference (q) and inference.py
              (q; from its output lines as they arrive: JPEG decode and transforms included)

--quick leaves out: --hmp bf16, --amp fp16, --compile (about a minute of compiling), FAST without prefetch,
main.py --seed twice and the two cross-device resumes.

The peak GPU memory of the training-loop runs (main.py, the FAST and repeat rows) is read by running the entry
point under a few lines that record torch.cuda.max_memory_allocated() when it ends (PEAK_PROBE: the script runs
as __main__, unchanged); benchmark-training reports its own per batch size. Ratios are against a baseline
measured in the same run. A FAIL makes the exit status 1 (a SKIP does not); gpu_check.json is rewritten after
every row, so a run cut short keeps what it measured.
"""
import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torchvision  # noqa: E402

from classification import dali  # noqa: E402
from classification.cli import UsageError  # noqa: E402
from machine import cpu_capability, describe  # noqa: E402  (benchmarks/machine.py)

PEAK_PROBE = '''
import json, os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))
try:
    runpy.run_path(script, run_name="__main__")
finally:
    torch = sys.modules.get("torch")
    peak = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated()
    with open(os.environ["GPU_CHECK_PEAK_FILE"], "w") as f:
        json.dump({"peak_memory_bytes": peak}, f)
'''
EPOCH_LINE = re.compile(r'^Epoch: \[0\]\s*\[\s*(\d+)/\d+\]')
STOPPED = re.compile(r'Stopped by SIGTERM: saved epoch 0 after step (\d+) \((\d+) samples.*? to (\S+) in ')
RESUMED = re.compile(r'Resuming epoch 0 at step (\d+) \(')
HMP_LISTS = ['--hmp-bf16', os.path.join(REPO, 'ops_bf16_Resnet.txt'),
             '--hmp-fp32', os.path.join(REPO, 'ops_fp32_Resnet.txt')]
AMP_BF16 = ['--amp', '--amp-dtype', 'bfloat16']


class Sizes(NamedTuple):
    """What each check runs at on one device."""
    device: str               # train.py's and inference.py's --device
    main_device: str          # main.py's name for it
    model: str
    batch: int
    crop: int
    val_resize: int
    bench_warmup: int         # benchmark modes: steps left out, then measured ones
    bench_iterations: int
    compile_warmup: int       # --compile: the first warm-up step compiles
    fp16_batch: int           # --amp fp16 (on a CPU tens of times slower than fp32: tiny there)
    fp16_iterations: int
    steps: int                # training-loop runs: steps of their one epoch
    print_freq: int
    warm_steps: int           # train windows ending at or before this step are left out
    sigterm_at: int           # the SIGTERM goes out once the log shows this step
    jpeg_val_images: int      # validation JPEGs: inference.py at the large batch reads them all
    infer_b1_images: int      # inference.py at batch 1 reads one class's (at least this many)
    infer_batch: int          # the large inference batch
    infer_warm_batches: tuple  # (batch 1, large batch): first batches of inference.py left out
    cross_model: str          # the cross-device resumes: a small model, one leg on each device
    cross_batch: int
    cross_crop: int
    cross_steps: int
    timeout_s: int            # per process
    compile_timeout_s: int


CUDA_SIZES = Sizes(device='cuda', main_device='gpu', model='resnet50', batch=256, crop=224, val_resize=256,
                   bench_warmup=10, bench_iterations=40, compile_warmup=3, fp16_batch=256, fp16_iterations=40,
                   steps=41, print_freq=5, warm_steps=10, sigterm_at=20, jpeg_val_images=2048, infer_b1_images=128,
                   infer_batch=256, infer_warm_batches=(10, 2), cross_model='resnet18', cross_batch=8, cross_crop=32,
                   cross_steps=200, timeout_s=240, compile_timeout_s=420)
CPU_SIZES = Sizes(device='cpu', main_device='cpu', model='resnet18', batch=8, crop=32, val_resize=40,
                  bench_warmup=1, bench_iterations=3, compile_warmup=1, fp16_batch=2, fp16_iterations=1,
                  steps=9, print_freq=2, warm_steps=2, sigterm_at=4, jpeg_val_images=48, infer_b1_images=24,
                  infer_batch=8, infer_warm_batches=(4, 1), cross_model='resnet18', cross_batch=8, cross_crop=32,
                  cross_steps=30, timeout_s=300, compile_timeout_s=600)


class Finished(NamedTuple):
    """A finished subprocess: exit status (None: killed at its time limit), output lines and the time each
    arrived (time.perf_counter()), wall seconds, peak GPU memory (PEAK_PROBE runs; else None)."""
    returncode: int
    lines: list
    arrived: list
    seconds: float
    peak_memory_bytes: int

    @property
    def output(self):
        return ''.join(self.lines)

    def failure(self):
        """Why the run failed in one line (None when it exited 0)."""
        if self.returncode == 0:
            return None
        if self.returncode is None:
            return f'killed at its time limit after {self.seconds:.0f} s'
        errors = [line.strip() for line in self.lines if line.startswith(('error:', 'Traceback')) or 'Error' in line]
        last = errors[-1] if errors else (self.lines[-1].strip() if self.lines else 'no output')
        return f'exit status {self.returncode}: {last[:300]}'


class Row(dict):
    """One check's result: key, title, status (PASS/FAIL, or SKIP: not measured here), figure, values, peak GPU
    memory, seconds."""

    @classmethod
    def make(cls, key, title, passed, figure, values=None, peak=None, seconds=0.0):
        return cls(key=key, title=title, status='PASS' if passed else 'FAIL', figure=figure, values=values or {},
                   peak_memory_bytes=peak, seconds=round(seconds, 1))

    @classmethod
    def not_measured(cls, key, title, why):
        """A row this machine cannot measure (it lacks an optional package): reported, not a failure."""
        return cls(cls.make(key, title, True, f'not measured: {why}'), status='SKIP')


class Check:
    """Runs the checks of one device at its Sizes inside `work` (a folder removed at the end), printing each
    row as it finishes and rewriting `json_path` after each."""

    def __init__(self, sizes, work, json_path, quick):
        self.sizes, self.work, self.json_path, self.quick = sizes, work, json_path, quick
        self.rows = []
        self.runs = 0
        self.writers = None  # JpegWriters, once started
        self.started = time.time()
        self.cores = len(os.sched_getaffinity(0))
        self.machine = machine_facts(sizes.device)
        # On a CPU, one torch thread per process unless the caller chose: on a small shared machine, idle OpenMP
        # threads waiting for a descheduled sibling measure the other processes (benchmarks/RESULTS.md 8.1).
        threads = {} if sizes.device == 'cuda' or 'OMP_NUM_THREADS' in os.environ else dict(OMP_NUM_THREADS='1')
        self.base_env = dict(os.environ, PYTHONUNBUFFERED='1', **threads)

    # --- running the entry points ---------------------------------------------------------------------------

    def folder(self, name):
        path = os.path.join(self.work, name)
        os.makedirs(path, exist_ok=True)
        return path

    def run(self, script, argv, *, timeout=None, probe=False, env=None, on_line=None):
        """Run `python script argv` in the repository (its own process group, output merged and logged under
        the work folder), through PEAK_PROBE when `probe`; `on_line(process, line)` sees each line as it comes.
        Killed with its group at `timeout` seconds (default: the sizes' per-process limit)."""
        self.runs += 1
        name = f'{self.runs:02d}_{os.path.splitext(script)[0]}'
        peak_file = os.path.join(self.folder('peaks'), name + '.json')
        command = [sys.executable] + (['-c', PEAK_PROBE] if probe else []) + [os.path.join(REPO, script)] + argv
        environment = dict(self.base_env, GPU_CHECK_PEAK_FILE=peak_file, **(env or {}))
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        timer = threading.Timer(timeout or self.sizes.timeout_s, end_group, (proc, signal.SIGKILL))
        timer.daemon = True
        timer.start()
        lines, arrived = [], []
        try:
            with open(os.path.join(self.folder('logs'), name + '.log'), 'w') as log:
                log.write(' '.join(command[:1] + command[-len(argv) - 1:]) + '\n')
                for line in proc.stdout:
                    arrived.append(time.perf_counter())
                    lines.append(line)
                    log.write(line)
                    if on_line is not None:
                        on_line(proc, line)
            proc.wait()
        except BaseException:  # Ctrl-C or a bug here: the run and its workers must not outlive the check
            end_group(proc, signal.SIGKILL)
            raise
        timed_out = not timer.is_alive() and proc.returncode != 0
        timer.cancel()
        return Finished(None if timed_out else proc.returncode, lines, arrived, time.perf_counter() - started,
                        read_peak(peak_file) if probe else None)

    def train_py(self, output_dir, *extra, model=None, batch=None, crop=None, device=None, workers=0, **options):
        """train.py's common flags at these sizes (synthetic data unless --data-path is among `extra`)."""
        sizes = self.sizes
        crop = crop or sizes.crop
        argv = ['--device', device or sizes.device, '--model', model or sizes.model,
                '--batch-size', str(batch or sizes.batch), '--output-dir', output_dir, '--workers', str(workers),
                '--train-crop-size', str(crop), '--val-crop-size', str(crop),
                '--val-resize-size', str(sizes.val_resize if crop == sizes.crop else crop + crop // 4)]
        if '--data-path' not in extra:
            argv += ['--data-path', 'synthetic']
        return self.run('train.py', argv + list(extra), **options)

    def training_loop_flags(self, steps=None, batch=None, print_freq=None):
        """One epoch of `steps` steps, a log line (and train window) every print_freq, no evaluation."""
        steps = steps or self.sizes.steps
        return ['--epochs', '1', '--dataset-size', str(steps * (batch or self.sizes.batch)),
                '--num-train-steps', str(steps), '--print-freq', str(print_freq or self.sizes.print_freq),
                '--num-eval-steps', '0']

    def main_py(self, output_dir, *extra, **options):
        """main.py (GoogLeNet) on synthetic data, one epoch of the sizes' steps, --amp bf16."""
        sizes = self.sizes
        argv = ['--data-path', 'synthetic', '--device', sizes.main_device, '--batch-size', str(sizes.batch),
                '--output-dir', output_dir, '--workers', '0', '--epochs', '1',
                '--dataset-size', str(sizes.steps * sizes.batch), '--num-train-steps', str(sizes.steps),
                '--print-interval', str(sizes.print_freq), '--train-crop-size', str(sizes.crop),
                '--val-crop-size', str(sizes.crop), '--val-resize-size', str(sizes.val_resize), *AMP_BF16]
        return self.run('main.py', argv + list(extra), **options)

    # --- recording ------------------------------------------------------------------------------------------

    def record(self, row):
        self.rows.append(row)
        peak = format_bytes(row['peak_memory_bytes'])
        print(f"{row['status']}  {row['key']:28s} {row['figure']}" + (f'; peak {peak}' if peak != '-' else '')
              + f"  ({row['seconds']:.0f} s)", flush=True)
        self.write_json()
        return row

    def guarded(self, key, title, check, *args, **options):
        """Run one check; a failure of the check itself (a bug, a missing file) is its FAIL row."""
        started = time.perf_counter()
        try:
            rows = check(*args, **options)
        except Exception as err:  # noqa: BLE001 - every check must report, whatever breaks
            rows = [Row.make(key, title, False, f'{type(err).__name__}: {err}'[:400],
                             seconds=time.perf_counter() - started)]
        for row in rows:
            self.record(row)
        return rows

    def write_json(self):
        report = dict(machine=self.machine, device=self.sizes.device, quick=self.quick, sizes=self.sizes._asdict(),
                      started=time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started)),
                      elapsed_s=round(time.time() - self.started, 1),
                      passed=all(row['status'] != 'FAIL' for row in self.rows), rows=self.rows)
        with open(self.json_path + '.tmp', 'w') as f:
            json.dump(report, f, indent=1)
        os.replace(self.json_path + '.tmp', self.json_path)

    def row(self, key):
        return next((row for row in self.rows if row['key'] == key), None)

    def value(self, key, name):
        """A figure of an earlier row (None when that row failed or did not run)."""
        row = self.row(key)
        return row['values'].get(name) if row is not None and row['status'] == 'PASS' else None


# --- the checks ---------------------------------------------------------------------------------------------

def bench_training(check, key, title, flags, *, batch=None, iterations=None, warmup=None, timeout=None, env=None,
                   baseline=None, eager=None):
    """A --mode benchmark-training row: img/s, data-wait share, latency, peak memory; ratios against the rows
    named `baseline` (and `eager`, with the compile time)."""
    sizes = check.sizes
    batch = batch or sizes.batch
    out = check.folder(key)
    json_path = os.path.join(out, 'bench.json')
    finished = check.train_py(out, '--mode', 'benchmark-training', '--benchmark-batch-sizes', str(batch),
                              '--bench-warmup', str(warmup or sizes.bench_warmup),
                              '--bench-iterations', str(iterations or sizes.bench_iterations),
                              '--benchmark-json', json_path, *flags, batch=batch, timeout=timeout, env=env)
    if finished.failure():
        return [Row.make(key, title, False, finished.failure(), seconds=finished.seconds)]
    result = read_json(json_path)['results'][0]
    img_s = result['img_per_s']
    waited = data_wait_share(result)
    values = dict(img_per_s=img_s, batch_size=batch, data_wait_share=waited, latency_ms=result['latency_ms'],
                  first_step_s=result['first_step_s'], iterations=result['iterations'])
    figure = f'{img_s:,.1f} img/s at batch {batch}, data wait {waited:.1%}, step {result["latency_ms"]["mean"]:.1f} ms'
    for other in (baseline, eager):
        reference = check.value(other, 'img_per_s') if other else None
        if reference:
            values[f'vs_{other}'] = img_s / reference
            figure += f', {img_s / reference:.2f}x {other}'
    if eager:
        figure += f'; compiling (first warm-up step) {result["first_step_s"]:.0f} s'
    passed = math.isfinite(img_s) and img_s > 0
    return [Row.make(key, title, passed, figure, values, result.get('peak_memory_bytes'), finished.seconds)]


def training_rows(check):
    sizes = check.sizes
    tf32 = 'TF32' if sizes.device == 'cuda' else 'TF32 applies on CUDA only'
    full = not check.quick
    rows = [('train.fp32_tf32', f'fp32 ({tf32})', ['--tf32', 'True'], {}),
            ('train.amp_bf16', '--amp bf16', AMP_BF16, dict(baseline='train.fp32_tf32'))]
    if full:
        rows += [('train.hmp_bf16', '--hmp bf16', ['--hmp', *HMP_LISTS], dict(baseline='train.fp32_tf32')),
                 ('train.amp_fp16', '--amp fp16', ['--amp', '--amp-dtype', 'float16'],
                  dict(baseline='train.fp32_tf32', batch=sizes.fp16_batch, iterations=sizes.fp16_iterations)),
                 ('train.amp_bf16_compile', '--amp bf16 --compile', AMP_BF16 + ['--compile'],
                  dict(baseline='train.fp32_tf32', eager='train.amp_bf16', warmup=sizes.compile_warmup,
                       timeout=sizes.compile_timeout_s,
                       env=dict(TORCHINDUCTOR_CACHE_DIR=check.folder('inductor_cache'),  # cold: compile time
                                TRITON_CACHE_DIR=check.folder('triton_cache'))))]
    for key, precision, flags, options in rows:
        title = f'{sizes.model} {precision}'
        check.guarded(key, title, bench_training, check, key, title, flags, **options)
    check.guarded('train.googlenet_amp_bf16', 'googlenet (main.py) --amp bf16', googlenet_row, check)


def googlenet_row(check):
    key, title = 'train.googlenet_amp_bf16', 'googlenet (main.py) --amp bf16'
    out = check.folder(key)
    finished = check.main_py(out, '--save-checkpoint', '0', probe=True)
    return [loop_row(check, key, title, finished, out)]


def loop_row(check, key, title, finished, out, baseline=None):
    """A training-loop row: img/s and data wait from metrics.jsonl's train windows after the warm-up steps."""
    if finished.failure():
        return Row.make(key, title, False, finished.failure(), seconds=finished.seconds)
    img_s, waited = window_throughput(os.path.join(out, 'metrics.jsonl'), check.sizes.warm_steps)
    values = dict(img_per_s=img_s, data_wait_share=waited)
    figure = f'{img_s:,.1f} img/s (training loop, steps after {check.sizes.warm_steps}), data wait {waited:.1%}'
    reference = check.value(baseline, 'img_per_s') if baseline else None
    if reference:
        values[f'vs_{baseline}'] = img_s / reference
        figure += f', {img_s / reference:.2f}x {baseline}'
    return Row.make(key, title, math.isfinite(img_s) and img_s > 0, figure, values, finished.peak_memory_bytes,
                    finished.seconds)


def repeat_train_py(check):
    """train.py's default run (the baseline), then --deterministic twice: the same weights bit for bit."""
    sizes = check.sizes
    loop = check.training_loop_flags()
    default_out = check.folder('repeat_default')
    cpu = CpuUse()
    default = check.train_py(default_out, *loop, *AMP_BF16, probe=True, on_line=cpu)
    baseline = loop_row(check, 'repeat.train_default', f'train.py default run ({sizes.model}, --amp bf16)', default,
                        default_out)
    add_cpu_use(check, baseline, cpu)
    check.record(baseline)
    return [repeat_pair(check, 'repeat.train_deterministic', f'train.py --deterministic x2 ({sizes.model}, --amp bf16)',
                        lambda out: check.train_py(out, *loop, *AMP_BF16, '--deterministic', '--save-checkpoint',
                                                   probe=True),
                        'deterministic', ('model_0.pth', 'model'), 'repeat.train_default')]


def repeat_main_py(check):
    """main.py --seed twice: the same weights bit for bit; img/s against the GoogLeNet row (no --seed)."""
    checkpoint = f'checkpoint_0_{check.sizes.main_device}.pth.tar'
    return [repeat_pair(check, 'repeat.main_seed', 'main.py --seed x2 (googlenet, --amp bf16)',
                        lambda out: check.main_py(out, '--seed', '1', '--save-checkpoint', '1', probe=True),
                        'seed', (checkpoint, 'state_dict'), 'train.googlenet_amp_bf16')]


def repeat_pair(check, key, title, start, name, checkpoint, baseline):
    """Two runs of `start(output_dir)` (folders repeat_<name>_a and _b): PASS when the weights in their
    `checkpoint` (file name, state key) are bitwise identical; their img/s against the row `baseline`."""
    started = time.perf_counter()
    runs = [(out, start(out)) for out in (check.folder(f'repeat_{name}_{run}') for run in ('a', 'b'))]
    seconds = time.perf_counter() - started
    failed = [finished.failure() for _, finished in runs if finished.failure()]
    if failed:
        return Row.make(key, title, False, failed[0], seconds=seconds)
    file_name, state = checkpoint
    same, compared = same_weights(*(os.path.join(out, file_name) for out, _ in runs), key=state)
    if not same:
        notes = [line.strip() for line in runs[0][1].lines if line.startswith('note:') and 'determinis' in line]
        compared += f' ({notes[0]})' if notes else ''
    img_s = [window_throughput(os.path.join(out, 'metrics.jsonl'), check.sizes.warm_steps)[0] for out, _ in runs]
    values = dict(identical=same, tensors=compared, img_per_s=img_s)
    figure = f'{compared}; {min(img_s):,.1f} img/s'
    reference = check.value(baseline, 'img_per_s')
    if reference:
        values[f'vs_{baseline}'] = min(img_s) / reference
        figure += f' = {min(img_s) / reference:.2f}x {baseline}\'s {reference:,.1f}'
    return Row.make(key, title, same, figure, values, runs[0][1].peak_memory_bytes, seconds)


def stopped_run(check, output_dir, flags, at_step, **train_options):
    """Start train.py with `flags`, SIGTERM its process group (as a cluster does) once the log shows step
    `at_step`; returns (Finished, (step, samples, checkpoint path) of the save, or None)."""
    sent = []

    def on_line(proc, line):
        step = EPOCH_LINE.match(line)
        if step and int(step.group(1)) >= at_step and not sent:
            sent.append(int(step.group(1)))
            end_group(proc, signal.SIGTERM)

    finished = check.train_py(output_dir, *flags, on_line=on_line, **train_options)
    saved = STOPPED.search(finished.output)
    return finished, (int(saved.group(1)), int(saved.group(2)), saved.group(3)) if saved else None


def resume_after_sigterm(check):
    """The SIGTERM'd --deterministic run, resumed, ends with the uninterrupted run's weights."""
    key, title = 'resume.sigterm', 'SIGTERM mid-epoch + resume = uninterrupted run'
    straight = os.path.join(check.work, 'repeat_deterministic_a', 'model_0.pth')
    if not os.path.exists(straight):
        return [Row.make(key, title, False, 'no uninterrupted run to compare with (repeat.train_deterministic failed)')]
    flags = check.training_loop_flags() + AMP_BF16 + ['--deterministic', '--save-checkpoint']
    out = check.folder('resume_sigterm')
    started = time.perf_counter()
    finished, saved = stopped_run(check, out, flags, check.sizes.sigterm_at)
    if finished.failure() or saved is None:
        why = finished.failure() or 'no mid-epoch save in its log (did the epoch end before the signal?)'
        return [Row.make(key, title, False, f'stopped run: {why}', seconds=finished.seconds)]
    step, samples, path = saved
    resumed = check.train_py(out, *flags, '--resume', path)
    seconds = time.perf_counter() - started
    went_on = RESUMED.search(resumed.output)
    if resumed.failure() or not went_on:
        return [Row.make(key, title, False, f'resume: {resumed.failure() or "no Resuming line"}', seconds=seconds)]
    same, compared = same_weights(straight, os.path.join(out, 'model_0.pth'), key='model')
    figure = (f'stopped after step {step} ({samples} samples), resumed at step {went_on.group(1)}; {compared} '
              'against the uninterrupted run')
    return [Row.make(key, title, same and int(went_on.group(1)) == step + 1, figure,
                     dict(stopped_after_step=step, samples=samples, identical=same, tensors=compared),
                     seconds=seconds)]


def resume_across_devices(check, key, meant, writer, reader):
    """A mid-epoch checkpoint written on `writer` resumed on `reader` (devices): it continues at the next step
    and finishes the epoch with finite weights. `meant`: what the row checks on a GPU machine."""
    sizes = check.sizes
    title = f'{meant}: {writer} -> {reader}' + (' (--device cpu: no GPU, both on the CPU)' if writer == reader else '')
    small = dict(model=sizes.cross_model, batch=sizes.cross_batch, crop=sizes.cross_crop)
    flags = check.training_loop_flags(steps=sizes.cross_steps, batch=sizes.cross_batch, print_freq=1)
    flags += ['--save-checkpoint']
    out = check.folder(key)
    started = time.perf_counter()
    finished, saved = stopped_run(check, out, flags, 3, device=writer, **small)
    if finished.failure() or saved is None:
        why = finished.failure() or 'no mid-epoch save in its log (did the epoch end before the signal?)'
        return [Row.make(key, title, False, f'{writer} run: {why}', seconds=finished.seconds)]
    step, samples, path = saved
    resumed = check.train_py(check.folder(key + '_resumed'), *flags, '--resume', path, device=reader, **small)
    seconds = time.perf_counter() - started
    went_on = RESUMED.search(resumed.output)
    if resumed.failure() or not went_on:
        return [Row.make(key, title, False, f'resume on {reader}: {resumed.failure() or "no Resuming line"}',
                         seconds=seconds)]
    final = torch.load(os.path.join(check.work, key + '_resumed', 'model_0.pth'), map_location='cpu',
                       weights_only=True)['model']
    finite = all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())
    passed = finite and int(went_on.group(1)) == step + 1
    figure = (f'stopped on {writer} after step {step} of {sizes.cross_steps} ({sizes.cross_model}, batch '
              f'{sizes.cross_batch}), resumed on {reader} at step {went_on.group(1)} and finished the epoch; '
              f'{len(final)} tensors, {"all finite" if finite else "NOT FINITE"}')
    return [Row.make(key, title, passed, figure, dict(stopped_after_step=step, samples=samples, finite=finite),
                     seconds=seconds)]


class JpegWriters:
    """sample_data.py --imagenet-like in `processes` processes at once, one class each (the labels do not matter
    here), enough training images for one epoch of the sizes' steps; each writes a folder of its own, whose
    class folder then moves under the dataset's train/ and val/ as class_<k>."""

    def __init__(self, check, processes):
        sizes = check.sizes
        self.root = os.path.join(check.work, 'jpegs')
        self.classes = processes
        train_per_class = math.ceil(sizes.steps * sizes.batch / processes)
        val_per_class = max(sizes.infer_b1_images, math.ceil(sizes.jpeg_val_images / processes))
        self.started = time.perf_counter()
        self.procs = []
        for k in range(processes):
            command = [sys.executable, os.path.join(REPO, 'sample_data.py'), self.part(k), '--imagenet-like',
                       '--classes', '1', '--train-per-class', str(train_per_class),
                       '--val-per-class', str(val_per_class), '--seed', str(k)]
            self.procs.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, start_new_session=True))

    def part(self, k):
        return f'{self.root}_{k}'

    def stop(self):
        """End the writers still running (a run cut short)."""
        for proc in self.procs:
            if proc.poll() is None:
                end_group(proc, signal.SIGKILL)
                proc.communicate()

    def finish(self, timeout):
        """Wait for the writers and assemble the dataset; returns the row."""
        key, title = 'data.jpegs', 'sample_data.py --imagenet-like'
        outputs = []
        for proc in self.procs:
            try:
                outputs.append(proc.communicate(timeout=max(timeout - (time.perf_counter() - self.started), 1))[0])
            except subprocess.TimeoutExpired:
                end_group(proc, signal.SIGKILL)
                outputs.append(proc.communicate()[0] + '\n(killed at its time limit)')
        seconds = time.perf_counter() - self.started
        failed = [out for proc, out in zip(self.procs, outputs) if proc.returncode != 0]
        if failed:
            return Row.make(key, title, False, failed[0].strip().splitlines()[-1][:300], seconds=seconds)
        for k in range(self.classes):
            for split in ('train', 'val'):
                os.makedirs(os.path.join(self.root, split), exist_ok=True)
                os.rename(os.path.join(self.part(k), split, 'class_00'),
                          os.path.join(self.root, split, f'class_{k:02d}'))
        files = sum(len(names) for _, _, names in os.walk(self.root))
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(self.root) for n in names)
        figure = (f'{files} JPEG files, {size / files / 1024:.0f} KB each on average, in {seconds:.0f} s by '
                  f'{self.classes} processes ({files / seconds:.0f} files/s)')
        return Row.make(key, title, files > 0, figure, dict(files=files, bytes=size, processes=self.classes),
                        seconds=seconds)


def fast_rows(check, jpegs):
    sizes = check.sizes
    variants = [('data.fast_prefetch', 'True')] + ([] if check.quick else [('data.fast_no_prefetch', 'False')])
    for key, prefetch in variants:
        title = (f'{sizes.model} --amp bf16 on JPEGs, FAST, {check.cores} workers, '
                 f'{"prefetch" if prefetch == "True" else "--prefetch False"}'
                 + ('' if sizes.device == 'cuda' else ' (the prefetch works on CUDA only)'))
        check.guarded(key, title, fast_row, check, key, title, jpegs, prefetch)
    where = "decoding on the GPU, 'mixed'" if sizes.device == 'cuda' else 'its CPU operators: no GPU'
    title = f'{sizes.model} --amp bf16 on JPEGs, DALI ({where}), {check.cores} threads'
    check.guarded('data.dali', title, dali_row, check, title, jpegs)


def jpeg_loop_row(check, key, title, jpegs, loader_flags, baseline):
    """train.py's training loop on the JPEG folder with `loader_flags` and a loader worker (or DALI thread) per
    core: loop_row against the row `baseline`, with the CPU use of the whole job (add_cpu_use)."""
    out = check.folder(key)
    flags = check.training_loop_flags()
    flags[flags.index('--dataset-size'):flags.index('--dataset-size') + 2] = []  # the folder's images
    cpu = CpuUse()
    finished = check.train_py(out, '--data-path', jpegs, *loader_flags, *flags, *AMP_BF16, workers=check.cores,
                              probe=True, on_line=cpu)
    row = loop_row(check, key, title, finished, out, baseline=baseline)
    if row['status'] == 'PASS':
        row['values']['workers'] = check.cores
        add_cpu_use(check, row, cpu)
    return row


def fast_row(check, key, title, jpegs, prefetch):
    row = jpeg_loop_row(check, key, title, jpegs, ['--dl-worker-type', 'FAST', '--prefetch', prefetch],
                        'repeat.train_default')
    if prefetch == 'False' and row['status'] == 'PASS':
        with_prefetch = check.value('data.fast_prefetch', 'img_per_s')
        if with_prefetch:
            row['values']['prefetch_speed_up'] = with_prefetch / row['values']['img_per_s']
            row['figure'] += f'; prefetch is {with_prefetch / row["values"]["img_per_s"]:.2f}x this'
    return [row]


def dali_row(check, title, jpegs):
    """--dl-worker-type DALI against data.fast_prefetch: img/s, and the cores each needs to keep up; SKIP where
    DALI cannot be imported (it is too large to bring along to a lent GPU machine)."""
    key = 'data.dali'
    try:
        dali.import_dali()
    except UsageError as err:
        return [Row.not_measured(key, title, str(err))]
    row = jpeg_loop_row(check, key, title, jpegs, ['--dl-worker-type', 'DALI'], 'data.fast_prefetch')
    fast_cores = check.value('data.fast_prefetch', 'cores_to_keep_up')
    if fast_cores and 'cores_to_keep_up' in row['values']:
        ratio = row['values']['cores_to_keep_up'] / fast_cores
        row['values']['cores_vs_data.fast_prefetch'] = ratio
        row['figure'] += f' ({ratio:.2f}x data.fast_prefetch\'s {fast_cores:.1f})'
    return [row]


class CpuUse:
    """on_line for a training-loop run: at each 'Epoch: [0] [N/M]' log line, the step, the time and the CPU-seconds
    so far of the run's process group (group_cpu_seconds), so that the steps after the warm-up are measured
    without the start-up (imports, the file list, building the model)."""

    def __init__(self):
        self.samples = []

    def __call__(self, proc, line):
        step = EPOCH_LINE.match(line)
        if step:
            self.samples.append((int(step.group(1)), time.perf_counter(), group_cpu_seconds(proc.pid)))

    def steady(self, warm_steps, batch):
        """(CPU-seconds per image, cores busy: CPU-seconds per second) from the first log line at or after
        step `warm_steps` to the last one; None with fewer than two such lines."""
        kept = [sample for sample in self.samples if sample[0] >= warm_steps]
        if len(kept) < 2 or kept[-1][0] == kept[0][0]:
            return None
        (first_step, first_time, first_cpu), (last_step, last_time, last_cpu) = kept[0], kept[-1]
        used = last_cpu - first_cpu
        return used / ((last_step - first_step) * batch), used / (last_time - first_time)


def add_cpu_use(check, row, cpu):
    """Add to a PASS training-loop row what its whole job's CPU did in the steady steps (CpuUse: CPU-ms per image,
    cores busy), and, but for the synthetic run itself, the cores it would need at the synthetic run's pace
    (repeat.train_default's img/s: the GPU with no input pipeline to wait for)."""
    use = cpu.steady(check.sizes.warm_steps, check.sizes.batch) if row['status'] == 'PASS' else None
    if use is None:
        return
    per_image, busy = use
    row['values'].update(cpu_s_per_image=per_image, cores_busy=busy)
    row['figure'] += f'; CPU {per_image * 1000:.2f} ms per image, {busy:.1f} cores busy'
    pace = check.value('repeat.train_default', 'img_per_s')
    if pace and row['key'] != 'repeat.train_default':
        row['values']['cores_to_keep_up'] = per_image * pace
        row['figure'] += f', {per_image * pace:.1f} cores at repeat.train_default\'s {pace:,.0f} img/s'


def inference_rows(check, jpegs):
    sizes = check.sizes
    check.guarded('infer.benchmark', 'train.py --mode benchmark-inference', benchmark_inference, check)
    checkpoint = os.path.join(check.work, 'repeat_deterministic_a', 'model_0.pth')
    for batch, warm, inputs in ((1, sizes.infer_warm_batches[0], [os.path.join(jpegs, 'val', 'class_00')]),
                                (sizes.infer_batch, sizes.infer_warm_batches[1], [os.path.join(jpegs, 'val')])):
        key = f'infer.inference_py_b{batch}'
        title = f'inference.py {sizes.model} fp32, batch {batch}'
        check.guarded(key, title, inference_py_row, check, key, title, checkpoint, batch, warm, inputs)


def benchmark_inference(check):
    sizes = check.sizes
    out = check.folder('infer_benchmark')
    json_path = os.path.join(out, 'bench.json')
    batches = [1, sizes.infer_batch]
    finished = check.train_py(out, '--mode', 'benchmark-inference', '--benchmark-batch-sizes',
                              *map(str, batches), '--bench-warmup', str(sizes.bench_warmup),
                              '--bench-iterations', str(sizes.bench_iterations), '--benchmark-json', json_path)
    if finished.failure():
        return [Row.make(f'infer.benchmark_b{b}', f'benchmark-inference, batch {b}', False, finished.failure(),
                         seconds=finished.seconds) for b in batches]
    rows = []
    for result in read_json(json_path)['results']:
        b, lat = result['batch_size'], result['latency_ms']
        figure = (f'{result["img_per_s"]:,.1f} img/s; latency mean {lat["mean"]:.2f} / p90 {lat["p90"]:.2f} / '
                  f'p99 {lat["p99"]:.2f} ms ({result["iterations"]} steps)')
        rows.append(Row.make(f'infer.benchmark_b{b}', f'benchmark-inference {sizes.model} fp32, batch {b}',
                             lat['mean'] > 0, figure, dict(img_per_s=result['img_per_s'], latency_ms=lat),
                             result.get('peak_memory_bytes'), finished.seconds))
    return rows


def inference_py_row(check, key, title, checkpoint, batch, warm, inputs):
    """inference.py's time per batch: between the arrivals of consecutive full batches' last output lines, the
    first `warm` batches left out. At batch 1 without loader workers: one image's latency, JPEG decode and
    transforms included; at the large batch with a worker per core, which decode the batches ahead: the main
    process's time per batch (transfer, forward, top-5, printing) once the pipeline is full."""
    if not os.path.exists(checkpoint):
        return [Row.make(key, title, False, 'no checkpoint (repeat.train_deterministic failed)')]
    workers = 0 if batch == 1 else check.cores
    finished = check.run('inference.py', ['--checkpoint', checkpoint, '--device', check.sizes.device,
                                          '--batch-size', str(batch), '--workers', str(workers), *inputs], probe=True)
    if finished.failure():
        return [Row.make(key, title, False, finished.failure(), seconds=finished.seconds)]
    images = sum(len(names) for folder in inputs for _, _, names in os.walk(folder))
    done = [t for line, t in zip(finished.lines, finished.arrived) if line.startswith(tuple(inputs)) and ': ' in line]
    ends = done[batch - 1::batch]
    per_batch = [b - a for a, b in zip(ends, ends[1:])][max(warm - 1, 0):]
    if not per_batch:
        return [Row.make(key, title, False, f'{len(done)} predictions: too few batches to time',
                         seconds=finished.seconds)]
    lat = latency_ms(per_batch)
    figure = (f'{len(done)} of {images} images predicted; {batch * len(per_batch) / sum(per_batch):,.1f} img/s; per '
              f'batch mean {lat["mean"]:.2f} / p90 {lat["p90"]:.2f} / p99 {lat["p99"]:.2f} ms ({len(per_batch)} '
              + ('batches, JPEG decode included, no loader workers)' if workers == 0 else
                 f'batches, decoded ahead by {workers} loader workers)'))
    benchmark = check.value(f'infer.benchmark_b{batch}', 'latency_ms')
    if benchmark:
        figure += f'; {lat["mean"] / benchmark["mean"]:.2f}x benchmark-inference\'s mean'
    return [Row.make(key, title, len(done) == images, figure,
                     dict(predictions=len(done), images=images, latency_ms=lat, workers=workers),
                     finished.peak_memory_bytes, finished.seconds)]


# --- reading what the runs wrote ----------------------------------------------------------------------------

def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_peak(path):
    try:
        return read_json(path)['peak_memory_bytes']
    except (OSError, ValueError, KeyError):
        return None


def data_wait_share(result):
    """Of a benchmark entry's measured window, the share not spent in the steps: waiting for the next batch."""
    steps_s = result['latency_ms']['mean'] / 1000 * result['iterations']
    window_s = result.get('window_s') or result['iterations'] * result['batch_size'] / result['img_per_s']
    return max(0.0, 1 - steps_s / window_s)


def window_throughput(metrics_path, warm_steps):
    """(img/s, share of the time waiting for data) over the train windows of metrics.jsonl that end after
    `warm_steps`: images over the windows' time (each window's images / its img/s)."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    global_batch = next(r['global_batch'] for r in records if r['type'] == 'header')
    images = seconds = waiting = 0.0
    previous = -1
    for record in (r for r in records if r['type'] == 'train'):
        steps = record['step'] - previous
        previous = record['step']
        rate = record['train.total_ips']
        if record['step'] <= warm_steps or not rate:
            continue
        images += steps * global_batch
        seconds += steps * global_batch / rate
        waiting += steps * record['train.data_time']
    if not seconds:
        raise ValueError(f'{metrics_path}: no train window after step {warm_steps}')
    return images / seconds, waiting / seconds


def same_weights(path_a, path_b, key):
    """(True when every tensor of the two checkpoints' `key` state is bitwise equal, 'N tensors identical' or
    what differs)."""
    a = torch.load(path_a, map_location='cpu', weights_only=True)[key]
    b = torch.load(path_b, map_location='cpu', weights_only=True)[key]
    if set(a) != set(b):
        return False, f'different tensors: {sorted(set(a) ^ set(b))[:3]}'
    differing = [name for name in a if not bitwise_equal(a[name], b[name])]
    if differing:
        return False, f'{len(differing)} of {len(a)} tensors differ (first: {differing[0]})'
    return True, f'{len(a)} tensors bitwise identical'


def bitwise_equal(x, y):
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.reshape(-1).contiguous().view(torch.uint8), y.reshape(-1).contiguous().view(torch.uint8))


def latency_ms(seconds):
    import numpy as np
    ms = np.asarray(seconds) * 1000.0
    return dict(mean=float(ms.mean()), p90=float(np.percentile(ms, 90)), p99=float(np.percentile(ms, 99)))


def format_bytes(count):
    return '-' if count is None else f'{count / 2 ** 30:.1f} GiB'


def group_cpu_seconds(pgid):
    """CPU-seconds (user + system, with those of their children already reaped) so far of the live processes of
    process group `pgid`: an entry point this check started (its own group) and its loader workers."""
    ticks = 0
    for pid in (name for name in os.listdir('/proc') if name.isdigit()):
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # it ended meanwhile
            continue
        if int(fields[2]) == pgid:  # pgrp; utime, stime, cutime, cstime follow at 11-14
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf('SC_CLK_TCK')


def end_group(proc, signum):
    """Send `signum` to the process group of a process this check started (it and its loader workers)."""
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def machine_facts(device):
    facts = dict(description=describe(device), cores=len(os.sched_getaffinity(0)), python=platform.python_version(),
                 torch=torch.__version__, torchvision=torchvision.__version__, cpu=cpu_capability())
    if device == 'cuda':
        properties = torch.cuda.get_device_properties(0)
        facts.update(gpu=properties.name, gpu_memory_bytes=properties.total_memory,
                     compute_capability=f'{properties.major}.{properties.minor}', cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(), gpus=torch.cuda.device_count())
    return facts


def print_table(check):
    print('\n| check | result | figure | peak GPU memory | s |\n|---|---|---|---:|---:|')
    for row in check.rows:
        print(f"| {row['key']}: {row['title']} | {row['status']} | {row['figure']} | "
              f"{format_bytes(row['peak_memory_bytes'])} | {row['seconds']:.0f} |")


def outcome(check):
    """('17 of 19 checks PASS; not measured: ...; FAIL: ...', the keys that FAILed: they make the exit status 1)."""
    keys = {status: [row['key'] for row in check.rows if row['status'] == status] for status in ('SKIP', 'FAIL')}
    counted = f"{len(check.rows) - len(keys['SKIP']) - len(keys['FAIL'])} of {len(check.rows)} checks PASS"
    for status, words in (('SKIP', 'not measured'), ('FAIL', 'FAIL')):
        counted += f"; {words}: {', '.join(keys[status])}" if keys[status] else ''
    return counted, keys['FAIL']


def expected_keys(device, quick):
    """The rows a run writes (for its test and for readers of gpu_check.json)."""
    keys = ['train.fp32_tf32', 'train.amp_bf16']
    if not quick:
        keys += ['train.hmp_bf16', 'train.amp_fp16', 'train.amp_bf16_compile']
    keys += ['train.googlenet_amp_bf16', 'repeat.train_default', 'repeat.train_deterministic', 'resume.sigterm']
    if not quick:
        keys += ['repeat.main_seed', 'resume.cpu_to_gpu', 'resume.gpu_to_cpu']
    keys += ['data.jpegs', 'data.fast_prefetch'] + ([] if quick else ['data.fast_no_prefetch']) + ['data.dali']
    keys += ['infer.benchmark_b1', f'infer.benchmark_b{(CUDA_SIZES if device == "cuda" else CPU_SIZES).infer_batch}']
    return keys + ['infer.inference_py_b1',
                   f'infer.inference_py_b{(CUDA_SIZES if device == "cuda" else CPU_SIZES).infer_batch}']


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'),
                        help='cuda (default: the GPU sizes) or cpu (tiny sizes, any machine)')
    parser.add_argument('--quick', action='store_true', help='the subset of about 2 minutes on one H100/H200')
    parser.add_argument('--json', default='gpu_check.json', help='where to write the results (default: %(default)s)')
    parser.add_argument('--keep', action='store_true', help='keep the work folder (logs, checkpoints, JPEGs)')
    return parser.parse_args()


def stop_on_sigterm(signum, frame):
    """A SIGTERM (a time limit) ends the check as Ctrl-C does: the running entry point is killed, the rows so
    far are reported."""
    raise KeyboardInterrupt(f'stopped by {signal.Signals(signum).name}')


def main():
    args = parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda: torch sees no CUDA GPU here; use --device cpu for the small CPU check')
    sizes = CUDA_SIZES if args.device == 'cuda' else CPU_SIZES
    work = tempfile.mkdtemp(prefix='gpu_check_')
    check = Check(sizes, work, os.path.abspath(args.json), args.quick)
    machine, threads = check.machine, check.base_env.get('OMP_NUM_THREADS')
    print(f"{machine['description']}; {check.cores} cores; Python {machine['python']}, torchvision "
          f"{machine['torchvision']}\n{machine['cpu']}\n{sizes.model}, batch {sizes.batch}, {sizes.crop} px, "
          f"channels-last{', --quick' if args.quick else ''}"
          + (f"; each run with OMP_NUM_THREADS={threads}" if threads else '') + f'; work folder {work}', flush=True)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        run_checks(check)
    except BaseException:  # a bug of this script, Ctrl-C or SIGTERM: the rows so far still get reported
        traceback.print_exc()
    finally:
        if check.writers is not None:
            check.writers.stop()
        for key in expected_keys(sizes.device, args.quick):
            if check.row(key) is None:
                check.record(Row.make(key, key, False, 'did not run (see the rows and messages above)'))
        print_table(check)
        counted, failed = outcome(check)
        print(f"\n{counted}; {time.time() - check.started:.0f} s; results in {args.json}"
              + (f'; work folder kept: {work}' if args.keep else ''))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


def run_checks(check):
    sizes = check.sizes
    # On a GPU machine the JPEGs are written while the synthetic rows run (they need one core); on a CPU the
    # writers would be measured with the rows, so they run first.
    background = sizes.device == 'cuda'
    check.writers = JpegWriters(check, min(32, max(1, check.cores - 2)) if background else check.cores)
    if not background:
        jpeg_row = check.writers.finish(sizes.timeout_s)
    training_rows(check)
    check.guarded('repeat.train_deterministic', 'train.py --deterministic x2', repeat_train_py, check)
    check.guarded('resume.sigterm', 'SIGTERM mid-epoch + resume', resume_after_sigterm, check)
    if not check.quick:
        check.guarded('repeat.main_seed', 'main.py --seed x2', repeat_main_py, check)
        gpu = sizes.device
        crossings = (('resume.cpu_to_gpu', 'CPU-written checkpoint resumed on the GPU', 'cpu', gpu),
                     ('resume.gpu_to_cpu', 'GPU-written checkpoint resumed on the CPU', gpu, 'cpu'))
        for key, meant, writer, reader in crossings:
            check.guarded(key, meant, resume_across_devices, check, key, meant, writer, reader)
    if background:
        jpeg_row = check.writers.finish(sizes.timeout_s)
    check.record(jpeg_row)
    if jpeg_row['status'] == 'PASS':
        fast_rows(check, check.writers.root)
        inference_rows(check, check.writers.root)
    else:
        check.guarded('infer.benchmark', 'train.py --mode benchmark-inference', benchmark_inference, check)


if __name__ == '__main__':
    main()
