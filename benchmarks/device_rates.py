"""What the device and the decoder manage alone, for the throughput benchmark: the raw
forward/backward rate on a batch already on the device, decoding rates, and GPU utilisation
sampled with ``nvidia-smi`` while a phase runs; and the bare loops (PIL in a DataLoader, or
device decoding)."""

from __future__ import annotations

import time

import numpy as np


def raw_rates(model, layers: list[str], batch_size: int, autocast, repeats: int = 20, rounds: int = 4) -> dict:
    """The card alone: a (batch, 3, S, S) batch already on the device in the layout ``extract`` gives
    the model (``sacv.method.activations.input_memory_format``), TF32 off (the default).
    ``forward_backward``: the model's forward pass and the gradient of the predicted logits w.r.t.
    the layers (no copies); ``extract``: ``sacv.method.activations.extract`` on the same batch (adds the
    float32 device-to-host copies and finiteness checks the pipeline pays); on the CPU also
    ``forward_backward_nchw``, the same on an NCHW batch. Images/s of each: the median over
    ``rounds`` rounds in which the steps take turns."""
    import torch

    from sacv.method.activations import capture_layers, extract, input_memory_format, tf32_mode

    module = model.module
    device = next(module.parameters()).device
    size = model.preprocessing.crop
    batch = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=input_memory_format(device))
    precision = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)

    def forward_backward():
        with tf32_mode(False), capture_layers(module, layers) as captured, precision:
            logits = module(batch).float()
            torch.autograd.grad(logits.max(dim=1).values.sum(), [captured[name] for name in layers])

    def forward_backward_nchw():  # the same on an NCHW batch, where extract gives the model another layout
        nonlocal batch
        batch, chosen = batch.contiguous(), batch
        try:
            forward_backward()
        finally:
            batch = chosen

    def extract_float16():  # as the flow calls it for a float16 store
        return extract(module, batch, layers, None, True, autocast, dtype=torch.float16)

    steps = [("forward_backward", forward_backward), ("extract", extract_float16)]
    if not batch.is_contiguous():
        steps.append(("forward_backward_nchw", forward_backward_nchw))
    for _, step in steps:
        for _ in range(3):
            step()
    per_round = {name: [] for name, _ in steps}
    for _ in range(rounds):  # the steps take turns, so a slow spell of a shared machine hits each alike
        for name, step in steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(repeats // rounds):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            per_round[name].append((repeats // rounds) * batch_size / (time.perf_counter() - started))
    return {name: round(float(np.median(rates)), 1) for name, rates in per_round.items()}


def decode_rates(paths: list[str], model, workers: int) -> dict:
    """Images/s of decoding + preprocessing alone: the flow's decoder (``sacv.io.images.load_image`` +
    the model's preprocessing) in a pool of ``workers`` threads; on CUDA also torchvision's
    ``decode_jpeg`` on the device (nvjpeg) + resize and crop there, from the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from sacv.io.images import load_image

    def pil(path):
        return model.preprocessing(load_image(path)[1])

    rates = {}
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        list(pool.map(pil, paths[:64]))
        started = time.perf_counter()
        reference = list(pool.map(pil, paths))
        rates[f"pil_threads_{max(workers, 1)}"] = round(len(paths) / (time.perf_counter() - started), 1)
    if workers:  # the flow's process loader (execution.loader: processes): uint8 pixels, in shards of 128
        rates[f"pil_processes_{workers}"] = process_decode_rate(paths, model, workers)
    device = next(model.module.parameters()).device
    if device.type == "cuda":
        from sacv.io.device_decode import decode_batch, read_for_device

        def on_device(chunk):
            with ThreadPoolExecutor(max(workers, 1)) as pool:
                encoded = list(pool.map(lambda p: read_for_device(p, 10**9, 8)[1], chunk))
            return decode_batch(encoded, model.preprocessing, device)

        try:
            on_device(paths[:64])
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            decoded = [image for k in range(0, len(paths), 64) for image in on_device(paths[k : k + 64])]
            torch.cuda.synchronize(device)
            rates["nvjpeg_batch_64"] = round(len(paths) / (time.perf_counter() - started), 1)
            std = torch.tensor(model.preprocessing.std).view(3, 1, 1)
            levels = torch.stack([((d.cpu() - r) * std * 255).abs() for d, r in zip(decoded[:256], reference[:256])])
            rates["nvjpeg_vs_pil_levels"] = {
                "max": round(float(levels.max()), 2),
                "mean": round(float(levels.mean()), 4),
                "what": "preprocessed pixels of 256 images, in 8-bit levels",
            }
            rates["nvjpeg_vs_pil_decoded_levels"] = decoded_levels(paths[:64], device)
        except Exception as err:  # a build without nvjpeg: say so, keep the other numbers
            rates["nvjpeg_error"] = repr(err)[:200]
    return rates


def process_decode_rate(paths: list[str], model, workers: int) -> float:
    """Images/s of ``sacv.extract.decode_pool.decoded_shards`` with ``workers`` processes (forked before
    the clock starts)."""
    import pandas as pd

    from sacv.config import parse_config
    from sacv.extract.decode_pool import ShardImages, decoded_shards
    from sacv.io.images import image_id

    rows = pd.DataFrame({"path": paths, "image_id": [image_id(open(p, "rb").read()) for p in paths], "status": "ok"})
    config = parse_config({"run_dir": "unused", "layers": ["unused"]})
    shards = [ShardImages(rows.iloc[k : k + 128], model.preprocessing, config) for k in range(0, len(rows), 128)]
    for items in decoded_shards(shards[:1], workers, "processes"):
        list(items)
    started = time.perf_counter()
    decoded = sum(1 for items in decoded_shards(shards, workers, "processes") for _ in items)
    return round(decoded / (time.perf_counter() - started), 1)


class GpuSampler:
    """``nvidia-smi`` sampled every 100 ms in the background: (time.perf_counter(), utilisation %, MiB used)."""

    def __init__(self):
        import shutil
        import subprocess
        import threading

        self.samples: list[tuple[float, float, float]] = []
        self.process = None
        if shutil.which("nvidia-smi") is None:
            return
        self.process = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            try:
                util, memory = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, memory))

    def window(self, start: float, end: float) -> dict | None:
        """Mean and median utilisation (%) and peak memory (MiB) of the samples in [start, end]."""
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return None
        utils = sorted(u for u, _ in inside)
        return {
            "samples": len(inside),
            "util_mean": round(sum(utils) / len(utils), 1),
            "util_median": utils[len(utils) // 2],
            "memory_mib_peak": max(m for _, m in inside),
        }

    def stop(self):
        if self.process is not None:
            self.process.terminate()


def decoded_levels(paths: list[str], device) -> dict:
    """nvjpeg's pixels against PIL's for the same files, before any resize: max and mean |diff| in
    8-bit levels (tells the decoder's share of the preprocessed difference from the resize's)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    diffs = []
    for path in paths:
        data = torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8)
        ours = decode_jpeg(data, mode=ImageReadMode.RGB, device=device).cpu().permute(1, 2, 0).numpy()  # (H, W, 3)
        theirs = np.asarray(Image.open(path).convert("RGB"))
        diffs.append(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)))
    return {
        "max": int(max(d.max() for d in diffs)),
        "mean": round(float(np.mean([d.mean() for d in diffs])), 4),
        "share_over_8": round(float(np.mean([(d > 8).mean() for d in diffs])), 5),
        "what": "decoded pixels of 64 images before resizing, in 8-bit levels; "
        "share_over_8: pixels more than 8 levels apart",
    }


