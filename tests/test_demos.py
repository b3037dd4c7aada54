"""The demo wrappers as users run them: the Habana README's commands verbatim with --dry-run (golden
commands written by hand from spec 1.6 and 2.2-2.3), and real launches through OpenMPI's mpirun on a
small JPEG folder.
"""
import contextlib
import importlib
import io
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, TINY_IMAGES, run_script, script_env
from classification import cli, launcher, metrics

PY = sys.executable
DATA = '/root/software/data/pytorch/imagenet/ILSVRC2012'
DEFAULT_DATA = DATA + '/'
TRAIN = f'{PY} {REPO}/train.py'
MAIN = f'{PY} {REPO}/main.py'
# A 2 x 28-core host (DEMO_PHYSICAL_CORES=56, DEMO_CPU_SOCKETS=2) with 8 ranks: 7 cores each (spec 2.3).
MPIRUN_8 = 'mpirun -n 8 --bind-to core --map-by slot:PE=7 --rank-by core --report-bindings --allow-run-as-root'
RESNET_BF16 = f'--hmp --hmp-bf16 {REPO}/ops_bf16_Resnet.txt --hmp-fp32 {REPO}/ops_fp32_Resnet.txt'
MOBILENET_BF16 = f'--hmp --hmp-bf16 {REPO}/ops_bf16_Mobilenet.txt --hmp-fp32 {REPO}/ops_fp32_Mobilenet.txt'
GOOGLENET_BF16 = (f'--hmp --hmp-bf16 {REPO}/ops_bf16_googlenet.txt --hmp-fp32 {REPO}/ops_fp32_googlenet.txt '
                  '--hmp-opt-level=O1')
NO_STEP_LIMIT = '--num-train-steps=9223372036854775807'
LR_8X = '--custom-lr-values 0.275 0.45 0.625 0.8 0.08 0.008 0.0008 --custom-lr-milestones 1 2 3 4 30 60 80'
LR_16X = '--custom-lr-values 0.475 0.85 1.225 1.6 0.16 0.016 0.0016 --custom-lr-milestones 1 2 3 4 30 60 80'
LR_32X = '--custom-lr-values 0.875 1.65 2.425 3.2 0.32 0.032 0.0032 --custom-lr-milestones 1 2 3 4 30 60 80'
TWO_HOSTS = '10.10.100.101,10.10.100.102'
FOUR_HOSTS = '10.10.100.101,10.10.100.102,10.10.100.103,10.10.100.104'

