"""Train the ResNet family (resnet50, resnet152, resnext101_32x4d, ...) with train.py on 1 or more devices.

The interface of Habana's demo_resnet.py (release 1.4.0); the launch itself is launcher.py's.

    python demo_resnet.py --world-size 8 --model resnet50 --data-type bf16 --data-path /data/imagenet --dry-run
"""
from classification import launcher

TRAINER = 'train.py'
PRINT_NAMESPACE = True  # as the original, which prints its parsed arguments


def build_parser():
    parser = launcher.demo_parser('ResNet training on Gaudi (hpu), CUDA or CPU through train.py')
    launcher.add_train_py_flags(parser, model='resnet50', dl_worker_type='HABANA')
    return parser


def trainer_args(args, process_per_node):
    return launcher.train_py_args(args, 'Resnet', process_per_node)


if __name__ == '__main__':
    launcher.main(build_parser(), trainer_args, TRAINER, PRINT_NAMESPACE)
