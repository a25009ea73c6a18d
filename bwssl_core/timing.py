"""What the benchmarks share: the device and thread flags, and a device synchronisation for timers."""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from .train import resolve_device


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="default: the local GPU if any")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")


def device_from_args(args: argparse.Namespace) -> torch.device:
    """Apply --threads and return the --device (default: this process's GPU, else the CPU)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What ran a benchmark: the GPU's name, or the CPU's model and core count (the VMs behind one name differ
    between sessions, so CPU timings compare only beside this)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model}, {os.cpu_count()} cores"
