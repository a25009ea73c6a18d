"""What the benchmarks share: the device and thread flags, and a device synchronisation for timers."""
from __future__ import annotations

import argparse

import torch

from .train import default_device


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="default: the local GPU if any")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")


def device_from_args(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the --device (default: this process's GPU, else the CPU)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device or default_device())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
