"""The plainest torchvision training loop, to compare train.py against (benchmarks/compare_with_bare_loop.py).

ImageFolder + torchvision transforms, torchvision.models.<name>(num_classes=N), SGD (momentum 0.9, wd 1e-4),
StepLR stepped per epoch, CrossEntropyLoss, DataLoader(shuffle=True, drop_last=False). Prints `final top1 X`.
"""
import argparse
import random

import numpy as np
import torch
import torchvision
from torchvision import transforms

p = argparse.ArgumentParser()
p.add_argument('--data-path', required=True)
p.add_argument('--model', default='resnet18')
p.add_argument('--epochs', type=int, default=6)
p.add_argument('-b', '--batch-size', type=int, default=32)
p.add_argument('--lr', type=float, default=0.1)
p.add_argument('--lr-step-size', type=int, default=30)
p.add_argument('-j', '--workers', type=int, default=2)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--train-crop-size', type=int, default=224)
p.add_argument('--val-resize-size', type=int, default=256)
p.add_argument('--val-crop-size', type=int, default=224)
args = p.parse_args()

torch.manual_seed(args.seed)
random.seed(args.seed)
np.random.seed(args.seed)
norm = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
train_set = torchvision.datasets.ImageFolder(f'{args.data_path}/train', transforms.Compose([
    transforms.RandomResizedCrop(args.train_crop_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm]))
val_set = torchvision.datasets.ImageFolder(f'{args.data_path}/val', transforms.Compose([
    transforms.Resize(args.val_resize_size), transforms.CenterCrop(args.val_crop_size), transforms.ToTensor(), norm]))
train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                           num_workers=args.workers)
val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=args.workers)

model = torchvision.models.__dict__[args.model](num_classes=len(train_set.classes))
criterion = torch.nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=0.1)

for epoch in range(args.epochs):
    model.train()
    for step, (image, target) in enumerate(train_loader):
        loss = criterion(model(image), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f'epoch {epoch} step {step}/{len(train_loader)} loss {loss.item():.4f}', flush=True)
    scheduler.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for image, target in val_loader:
            correct += (model(image).argmax(1) == target).sum().item()
    top1 = 100.0 * correct / len(val_set)
    print(f'epoch {epoch} top1 {top1:.3f}', flush=True)
print(f'final top1 {top1:.3f}')
