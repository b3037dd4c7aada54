"""Train GoogLeNet with main.py on 1 or more devices.

The interface of Habana's demo_googlenet.py (release 1.4.0); the launch itself is launcher.py's.
Unlike the original, --enable-lazy means lazy mode, and the trainer's exit status is this script's.

    python demo_googlenet.py --world-size 8 --data-type bf16 --mode lazy --lr 0.2828 --data-path /data/imagenet \
        --dry-run
"""
import sys

from classification import launcher

DEFAULT_MODEL = 'googlenet'
ALWAYS_PASSED = ('--batch-size', '--data-path', '--dataset-type', '--device', '--dl-worker-type', '--epochs',
                 '--learning-rate', '--lr-step-size', '--lr-gamma', '--momentum', '--print-interval',
                 '--save-checkpoint', '--start-epoch', '--weight-decay', '--workers')

TRAINER = 'main.py'
PRINT_NAMESPACE = False  # as the original, which does not print its parsed arguments


def build_parser():
    parser = launcher.demo_parser('GoogLeNet training on Gaudi (hpu), CUDA or CPU through main.py')
    parser.add_argument('--amp', action='store_true',
                        help="main.py's --amp: torch.autocast mixed precision, float16 with loss scaling (GPUs; not "
                             'with --data-type bf16, which is --hmp)')
    parser.add_argument('-b', '--batch-size', default=256, type=int, help='batch size per device')
    parser.add_argument('--data-path', default=launcher.ORIGINAL_DEFAULT_DATA_PATH, help='dataset (train/ and val/)')
    parser.add_argument('--data-type', default='fp32', choices=('fp32', 'bf16'), help='bf16: mixed precision')
    parser.add_argument('--dataset-type', default='Imagenet', choices=('Imagenet',), help='dataset type')
    parser.add_argument('--device', default='hpu', choices=('cpu', 'hpu', 'gpu'), help='device')
    launcher.add_loader_flag(parser, 'MP')
    parser.add_argument('--enable-lazy', action='store_true', help='lazy mode (the same as --mode lazy)')
    parser.add_argument('--epochs', default=90, type=int, help='number of epochs')
    parser.add_argument('-e', '--evaluate', action='store_true', help='evaluate the model only')
    parser.add_argument('--hmp-bf16', default='ops_bf16_googlenet.txt', help='bf16 op list (next to this script)')
    parser.add_argument('--hmp-fp32', default='ops_fp32_googlenet.txt', help='fp32 op list (next to this script)')
    parser.add_argument('--hmp-opt-level', default='O1', help='hmp optimisation level')
    parser.add_argument('--hmp-verbose', action='store_true', help='verbose hmp')
    parser.add_argument('--lr', '--learning-rate', dest='learning_rate', default=0.1, type=float,
                        help='initial learning rate')
    parser.add_argument('--lr-step-size', default=30, type=int, help='decrease lr every step-size epochs')
    parser.add_argument('--lr-gamma', default=0.1, type=float, help='decrease lr by a factor of lr-gamma')
    parser.add_argument('--mode', default='eager', choices=('lazy', 'eager'),
                        help='hpu execution mode (default: eager)')
    parser.add_argument('--model', default=DEFAULT_MODEL, help='model (default: googlenet)')
    parser.add_argument('--momentum', default=0.9, type=float, help='momentum')
    parser.add_argument('--no-aux-logits', action='store_true', help='train without the auxiliary classifiers')
    parser.add_argument('--num-train-steps', default=sys.maxsize, type=int, help='training steps per epoch')
    parser.add_argument('--pretrained', action='store_true', help='start from pre-trained weights')
    parser.add_argument('-p', '--print-interval', default=1, type=int, help='print interval')
    parser.add_argument('--resume', default=None, help='checkpoint to resume from')
    parser.add_argument('--save-checkpoint', default=10, const=5, nargs='?', type=int,
                        help='save a checkpoint every N epochs (a bare flag means 5)')
    parser.add_argument('--seed', default=None, type=int, help='random seed')
    parser.add_argument('--start-epoch', default=0, type=int, help='first epoch number')
    parser.add_argument('--wd', '--weight-decay', dest='weight_decay', default=1e-4, type=float, help='weight decay')
    parser.add_argument('-j', '--workers', default=10, type=int, help='data loading workers')
    launcher.add_launch_flags(parser, world_size=1, process_per_node=8, dist_flag='--distributed')
    return parser


def trainer_args(args, process_per_node):
    command = launcher.flag_values(args, ALWAYS_PASSED)
    if args.model != DEFAULT_MODEL:  # the original dropped --model silently
        command += launcher.flag_values(args, ('--model',))
    command += launcher.switches(args, ('--amp',))
    if args.data_type == 'bf16':
        command += launcher.hmp_args(args.hmp_bf16, args.hmp_fp32) + launcher.flag_values(args, ('--hmp-opt-level',))
        command += launcher.switches(args, ('--hmp-verbose',))
    command += launcher.switches(args, ('--evaluate',))
    if args.mode == 'lazy' or args.enable_lazy:
        command.append('--enable-lazy')
    command += launcher.flag_values(args, ('--num-train-steps',))  # always passed, in the original's place
    command += launcher.switches(args, ('--no-aux-logits', '--pretrained'))
    command += launcher.flag_values(args, [flag for flag in ('--resume', '--seed')
                                           if launcher.value_of(args, flag) is not None])
    return command + launcher.process_per_node_args(process_per_node)


if __name__ == '__main__':
    launcher.main(build_parser(), trainer_args, TRAINER, PRINT_NAMESPACE)