# The README's commands, verbatim. Only the placeholders for hosts and interface are filled in (below).
README = {
    'single-i': '$PYTHON -u demo_resnet.py  --world-size 1 --dl-worker-type MP --batch-size 256 --model resnet50 --device hpu --workers 12 --print-freq 20 --channels-last True --dl-time-exclude False --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.1,0.01,0.001,0.0001 --custom-lr-milestones 0,30,60,80',  # noqa: E501
    'single-ii': '$PYTHON -u demo_resnet.py  --world-size 1 --dl-worker-type MP --batch-size 128 --model resnext101_32x4d --device hpu --workers 12 --print-freq 20 --channels-last True --dl-time-exclude False --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 100 --data-type bf16  --custom-lr-values 0.1,0.01,0.001,0.0001 --custom-lr-milestones 0,30,60,80',  # noqa: E501
    'single-iii': '$PYTHON -u demo_resnet.py  --world-size 1 --dl-worker-type MP --batch-size 128 --model resnet152 --device hpu --workers 12 --print-freq 20 --channels-last True --dl-time-exclude False --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.1,0.01,0.001,0.0001 --custom-lr-milestones 0,30,60,80',  # noqa: E501
    'single-iv': '$PYTHON -u demo_mobilenet.py  --world-size 1 --batch-size 256 --model mobilenet_v2 --device hpu --print-freq 10 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --dl-time-exclude=False --lr 0.045 --wd 0.00004 --lr-step-size 1 --lr-gamma 0.98 --momentum 0.9',  # noqa: E501
    'single-v': '$PYTHON -u demo_googlenet.py --batch-size 256 --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --data-type bf16 --device hpu --dl-worker-type MP --epochs 90 --lr 0.1 --mode lazy --model googlenet --no-aux-logits --print-interval 20 --world-size 1 --workers 12',  # noqa: E501
    'single-vi': '$PYTHON -u demo_googlenet.py --batch-size 128 --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --data-type fp32 --device hpu --dl-worker-type MP --epochs 90 --lr 0.07 --mode lazy --model googlenet --no-aux-logits --print-interval 20 --world-size 1 --workers 12',  # noqa: E501
    'multi-i': '$PYTHON -u demo_resnet.py  --world-size 8 --batch-size 256 --model resnet50 --device hpu --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.275,0.45,0.625,0.8,0.08,0.008,0.0008 --custom-lr-milestones 1,2,3,4,30,60,80 --dl-time-exclude=False',  # noqa: E501
    'multi-ii': '$PYTHON -u demo_resnet.py  --world-size 8 --batch-size 256 --model resnet50 --device hpu --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.275,0.45,0.625,0.8,0.08,0.008,0.0008 --custom-lr-milestones 1,2,3,4,30,60,80 --dl-time-exclude=True',  # noqa: E501
    'multi-iii': '$PYTHON -u demo_resnet.py  --world-size 8 --batch-size 256 --model resnet50 --device hpu --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.275,0.45,0.625,0.8,0.08,0.008,0.0008 --custom-lr-milestones 1,2,3,4,30,60,80 --dl-time-exclude=False --dl-worker-type "HABANA" --workers 8',  # noqa: E501
    'multi-iv': 'mpirun -n 8 --bind-to core --map-by slot:PE=7 --rank-by core --report-bindings --allow-run-as-root $PYTHON train.py --data-path=/root/software/data/pytorch/imagenet/ILSVRC2012 --model=resnet50 --device=hpu --batch-size=256 --epochs=90 --workers=10 --dl-worker-type=MP --print-freq=10 --output-dir=. --channels-last=True --seed=123 --hmp --hmp-bf16 ./ops_bf16_Resnet.txt --hmp-fp32 ./ops_fp32_Resnet.txt --custom-lr-values 0.275 0.45 0.625 0.8 0.08 0.008 0.0008 --custom-lr-milestones 1 2 3 4 30 60 80 --deterministic --dl-time-exclude=False',  # noqa: E501
    'multi-v': 'MULTI_HLS_IPS="<node1 ipaddr>,<node2 ipaddr>" $PYTHON -u demo_resnet.py  --world-size 16 --batch-size 256 --model resnet50 --device hpu --workers 8 --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.475,0.85,1.225,1.6,0.16,0.016,0.0016 --custom-lr-milestones 1,2,3,4,30,60,80 --process-per-node 8 --dl-time-exclude=False --dl-worker-type=HABANA',  # noqa: E501
    'multi-vi': 'MULTI_HLS_IPS="<node1 ipaddr>,<node2 ipaddr>,<node3 ipaddr>,<node4 ipaddr>" $PYTHON -u demo_resnet.py  --world-size 32 --batch-size 256 --model resnet50 --device hpu --workers 8 --print-freq 10 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  -custom-lr-values 0.875,1.65,2.425,3.2,0.32,0.032,0.0032 --custom-lr-milestones 1,2,3,4,30,60,80 --process-per-node 8 --dl-time-exclude=False --dl-worker-type=HABANA',  # noqa: E501
    'multi-vii': 'HCCL_SOCKET_IFNAME="<interface_name>" HCCL_OVER_TCP=1 MULTI_HLS_IPS="<node1 ipaddr>,<node2 ipaddr>" $PYTHON -u demo_resnet.py  --world-size 16 --batch-size 256 --model resnet50 --device hpu --workers 8 --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.475,0.85,1.225,1.6,0.16,0.016,0.0016 --custom-lr-milestones 1,2,3,4,30,60,80 --process-per-node 8 --dl-time-exclude=False --dl-worker-type=HABANA',  # noqa: E501
    'multi-viii': 'HCCL_SOCKET_IFNAME="<interface_name>" HCCL_OVER_OFI=1 MULTI_HLS_IPS="<node1 ipaddr>,<node2 ipaddr>" $PYTHON -u demo_resnet.py  --world-size 16 --batch-size 256 --model resnet50 --device hpu --workers 8 --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.475,0.85,1.225,1.6,0.16,0.016,0.0016 --custom-lr-milestones 1,2,3,4,30,60,80 --process-per-node 8 --dl-time-exclude=False --dl-worker-type=HABANA',  # noqa: E501
    'multi-ix': '$PYTHON -u demo_resnet.py --world-size 8 --batch-size 128 --model resnext101_32x4d --device hpu --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 100 --data-type bf16  --dl-time-exclude=False',  # noqa: E501
    'multi-x': '$PYTHON -u demo_resnet.py  --world-size 8 --batch-size 128 --model resnet152 --device hpu --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.275,0.45,0.625,0.8,0.08,0.008,0.0008 --custom-lr-milestones 1,2,3,4,30,60,80 --dl-time-exclude=False',  # noqa: E501
    'multi-xi': '$PYTHON -u demo_resnet.py  --world-size 8 --batch-size 128 --model resnet152 --device hpu --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --custom-lr-values 0.275,0.45,0.625,0.8,0.08,0.008,0.0008 --custom-lr-milestones 1,2,3,4,30,60,80 --dl-time-exclude=True',  # noqa: E501
    'multi-xii': '$PYTHON -u demo_mobilenet.py  --world-size 8 --batch-size 256 --model mobilenet_v2 --device hpu --print-freq 10 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --lr 0.36 --wd 0.00004 --lr-step-size 1 --lr-gamma 0.98 --momentum 0.9 --dl-time-exclude=False',  # noqa: E501
    'multi-xiii': '$PYTHON -u demo_mobilenet.py  --world-size 8 --batch-size 256 --model mobilenet_v2 --device hpu --print-freq 10 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --lr 0.36 --wd 0.00004 --lr-step-size 1 --lr-gamma 0.98 --momentum 0.9 --dl-time-exclude=True',  # noqa: E501
    'multi-xiv': '$PYTHON -u demo_mobilenet.py  --world-size 8 --batch-size 256 --model mobilenet_v2 --device hpu --print-freq 1 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16  --lr 0.36 --wd 0.00004 --lr-step-size 1 --lr-gamma 0.98 --momentum 0.9 --dl-time-exclude=False --dl-worker-type "HABANA" --workers 8',  # noqa: E501
    'multi-xv': '$PYTHON -u demo_mobilenet.py  --world-size 8 --batch-size 256 --model mobilenet_v2 --device hpu --print-freq 10 --channels-last True --deterministic --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --mode lazy --epochs 90 --data-type bf16 --lr 0.36 --wd 0.00004 --lr-step-size 1 --lr-gamma 0.98 --momentum 0.9 --dl-time-exclude=False --dl-worker-type "HABANA" --workers 8',  # noqa: E501
    'multi-xvi': '$PYTHON -u demo_googlenet.py --batch-size 256 --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --data-type bf16 --device hpu --dl-worker-type MP --epochs 90 --lr 0.2828 --mode lazy --model googlenet --no-aux-logits --print-interval 20 --world-size 8 --workers 12',  # noqa: E501
    'multi-xvii': '$PYTHON -u demo_googlenet.py --batch-size 128 --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --data-type fp32 --device hpu --dl-worker-type MP --epochs 90 --lr 0.2 --mode lazy --model googlenet --no-aux-logits --print-interval 20 --world-size 8 --workers 12',  # noqa: E501
    'multi-xviii': '$PYTHON -u demo_googlenet.py --batch-size 256 --data-path /root/software/data/pytorch/imagenet/ILSVRC2012 --data-type bf16 --device hpu --dl-worker-type HABANA --epochs 90 --lr 0.2828 --mode lazy --model googlenet --no-aux-logits --print-interval 20 --world-size 8 --workers 8',  # noqa: E501
}
PLACEHOLDERS = {'<node1 ipaddr>': '10.10.100.101', '<node2 ipaddr>': '10.10.100.102', '<node3 ipaddr>': '10.10.100.103',
                '<node4 ipaddr>': '10.10.100.104', '<interface_name>': 'eth0'}

