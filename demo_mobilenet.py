"""Train MobileNetV2 with train.py on 1 or more devices.

The interface of Habana's demo_mobilenet.py (release 1.4.0): demo_resnet's flags with the MobileNetV2
defaults, plus the optimiser settings; the launch itself is launcher.py's.

    python demo_mobilenet.py --world-size 8 --data-type bf16 --lr 0.36 --wd 0.00004 --data-path /data/imagenet --dry-run
"""
from classification import launcher

HYPERPARAMETERS = ('--lr', '--momentum', '--wd', '--lr-step-size', '--lr-gamma')

TRAINER = 'train.py'
PRINT_NAMESPACE = True  # as the original, which prints its parsed arguments


def build_parser():
    parser = launcher.demo_parser('MobileNetV2 training on Gaudi (hpu), CUDA or CPU through train.py')
    launcher.add_train_py_flags(parser, model='mobilenet_v2', dl_worker_type='MP')
    parser.add_argument('--lr', default=0.1, type=float, help='initial learning rate')
    parser.add_argument('--momentum', default=0.9, type=float, help='momentum')
    parser.add_argument('--wd', default=1e-4, type=float, help='weight decay (default: 1e-4)')
    parser.add_argument('--lr-step-size', default=30, type=int, help='decrease lr every step-size epochs')
    parser.add_argument('--lr-gamma', default=0.1, type=float, help='decrease lr by a factor of lr-gamma')
    return parser


def trainer_args(args, process_per_node):
    return launcher.train_py_args(args, 'Mobilenet', process_per_node, HYPERPARAMETERS)


if __name__ == '__main__':
    launcher.main(build_parser(), trainer_args, TRAINER, PRINT_NAMESPACE)
