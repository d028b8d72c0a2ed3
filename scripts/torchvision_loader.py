"""torchvision's loader on the files `layerwise bench data` times: ImageFolder (PIL decode)
+ RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize, batches of 64 from a
DataLoader with 1 and 2 worker processes. Prints images/s per worker, to set beside
`layerwise bench data --images DIR`.

    python scripts/torchvision_loader.py DIR [--size 224] [--workers 1 2]
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root", help="folder with train/<class>/*.jpg")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(args.size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    data = datasets.ImageFolder(f"{args.root}/train", transform=tf)
    for workers in args.workers:
        loader = DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=workers,
                            persistent_workers=True)
        for _ in loader:  # warm-up epoch: workers started, files in the page cache
            pass
        start = time.perf_counter()
        images = sum(len(labels) for _, labels in loader)
        secs = time.perf_counter() - start
        print(f"torchvision ImageFolder + DataLoader, PIL decode -> RandomResizedCrop {args.size}, "
              f"{workers} worker(s): {images / secs:7.0f} images/s ({images / secs / workers:.0f} per worker; "
              f"{images} images in {secs:.2f} s)")
        del loader


if __name__ == "__main__":
    main()