MULTI_NODE_16 = (
    "mpirun --allow-run-as-root {forwarded}-x MULTI_HLS_IPS=10.10.100.101,10.10.100.102 --prefix /usr/local/openmpi "
    "--mca btl_tcp_if_include 10.10.100.0/16 -x MASTER_ADDR=10.10.100.101 -x MASTER_PORT=12345 "
    "--mca plm_rsh_args '-p 3022' --bind-to core -H 10.10.100.101:56,10.10.100.102:56 -n 16 "
    "--map-by ppr:4:socket:PE=7 --rank-by core --report-bindings")
MULTI_NODE_32 = (
    "mpirun --allow-run-as-root -x MULTI_HLS_IPS=10.10.100.101,10.10.100.102,10.10.100.103,10.10.100.104 "
    "--prefix /usr/local/openmpi --mca btl_tcp_if_include 10.10.100.0/16 -x MASTER_ADDR=10.10.100.101 "
    "-x MASTER_PORT=12345 --mca plm_rsh_args '-p 3022' --bind-to core "
    "-H 10.10.100.101:56,10.10.100.102:56,10.10.100.103:56,10.10.100.104:56 -n 32 "
    "--map-by ppr:4:socket:PE=7 --rank-by core --report-bindings")
RN50_16 = (f'{TRAIN} --data-path={DATA} --model=resnet50 --device=hpu --batch-size=256 --epochs=90 --workers=8 '
           f'--dl-worker-type=HABANA --dl-time-exclude=False --print-freq=1 --output-dir=. --channels-last=True '
           f'--seed=123 {RESNET_BF16} {LR_16X} --deterministic --process-per-node=8')