def bare_loop_device_decoding(model, paths, layers, batch_size, loader_workers, autocast) -> tuple[float, list]:
    """The throughput benchmark's bare loop with device decoding: files read in a pool of
    ``loader_workers`` threads, each batch decoded on the device, then extracted. Returns (seconds, results)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from sacv.io.device_decode import EncodedJpeg, decode_batch, read_for_device
    from sacv.method.activations import extract

    device = next(model.module.parameters()).device
    results = []
    started = time.perf_counter()
    with ThreadPoolExecutor(max(loader_workers, 1)) as pool:
        items = pool.map(lambda p: read_for_device(p, 10**9, 8)[1], paths)
        batch = []
        for item in items:
            batch.append(item)
            if len(batch) == batch_size or len(results) * batch_size + len(batch) == len(paths):
                assert all(isinstance(e, EncodedJpeg) for e in batch)
                images = torch.stack(decode_batch(batch, model.preprocessing, device))
                results.append(
                    extract(
                        model.module, images, layers, None, with_gradients=True, autocast=autocast, dtype=torch.float16
                    )
                )
                batch = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, results


def bare_loop(
    model, paths: list[str], layers: list[str], batch_size: int, loader_workers: int, autocast, decoder: str = "pil"
) -> tuple[float, list]:
    """Decode, preprocess, extract with gradients (float16, as for the flow's store); keep every
    result in memory. Returns (seconds, results).
    ``pil``: a DataLoader with ``loader_workers`` processes handing over uint8 pixels after the resize
    and crop, normalised on the device (as the flow does); ``torchvision``: files read in a pool of
    ``loader_workers`` threads, each batch decoded on the device (``sacv.io.device_decode``)."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    if decoder == "torchvision":
        return bare_loop_device_decoding(model, paths, layers, batch_size, loader_workers, autocast)

    from sacv.io.images import load_image
    from sacv.method.activations import extract

    class Files(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return torch.from_numpy(model.preprocessing.pixels(load_image(paths[i])[1]))  # (S, S, 3) uint8

    device = next(model.module.parameters()).device
    loader = DataLoader(
        Files(),
        batch_size=batch_size,
        num_workers=loader_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=loader_workers > 0,
    )

    def step(batch):
        inputs = model.preprocessing.normalize(batch.to(device, non_blocking=True))  # (B, 3, S, S)
        return extract(model.module, inputs, layers, None, with_gradients=True, autocast=autocast, dtype=torch.float16)

    if loader_workers:  # fork the workers and take the copy-on-write faults of this large process's
        step(next(iter(loader)))  # first writes after a fork (seconds, once) before the clock starts;
    started = time.perf_counter()  # the timed pass starts afresh with the same workers, nothing prefetched
    results = [step(batch) for batch in loader]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, results
