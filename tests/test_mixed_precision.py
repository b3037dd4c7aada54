"""--hmp on CPU/CUDA: the ops named in the lists really run in the listed dtypes."""
import os
from collections import defaultdict

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, TINY_IMAGES, mpirun_prefix, run_script, script_env

from classification import cli, devices, mixed_precision

OPS = {name: os.path.join(REPO, f'ops_{name}.txt') for name in
       ('bf16_Resnet', 'fp32_Resnet', 'bf16_Mobilenet', 'fp32_Mobilenet', 'bf16_googlenet', 'fp32_googlenet')}


class DtypeRecorder(TorchDispatchMode):
    """Notes the dtype of the first tensor argument of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.seen = defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is not None:
            self.seen[func.overloadpacket.__name__].add(tensor.dtype)
        return func(*args, **(kwargs or {}))


def step_dtypes(dev, model):
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with DtypeRecorder() as recorder:
        with dev.autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return recorder.seen, loss


def test_resnet_lists_run_convolution_and_linear_in_bf16_and_the_loss_in_fp32():
    dev = devices.create('cpu', hmp=devices.HmpConfig(OPS['bf16_Resnet'], OPS['fp32_Resnet']))
    model = torchvision.models.resnet18(num_classes=4)
    seen, loss = step_dtypes(dev, model)
    assert seen['convolution'] == {torch.bfloat16}
    assert seen['addmm'] == {torch.bfloat16}                   # linear
    assert seen['_log_softmax'] == {torch.float32}             # cross_entropy
    assert seen['nll_loss_forward'] == {torch.float32}
    assert seen['native_batch_norm'] == {torch.bfloat16}       # unlisted: follows its input
    assert loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


def test_the_lists_decide_not_a_built_in_policy(tmp_path):
    swapped_bf16, swapped_fp32 = tmp_path / 'bf16.txt', tmp_path / 'fp32.txt'
    swapped_bf16.write_text('linear\n# comments and blank lines are allowed\n\n')
    swapped_fp32.write_text('conv2d\ncross_entropy\n')
    dev = devices.create('cpu', hmp=devices.HmpConfig(str(swapped_bf16), str(swapped_fp32)))
    seen, _ = step_dtypes(dev, torchvision.models.resnet18(num_classes=4))
    assert seen['convolution'] == {torch.float32}
    assert seen['addmm'] == {torch.bfloat16}


def test_mobilenet_relu6_runs_in_bf16():
    dev = devices.create('cpu', hmp=devices.HmpConfig(OPS['bf16_Mobilenet'], OPS['fp32_Mobilenet']))
    seen, _ = step_dtypes(dev, torchvision.models.mobilenet_v2(num_classes=4))
    assert seen['hardtanh'] | seen['hardtanh_'] == {torch.bfloat16}  # nn.ReLU6 is hardtanh(0, 6)
    assert seen['convolution'] == {torch.bfloat16}


def test_without_hmp_everything_stays_fp32():
    seen, _ = step_dtypes(devices.create('cpu'), torchvision.models.resnet18(num_classes=4))
    assert seen['convolution'] == {torch.float32} and seen['addmm'] == {torch.float32}


def test_op_list_files_of_the_original_are_all_present_and_valid():
    from classification import mixed_precision
    for name, path in OPS.items():
        ops = mixed_precision.read_op_list(path, '--hmp-' + name[:4])
        mixed_precision.resolve_ops(ops, '--hmp-' + name[:4], path)
        assert len(ops) == (11 if name.startswith('bf16') else 5)


@pytest.mark.parametrize('content, message', [
    (None, "--hmp-bf16: op list file '.*' does not exist"),
    ('conv2d\nconv2dd\n', "--hmp-bf16: 'conv2dd' in .* is not a torch op"),
])
def test_op_list_mistakes_are_clear_errors(tmp_path, content, message):
    path = tmp_path / 'ops.txt'
    if content is not None:
        path.write_text(content)
    with pytest.raises(cli.UsageError, match=message):
        devices.create('cpu', hmp=devices.HmpConfig(str(path), OPS['fp32_Resnet']))


@pytest.mark.slow
def test_train_py_with_hmp_trains_on_cpu(jpeg_dataset, tmp_path):
    result = run_script(['train.py', '--data-path', jpeg_dataset, '--output-dir', str(tmp_path), '--device', 'cpu',
                         '--model', 'resnet18', '--batch-size', '8', '--workers', '0', '--epochs', '1',
                         '--num-train-steps', '2', '--dl-worker-type', 'MP', '--hmp', '--hmp-bf16', OPS['bf16_Resnet'],
                         '--hmp-fp32', OPS['fp32_Resnet'], *TINY_IMAGES])
    assert result.returncode == 0, result.stderr[-2000:]
    assert ' * Acc@1 ' in result.stdout


# --- --hmp on a CPU without bf16 instructions: detected, and said in one line -------------------------------------

RESNET_HMP = devices.HmpConfig(OPS['bf16_Resnet'], OPS['fp32_Resnet'])


def test_bf16_support_is_read_from_this_cpu_and_torch():
    support = mixed_precision.cpu_bf16_support()
    torch_says = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert f'torch capability {torch.backends.cpu.get_cpu_capability()}' in support.description
    assert f"oneDNN bf16: {'yes' if torch_says else 'no'}" in support.description
    bf16_flags = (mixed_precision.cpu_flags() or set()) & {'avx512_bf16', 'amx_bf16', 'avx_ne_convert', 'bf16'}
    assert support.fast == torch_says
    assert support.native == (torch_says and bool(bf16_flags)) and (support.lacks == '') == support.native


@pytest.mark.parametrize('cpu, flags, family, onednn, capability, isa_cap, native, fast', [
    ('AVX2 only (Haswell..Zen 3)', {'avx2', 'fma'}, 'x86', False, 'AVX2', '', False, False),
    ('AVX-512 without BF16 (Skylake-SP)', {'avx2', 'avx512f', 'avx512bw'}, 'x86', True, 'AVX512', '', False, True),
    ('AVX-512 BF16 (Zen 4/5, Cooper Lake)', {'avx2', 'avx512f', 'avx512_bf16'}, 'x86', True, 'AVX512', '', True, True),
    ('AMX (Sapphire Rapids)', {'avx512_bf16', 'amx_bf16', 'amx_tile'}, 'x86', True, 'AVX512', '', True, True),
    ('AVX-512 BF16, oneDNN capped to AVX2', {'avx512_bf16'}, 'x86', False, 'AVX2', 'AVX2', False, False),
    ('AVX-512 BF16, oneDNN capped to AVX512_CORE', {'avx512_bf16'}, 'x86', True, 'AVX512', 'avx512_core', False, True),
    ('Neoverse N1 (Graviton2)', {'fp', 'asimd', 'asimddp'}, 'arm', False, 'DEFAULT', '', False, False),
    ('Neoverse V1 (Graviton3)', {'fp', 'asimd', 'bf16', 'svebf16'}, 'arm', True, 'SVE256', '', True, True),
    ('BF16 instructions, torch without oneDNN bf16', {'bf16'}, 'arm', False, 'DEFAULT', '', False, False),
    ('no /proc/cpuinfo, torch says no', None, 'arm', False, 'DEFAULT', '', False, False),
    ('no /proc/cpuinfo, torch says yes', None, 'arm', True, 'DEFAULT', '', True, True),
])
def test_bf16_is_native_only_with_bf16_instructions_that_torchs_onednn_uses(cpu, flags, family, onednn, capability,
                                                                          isa_cap, native, fast):
    support = mixed_precision.decide_bf16_support(flags, family, onednn, capability, isa_cap)
    assert (support.native, support.fast) == (native, fast), cpu
    assert f'torch capability {capability}' in support.description


def test_the_warning_says_what_the_cpu_lacks_the_slowdown_and_how_to_turn_it_off():
    avx2_only = mixed_precision.slow_bf16_warning(
        mixed_precision.decide_bf16_support({'avx2', 'fma'}, 'x86', False, 'AVX2'))
    assert avx2_only.startswith('warning: --hmp: this CPU has no native bf16 (no AVX-512, AVX-512 BF16, AMX or '
                                'AVX-NE-CONVERT; torch capability AVX2, bf16 flags: none, oneDNN bf16: no)')
    assert 'several times slower than fp32 (resnet50: 6x to 15x)' in avx2_only
    assert avx2_only.endswith('leave out --hmp (demo scripts: --data-type fp32)')
    skylake = mixed_precision.slow_bf16_warning(
        mixed_precision.decide_bf16_support({'avx512bw'}, 'x86', True, 'AVX512'))
    assert '(no AVX-512 BF16, AMX or AVX-NE-CONVERT;' in skylake and 'oneDNN emulates bf16' in skylake
    assert '\n' not in avx2_only + skylake
    assert mixed_precision.slow_bf16_warning(
        mixed_precision.decide_bf16_support({'amx_bf16'}, 'x86', True, 'AVX512')) is None


def test_cpu_device_warns_about_hmp_exactly_when_this_cpu_lacks_native_bf16(capsys):
    devices.create('cpu', hmp=RESNET_HMP)
    devices.create('cpu')
    stderr = capsys.readouterr().err
    expected = mixed_precision.slow_bf16_warning(mixed_precision.cpu_bf16_support())
    assert stderr == (expected + '\n' if expected else '')


@pytest.mark.slow
@pytest.mark.mpi
def test_hmp_where_onednn_has_no_bf16_warns_once_per_host_and_trains(jpeg_dataset, tmp_path):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes torch's oneDNN an AVX2-only one, as on a CPU without AVX-512 (torch itself
    then reports no bf16 support); 2 ranks on one host give one warning."""
    result = run_script(mpirun_prefix(2) + [
        'train.py', '--data-path', jpeg_dataset, '--output-dir', str(tmp_path), '--device', 'cpu',
        '--model', 'resnet18', '--batch-size', '4', '--workers', '1', '--dl-worker-type', 'FAST', '--epochs', '1',
        '--num-train-steps', '1', '--num-eval-steps', '1', '--hmp', '--hmp-bf16', OPS['bf16_Resnet'],
        '--hmp-fp32', OPS['fp32_Resnet'], *TINY_IMAGES], env=script_env(ONEDNN_MAX_CPU_ISA='AVX2'))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines()
                if line.startswith('warning: --hmp: this CPU has no native bf16')]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert 'oneDNN bf16: no, ONEDNN_MAX_CPU_ISA=AVX2' in warnings[0]
    assert 'Training time' in result.stdout