def resnet(model, batch, epochs, workers, loader, exclude, freq, lr=LR_8X):
    return (f'{TRAIN} --data-path={DATA} --model={model} --device=hpu --batch-size={batch} --epochs={epochs} '
            f'--workers={workers} --dl-worker-type={loader} --dl-time-exclude={exclude} --print-freq={freq} '
            f'--output-dir=. --channels-last=True --seed=123 {RESNET_BF16} '
            + (lr + ' ' if lr else '') + '--deterministic')


def mobilenet(lr, wd, workers, loader, exclude, freq):
    return (f'{TRAIN} --data-path={DATA} --model=mobilenet_v2 --device=hpu --batch-size=256 --epochs=90 '
            f'--workers={workers} --dl-worker-type={loader} --dl-time-exclude={exclude} --print-freq={freq} '
            f'--output-dir=. --channels-last=True --seed=123 --lr={lr} --momentum=0.9 --wd={wd} --lr-step-size=1 '
            f'--lr-gamma=0.98 {MOBILENET_BF16} --deterministic')


def googlenet(batch, lr, workers, loader, bf16):
    return (f'{MAIN} --batch-size={batch} --data-path={DATA} --dataset-type=Imagenet --device=hpu '
            f'--dl-worker-type={loader} --epochs=90 --learning-rate={lr} --lr-step-size=30 --lr-gamma=0.1 '
            f'--momentum=0.9 --print-interval=20 --save-checkpoint=10 --start-epoch=0 --weight-decay=0.0001 '
            f'--workers={workers} ' + (GOOGLENET_BF16 + ' ' if bf16 else '')
            + f'--enable-lazy {NO_STEP_LIMIT} --no-aux-logits')


LR_1X = '--custom-lr-values 0.1 0.01 0.001 0.0001 --custom-lr-milestones 0 30 60 80'
EXPECTED = {
    'single-i': resnet('resnet50', 256, 90, 12, 'MP', False, 20, LR_1X),
    'single-ii': resnet('resnext101_32x4d', 128, 100, 12, 'MP', False, 20, LR_1X),
    'single-iii': resnet('resnet152', 128, 90, 12, 'MP', False, 20, LR_1X),
    'single-iv': mobilenet(0.045, '4e-05', 10, 'MP', False, 10),  # 0.00004 is the float 4e-05
    'single-v': googlenet(256, 0.1, 12, 'MP', bf16=True),
    'single-vi': googlenet(128, 0.07, 12, 'MP', bf16=False),
    'multi-i': f"{MPIRUN_8} {resnet('resnet50', 256, 90, 10, 'HABANA', False, 1)}",
    'multi-ii': f"{MPIRUN_8} {resnet('resnet50', 256, 90, 10, 'HABANA', True, 1)}",
    'multi-iii': f"{MPIRUN_8} {resnet('resnet50', 256, 90, 8, 'HABANA', False, 1)}",
    'multi-v': f"{MULTI_NODE_16.format(forwarded='')} {RN50_16}",
    'multi-vi': f"{MULTI_NODE_32} " + RN50_16.replace('--print-freq=1', '--print-freq=10').replace(LR_16X, LR_32X),
    'multi-vii': f"{MULTI_NODE_16.format(forwarded='-x HCCL_OVER_TCP=1 -x HCCL_SOCKET_IFNAME=eth0 ')} {RN50_16}",
    'multi-viii': f"{MULTI_NODE_16.format(forwarded='-x HCCL_SOCKET_IFNAME=eth0 -x HCCL_OVER_OFI=1 ')} {RN50_16}",
    'multi-ix': f"{MPIRUN_8} {resnet('resnext101_32x4d', 128, 100, 10, 'HABANA', False, 1, '')}",
    'multi-x': f"{MPIRUN_8} {resnet('resnet152', 128, 90, 10, 'HABANA', False, 1)}",
    'multi-xi': f"{MPIRUN_8} {resnet('resnet152', 128, 90, 10, 'HABANA', True, 1)}",
    'multi-xii': f"{MPIRUN_8} {mobilenet(0.36, '4e-05', 10, 'MP', False, 10)}",
    'multi-xiii': f"{MPIRUN_8} {mobilenet(0.36, '4e-05', 10, 'MP', True, 10)}",
    'multi-xiv': f"{MPIRUN_8} {mobilenet(0.36, '4e-05', 8, 'HABANA', False, 1)}",
    'multi-xv': f"{MPIRUN_8} {mobilenet(0.36, '4e-05', 8, 'HABANA', False, 10)}",
    'multi-xvi': f"{MPIRUN_8} {googlenet(256, 0.2828, 12, 'MP', bf16=True)}",
    'multi-xvii': f"{MPIRUN_8} {googlenet(128, 0.2, 12, 'MP', bf16=False)}",
    'multi-xviii': f"{MPIRUN_8} {googlenet(256, 0.2828, 8, 'HABANA', bf16=True)}",
}


