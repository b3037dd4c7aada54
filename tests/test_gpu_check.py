"""benchmarks/gpu_check.py, the prepared GPU check, run whole with --device cpu (tiny sizes), so that it is known
to work before it ever meets a GPU: every row PASS (data.dali SKIP where DALI is not installed), every expected row
in gpu_check.json, exit status 0."""
import json

import pytest

from classification import dali
from classification.cli import UsageError
from conftest import run_script

# What the issue asks of the check, in the order it runs them on the CPU.
EXPECTED_ROWS = ['train.fp32_tf32', 'train.amp_bf16', 'train.hmp_bf16', 'train.amp_fp16', 'train.amp_bf16_compile',
                 'train.googlenet_amp_bf16', 'repeat.train_default', 'repeat.train_deterministic', 'resume.sigterm',
                 'repeat.main_seed', 'resume.cpu_to_gpu', 'resume.gpu_to_cpu', 'data.jpegs', 'data.fast_prefetch',
                 'data.fast_no_prefetch', 'data.dali', 'infer.benchmark_b1', 'infer.benchmark_b8',
                 'infer.inference_py_b1', 'infer.inference_py_b8']


def dali_status():
    """What data.dali reports here: PASS with DALI's CPU operators where it is installed, else SKIP (not measured)."""
    try:
        dali.import_dali()
    except UsageError:
        return 'SKIP'
    return 'PASS'


@pytest.mark.slow  # about 2-3 minutes on 2 cores (a cold torch.compile is 30 s of it)
def test_the_gpu_check_runs_every_row_on_the_cpu_and_passes(tmp_path):
    report_path = tmp_path / 'gpu_check.json'
    result = run_script(['benchmarks/gpu_check.py', '--device', 'cpu', '--json', str(report_path)], timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    report = json.loads(report_path.read_text())
    rows = {row['key']: row for row in report['rows']}
    assert list(rows) == EXPECTED_ROWS, log[-3000:]
    statuses = {key: 'PASS' for key in EXPECTED_ROWS} | {'data.dali': dali_status()}
    assert report['passed'] and {key: row['status'] for key, row in rows.items()} == statuses, log[-3000:]
    for key, row in rows.items():
        assert f"{statuses[key]}  {key}" in result.stdout and row['figure']
        assert row['peak_memory_bytes'] is None  # a GPU figure: none on the CPU
    for key in ('repeat.train_deterministic', 'repeat.main_seed', 'resume.sigterm'):
        assert rows[key]['values']['identical'] is True and 'bitwise identical' in rows[key]['figure']
    for key in ('resume.cpu_to_gpu', 'resume.gpu_to_cpu'):
        assert 'cpu -> cpu' in rows[key]['title'] and 'no GPU' in rows[key]['title']
    assert 0 < rows['train.amp_bf16']['values']['vs_train.fp32_tf32']
    assert rows['train.amp_bf16_compile']['values']['first_step_s'] > 0
    for key in ('train.fp32_tf32', 'data.fast_prefetch', 'train.googlenet_amp_bf16'):
        assert 0 <= rows[key]['values']['data_wait_share'] < 1 and rows[key]['values']['img_per_s'] > 0
    with_dali = statuses['data.dali'] == 'PASS'
    for key in ['repeat.train_default', 'data.fast_prefetch'] + (['data.dali'] if with_dali else []):  # steady CPU
        assert rows[key]['values']['cpu_s_per_image'] > 0 and rows[key]['values']['cores_busy'] > 0
    if with_dali:
        assert rows['data.dali']['values']['cores_vs_data.fast_prefetch'] > 0
    else:
        assert rows['data.dali']['figure'].startswith('not measured: ') and dali.PACKAGE in rows['data.dali']['figure']
    for key in ('infer.benchmark_b1', 'infer.benchmark_b8', 'infer.inference_py_b1', 'infer.inference_py_b8'):
        assert set(rows[key]['values']['latency_ms']) >= {'mean', 'p90', 'p99'}
    assert '| check | result | figure | peak GPU memory | s |' in result.stdout
    passed = sum(status == 'PASS' for status in statuses.values())
    assert f'{passed} of {len(rows)} checks PASS' in result.stdout