def clean_env(**extra):
    """script_env without what the launcher would read from the caller's shell (MULTI_HLS_IPS, PYTHONPATH, ...)."""
    env = script_env(**extra)
    read_by_launcher = ('DOCKER_SSHD_PORT', 'MPI_ROOT', 'DEMO_PHYSICAL_CORES', 'DEMO_CPU_SOCKETS')
    for name in launcher.FORWARDED_VARIABLES + read_by_launcher:
        if name not in extra:
            env.pop(name, None)
    return env


def golden_env():
    """A Habana host as the spec describes it: 2 x 28 cores, OpenMPI in /usr/local/openmpi, no MASTER_PORT."""
    env = clean_env(PYTHON=PY, DEMO_PHYSICAL_CORES='56', DEMO_CPU_SOCKETS='2', MPI_ROOT='/usr/local/openmpi')
    del env['MASTER_PORT']
    return env


def run_shell(command, env, cwd=REPO, timeout=120):
    """Run a README command line as a user's shell would."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    return subprocess.run(['bash', '-c', command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_demo_in_process(script, args, env, cwd=REPO):
    """`python <script> args` run inside the test process as its __main__ block runs it, with `env` as the
    environment and `cwd` as the folder: (exit status, stdout, stderr). For dry runs and bad input, which start
    nothing; real launches go through run_script."""
    module = importlib.import_module(script[:-3])
    saved_env, saved_cwd, saved_argv0 = dict(os.environ), os.getcwd(), sys.argv[0]
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv[0] = os.path.join(REPO, script)  # argparse names the script in its errors
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.run_cli(launcher.launch_demo, module.build_parser(), module.trainer_args, module.TRAINER,
                               module.PRINT_NAMESPACE, list(args))
    except SystemExit as exit_:
        code = exit_.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv[0] = saved_argv0
    return subprocess.CompletedProcess([script, *args], code or 0, out.getvalue(), err.getvalue())


def dry_run(script, *args, env=None, cwd=REPO):
    result = run_demo_in_process(script, [*args, '--dry-run'], env or golden_env(), cwd)
    assert result.returncode == 0, result.stderr
    return result


def printed_command(result):
    return result.stdout.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize('example', sorted(EXPECTED))
def test_readme_example_runs_verbatim_and_builds_the_original_command(example):
    result = run_shell(README[example] + ' --dry-run', golden_env())
    assert result.returncode == 0, result.stderr
    assert printed_command(result) == EXPECTED[example]
    lines = result.stdout.splitlines()
    assert lines[-2].startswith('#') and not any(line.startswith('export ') for line in lines)
    assert lines[0].startswith('Namespace(') == ('googlenet' not in README[example])  # as the originals
    prefix_said = '# mpirun --prefix /usr/local/openmpi (where each host finds orted): MPI_ROOT' in lines
    assert prefix_said == ('MULTI_HLS_IPS' in README[example])
    typo_note = "note: reading '-custom-lr-values' as '--custom-lr-values'\n"
    assert result.stderr == (typo_note if example == 'multi-vi' else '')


def test_every_readme_command_has_a_golden_or_a_real_launch():
    assert sorted(README) == sorted(list(EXPECTED) + ['multi-iv'])


@pytest.mark.parametrize('script, expected', [
    ('demo_resnet.py', f'{MPIRUN_8} {TRAIN} --data-path={DEFAULT_DATA} --model=resnet50 --device=hpu --batch-size=128 '
                       '--epochs=1 --workers=10 --dl-worker-type=HABANA --dl-time-exclude=True --print-freq=1 '
                       '--output-dir=. --channels-last=True --seed=123'),
    ('demo_mobilenet.py', f'{MPIRUN_8} {TRAIN} --data-path={DEFAULT_DATA} --model=mobilenet_v2 --device=hpu '
                          '--batch-size=128 --epochs=1 --workers=10 --dl-worker-type=MP --dl-time-exclude=True '
                          '--print-freq=1 --output-dir=. --channels-last=True --seed=123 --lr=0.1 --momentum=0.9 '
                          '--wd=0.0001 --lr-step-size=30 --lr-gamma=0.1'),
    ('demo_googlenet.py', f'{MAIN} --batch-size=256 --data-path={DEFAULT_DATA} --dataset-type=Imagenet --device=hpu '
                          '--dl-worker-type=MP --epochs=90 --learning-rate=0.1 --lr-step-size=30 --lr-gamma=0.1 '
                          '--momentum=0.9 --print-interval=1 --save-checkpoint=10 --start-epoch=0 '
                          f'--weight-decay=0.0001 --workers=10 {NO_STEP_LIMIT}'),  # eager: nothing between
], ids=['resnet', 'mobilenet', 'googlenet'])
def test_defaults_are_the_originals(script, expected):
    assert printed_command(dry_run(script)) == expected


def test_resnet_short_options_value_parsing_and_optional_flags():
    result = dry_run('demo_resnet.py', '-p', '/d', '-m', 'resnet18', '-d', 'cpu', '-b', '4', '-e', '2', '-j', '1',
                     '-w', '1', '--mode', 'eager', '--dl-worker-type', 'habana', '--dl-time-exclude', 'false',
                     '--channels-last', 'FALSE', '--num-train-steps', '5', '--num-eval-steps', '0', '--save-checkpoint',
                     '--resume', 'ck.pth', '--seed', '7', '--output-dir', 'out', '--print-freq', '3')
    assert printed_command(result) == (
        f'{TRAIN} --data-path=/d --model=resnet18 --device=cpu --batch-size=4 --epochs=2 --workers=1 '
        '--dl-worker-type=HABANA --dl-time-exclude=False --print-freq=3 --output-dir=out --channels-last=False '
        '--seed=7 --run-lazy-mode False --num-train-steps=5 --num-eval-steps=0 --save-checkpoint --resume=ck.pth')


def test_googlenet_short_options_and_every_optional_flag():
    result = dry_run('demo_googlenet.py', '-b', '4', '-e', '-p', '5', '-j', '2', '--lr', '0.3', '--wd', '0.001',
                     '--amp', '--pretrained', '--seed', '1', '--resume', 'r.pth', '--save-checkpoint', '--enable-lazy',
                     '--model', 'resnet18', '--data-type', 'bf16', '--hmp-verbose', '--hmp-opt-level', 'O2',
                     '--dl-worker-type', 'habana', '--device', 'cpu', '--data-path', '/d')
    assert printed_command(result) == (
        f'{MAIN} --batch-size=4 --data-path=/d --dataset-type=Imagenet --device=cpu --dl-worker-type=HABANA '
        '--epochs=90 --learning-rate=0.3 --lr-step-size=30 --lr-gamma=0.1 --momentum=0.9 --print-interval=5 '
        '--save-checkpoint=5 --start-epoch=0 --weight-decay=0.001 --workers=2 --model=resnet18 '
        f'--amp --hmp --hmp-bf16 {REPO}/ops_bf16_googlenet.txt --hmp-fp32 {REPO}/ops_fp32_googlenet.txt '
        f'--hmp-opt-level=O2 --hmp-verbose --evaluate --enable-lazy {NO_STEP_LIMIT} --pretrained --resume=r.pth '
        '--seed=1')


@pytest.mark.parametrize('script, flag', [('demo_mobilenet.py', '--dist'), ('demo_googlenet.py', '--distributed')])
def test_distributed_flag_with_world_size_one_means_eight_ranks(script, flag):
    assert printed_command(dry_run(script, '--world-size', '1', flag)).startswith(MPIRUN_8 + ' ')


def test_dry_run_from_another_directory_without_pythonpath_uses_absolute_paths(tmp_path):
    result = dry_run('demo_mobilenet.py', '--world-size', '1', '--data-type', 'bf16', cwd=str(tmp_path))
    assert f' {REPO}/train.py ' in printed_command(result)
    assert f' {REPO}/ops_bf16_Mobilenet.txt ' in printed_command(result)


def test_multi_node_dry_run_forwards_the_hccl_variables():
    env = clean_env(MULTI_HLS_IPS=TWO_HOSTS, HCCL_OVER_TCP='1', HCCL_OVER_OFI='1', HCCL_SOCKET_IFNAME='ens1f0',
                    DOCKER_SSHD_PORT='2222', MASTER_PORT='29500', DEMO_PHYSICAL_CORES='56', DEMO_CPU_SOCKETS='2')
    result = dry_run('demo_resnet.py', '--world-size', '16', '--data-path', '/d', env=env)
    words = shlex.split(printed_command(result))
    prefix = words[words.index('--prefix') + 1]
    assert os.path.isfile(os.path.join(prefix, 'bin', 'mpirun'))  # this machine's OpenMPI, MPI_ROOT being unset
    assert shlex.join(words[:words.index(PY)]) == (
        'mpirun --allow-run-as-root -x HCCL_OVER_TCP=1 -x HCCL_SOCKET_IFNAME=ens1f0 -x HCCL_OVER_OFI=1 '
        f'-x MULTI_HLS_IPS={TWO_HOSTS} --prefix {prefix} --mca btl_tcp_if_include 10.10.100.0/16 '
        "-x MASTER_ADDR=10.10.100.101 -x MASTER_PORT=29500 --mca plm_rsh_args '-p 2222' --bind-to core "
        '-H 10.10.100.101:56,10.10.100.102:56 -n 16 --map-by ppr:4:socket:PE=7 --rank-by core --report-bindings')
    assert words[-1] == '--process-per-node=8'
    assert (f"# mpirun --prefix {prefix} (where each host finds orted): the installation of {shutil.which('mpirun')} "
            'on PATH, MPI_ROOT being unset') in result.stdout.splitlines()
    assert ('# forwarded to every rank with mpirun -x: HCCL_OVER_TCP=1 HCCL_SOCKET_IFNAME=ens1f0 HCCL_OVER_OFI=1 '
            f'MULTI_HLS_IPS={TWO_HOSTS} MASTER_ADDR=10.10.100.101 MASTER_PORT=29500') in result.stdout


def test_more_ranks_than_cores_runs_oversubscribed_and_says_so_in_one_line():
    env = clean_env(DEMO_PHYSICAL_CORES='2')
    env.pop('OMP_NUM_THREADS')
    result = dry_run('demo_resnet.py', '--world-size', '8', env=env)
    lines = result.stdout.splitlines()
    assert lines[-2] == 'export OMP_NUM_THREADS=1'
    assert lines[-1].startswith('mpirun -n 8 --oversubscribe --bind-to none --rank-by core --allow-run-as-root ')
    assert result.stderr == ('note: 8 ranks on 2 physical cores: running oversubscribed and unbound '
                             '(mpirun --oversubscribe --bind-to none) with OMP_NUM_THREADS=1\n')


@pytest.mark.parametrize('script, args, error', [
    ('demo_resnet.py', ['--custom-lr-values', '0.1,0.01'],
     'error: --custom-lr-values: needs --custom-lr-milestones as well (one learning rate per milestone epoch)'),
    ('demo_mobilenet.py', ['--custom-lr-values', '0.1,1e-3', '--custom-lr-milestones', '0,30'],
     "error: --custom-lr-values: '1e-3' is not a decimal number with a dot, such as 0.1 or .1 (in '0.1,1e-3'; "
     'separate items with commas)'),
    ('demo_resnet.py', ['--world-size', '15'],
     'error: --world-size 15 does not divide evenly over the 2 hosts in MULTI_HLS_IPS; use a multiple of 2'),
    ('demo_resnet.py', ['--channels-last', 'maybe'],
     "demo_resnet.py: error: argument --channels-last: expected True or False, got 'maybe' (see --help)"),
], ids=['lone-lr-list', 'malformed-lr', 'uneven-hosts', 'bad-bool'])
def test_bad_input_is_one_line_naming_the_flag(script, args, error):
    # --dry-run as well: should the error not come, nothing may try to reach the hosts
    result = run_demo_in_process(script, [*args, '--data-path', '/d', '--dry-run'], clean_env(MULTI_HLS_IPS=TWO_HOSTS))
    assert (result.returncode, result.stderr) == (2, error + '\n')
    assert '--dry-run: nothing was started' not in result.stdout


# Real launches: OpenMPI's mpirun, the trainer on CPU, a JPEG folder, a few steps.
QUICK_CPU_RUN = ['--device', 'cpu', '--batch-size', '4', '--workers', '0', '--epochs', '1', '--num-train-steps', '2',
                 '--num-eval-steps', '1']


def needs_two_cores():
    if launcher.detected_topology().cores < 2:
        pytest.skip('binding 2 ranks to a core each needs 2 physical cores')


def run_demo_elsewhere(tmp_path, script, *args, **env):
    """As a user would: from another directory, no PYTHONPATH (and never MULTI_HLS_IPS)."""
    return run_script([os.path.join(REPO, script), *args], cwd=str(tmp_path), env=clean_env(**env), timeout=300)


def assert_trained_on_two_ranks(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'command = mpirun -n 2 --bind-to core --map-by slot:PE=' in result.stdout
    assert '| distributed init (rank 0' in result.stdout and '| distributed init (rank 1' in result.stdout
    assert ' * Acc@1 ' in result.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_demo_resnet_trains_on_two_ranks_through_mpirun(jpeg_dataset, tmp_path):
    needs_two_cores()
    result = run_demo_elsewhere(tmp_path, 'demo_resnet.py', '--world-size', '2', '--model', 'resnet18',
                                '--dl-worker-type', 'MP', '--data-path', jpeg_dataset, '--custom-lr-values', '0.2,0.02',
                                '--custom-lr-milestones', '0,1', '--deterministic', '--tensorboard', *QUICK_CPU_RUN)
    assert_trained_on_two_ranks(result)
    assert 'world_size=2' in result.stdout and 'lr: 0.2 ' in result.stdout  # the custom schedule reached train.py
    records = metrics.read(str(tmp_path))  # --output-dir . of the demo: rank 0 alone wrote it
    assert [r['type'] for r in records] == ['header', 'train', 'train', 'val', 'epoch']
    assert (records[0]['world_size'], records[0]['global_batch'], records[-1]['train.images']) == (2, 8, 16)
    assert len(os.listdir(tmp_path / 'tensorboard')) == 1  # --tensorboard reached train.py: one event file


@pytest.mark.slow
@pytest.mark.mpi
def test_demo_mobilenet_trains_on_two_ranks_through_mpirun_in_bf16(jpeg_dataset, tmp_path):
    needs_two_cores()
    result = run_demo_elsewhere(tmp_path, 'demo_mobilenet.py', '--world-size', '2', '--data-path', jpeg_dataset,
                                '--data-type', 'bf16', '--mode', 'eager', '--lr', '0.05', *QUICK_CPU_RUN)
    assert_trained_on_two_ranks(result)
    assert f"is_hmp=True, hmp_bf16='{REPO}/ops_bf16_Mobilenet.txt'" in result.stdout
    assert 'run_lazy_mode=False' in result.stdout and 'lr: 0.05 ' in result.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_demo_googlenet_trains_on_two_ranks_through_mpirun_in_bf16(jpeg_dataset, tmp_path):
    needs_two_cores()
    result = run_demo_elsewhere(tmp_path, 'demo_googlenet.py', '--world-size', '2', '--device', 'cpu', '-b', '4',
                                '-j', '0', '--epochs', '1', '--num-train-steps', '2', '--data-path', jpeg_dataset,
                                '--no-aux-logits', '--mode', 'lazy', '--data-type', 'bf16')
    assert_trained_on_two_ranks(result)
    assert f"is_hmp=True, hmp_bf16='{REPO}/ops_bf16_googlenet.txt'" in result.stdout


@pytest.mark.slow
@pytest.mark.mpi
def test_readme_manual_mpirun_example_trains_on_cpu(jpeg_dataset):
    """Multinode example iv, run from the repository as the README says, sized for this machine (2 ranks of one
    core instead of 8 of 7), on CPU, with the step limits and small crops appended (train.py: last flag wins)."""
    needs_two_cores()
    command = (README['multi-iv'].replace('-n 8', '-n 2').replace('PE=7', 'PE=1').replace(DATA, jpeg_dataset)
               .replace('--device=hpu', '--device=cpu'))
    command += ' --epochs=1 --batch-size=4 --workers=0 --num-train-steps=2 --num-eval-steps=1 ' + ' '.join(TINY_IMAGES)
    result = run_shell(command, script_env(PYTHON=PY), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hmp_bf16='./ops_bf16_Resnet.txt'" in result.stdout and 'world_size=2' in result.stdout
    assert 'lr: 0.1 ' in result.stdout and ' * Acc@1 ' in result.stdout  # epoch 0 is before the first milestone


@pytest.mark.slow
@pytest.mark.mpi
def test_failing_trainer_under_oversubscribed_mpirun_fails_the_wrapper(tmp_path):
    """Two ranks on what the launcher is told is one core: the unbound line really starts both ranks."""
    result = run_demo_elsewhere(tmp_path, 'demo_resnet.py', '--world-size', '2', '--data-path',
                                str(tmp_path / 'missing'), *QUICK_CPU_RUN, DEMO_PHYSICAL_CORES='1')
    assert result.returncode != 0
    assert 'command = mpirun -n 2 --oversubscribe --bind-to none ' in result.stdout
    assert result.stderr.startswith('note: 2 ranks on 1 physical cores: running oversubscribed and unbound')
    assert result.stderr.count(f"error: --data-path: '{tmp_path / 'missing'}' does not exist") == 2


@pytest.mark.slow
@pytest.mark.parametrize('script', ['demo_resnet.py', 'demo_mobilenet.py', 'demo_googlenet.py'])
def test_wrapper_exit_status_is_the_trainers(script, tmp_path):
    args = ['--world-size', '1', '--device', 'cpu', '--data-path', str(tmp_path / 'missing')]
    trainer = shlex.split(printed_command(dry_run(script, *args, env=clean_env())))
    direct = subprocess.run(trainer, cwd=str(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=120)
    wrapped = run_demo_elsewhere(tmp_path, script, *args)
    assert direct.returncode != 0
    assert wrapped.returncode == direct.returncode, wrapped.stderr
