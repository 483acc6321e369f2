"""A loaded model and the policy that applies it: device, threads, batching (:class:`Predictor`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.windows import Window

from cropmap.device import resolve_device
from cropmap.errors import ConfigError
from cropmap.predict.bundle import load_bundle
from cropmap.predict.chips import predict_chips
from cropmap.predict.pixels import predict_pixels
from cropmap.predict.rewrites import optimize_for_inference
from cropmap.predict.tile import Batch, TileResult

#: Pixels per forward pass on CPU (a batch of ``batch_size`` runs in chunks of this size).
CPU_CHUNK = 2048

#: ``prediction.precision`` settings.
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (oneDNN's bf16 kernels; elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return device.type == "cpu" and any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def compute_dtype(precision: str, device: torch.device, task: str = "classification") -> torch.dtype | None:
    """The autocast dtype of the model step, or None for plain fp32.

    ``auto`` is bf16 on CUDA (as training) and, for pixel classification, on CPUs with bf16
    arithmetic (:func:`native_bf16`), where it halves the model step's cost and its map was
    checked against fp32 (``benchmarks/predict_precision.py``); fp32 elsewhere, segmentation on
    CPUs included. ``fp32`` and ``bf16`` force one. bf16 keeps fp32 accumulation: probabilities
    move by ~1e-3 and a class flips only where two classes are nearly tied.

    Raises:
        ConfigError: an unknown setting.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"config key prediction.precision: {precision!r} is not a precision; use {', '.join(PRECISIONS)}")
    if precision == "auto":
        use = native_bf16(device) and (device.type == "cuda" or task == "classification")
        return torch.bfloat16 if use else None
    return torch.bfloat16 if precision == "bf16" else None


class Predictor:
    """A loaded model plus everything needed to apply it to stack windows.

    :meth:`proba` gives class probabilities of one batch (what the metrics and the sample-table
    comparison use); :meth:`predict_tile` streams a tile of the stacks through the model
    (:mod:`cropmap.predict.pixels`, :mod:`cropmap.predict.chips`).

    On CPU, ``threads`` model threads each run whole batches with one intra-op thread: no OpenMP
    barriers between small kernels (which cost up to 3x on a shared 2-core machine), and pixel
    batches run in chunks of :data:`CPU_CHUNK` pixels so activations stay in cache. On CUDA one
    thread runs the model while the copy back of batch k overlaps the forward of batch k+1, and
    batches are gathered in pinned memory. The model step runs under bf16 autocast on CUDA and,
    for pixel classification, on CPUs with bf16 arithmetic (``precision``, :func:`compute_dtype`);
    the metrics stage scores the map's model because it applies the model through this class.

    Args:
        ckpt: ``model.ckpt`` bundle.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda`` (``prediction.device``).
        batch_size: pixels per forward pass (segmentation: ``batch_size // chip**2`` chips, at least 1).
        threads: CPU model threads, one intra-op thread each (default ``CROPMAP_THREADS`` or
            torch's thread count).
        readers: reader threads (default 1 on CPU; on CUDA every core but one, at most 32).
        precision: ``auto``, ``fp32`` or ``bf16`` (``prediction.precision``, :func:`compute_dtype`).
    """

    def __init__(self, ckpt: Path, device: str = "auto", batch_size: int = 8192, threads: int | None = None,
                 readers: int | None = None, precision: str = "auto") -> None:
        self.device = resolve_device(device, "prediction.device")
        #: Whether the model runs on CUDA (pinned host buffers, async copies).
        self.cuda = self.device.type == "cuda"
        self.threads = max(1, threads or int(os.environ.get("CROPMAP_THREADS", 0)) or torch.get_num_threads())
        self.model, self.norm, self.bundle = load_bundle(ckpt, self.device)
        self.modalities: list[str] = self.bundle["modalities"]
        self.task: str = self.bundle["task"]
        #: Autocast dtype of the model step (None: fp32).
        self.dtype = compute_dtype(precision, self.device, self.task)
        self.min_valid_fraction: float = self.bundle["min_valid_fraction"]
        self.n_classes: int = self.bundle["model_kwargs"]["n_classes"]
        #: Channels per time step of each modality (the model's bands).
        self.channels: dict[str, int] = {m: int(c) for m, c in self.bundle["model_kwargs"]["in_channels"].items()}
        self.batch_size = max(1, int(batch_size))
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        intra = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny check: no thread pool spin-up
        try:
            self.model = optimize_for_inference(self.model, self.example())
        finally:
            torch.set_num_threads(intra)
        cpus = os.cpu_count() or 2
        # decoding float32 deflate stacks costs ~0.3 Mpx/s per core: on CUDA every spare core reads
        self.readers = max(1, readers if readers is not None else (min(32, cpus - 1) if self.cuda else 1))

    # ------------------------------------------------------------------ the model
    @torch.inference_mode()
    def proba(self, batch: Batch) -> torch.Tensor:
        """Class probabilities ``[N, K(, H, W)]`` (float32, on the device) of one batch.

        ``batch``: ``{modality: [N, ...], "mask": [N, M(, H, W)]}`` as the model takes it,
        before normalisation (the bundle's statistics are applied here).
        """
        n = len(batch["mask"])
        if not self.cuda and batch["mask"].dim() == 2 and n > CPU_CHUNK:
            return torch.cat([self.proba({k: v[i : i + CPU_CHUNK] for k, v in batch.items()})
                              for i in range(0, n, CPU_CHUNK)])
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            out = self.model(self.norm(batch))
        return torch.softmax(out["logits"].float(), dim=1)

    def apply(self, items: Iterable[tuple[Any, Batch]], scatter: Callable[[Any, np.ndarray], None]) -> None:
        """Run the model over ``(meta, batch)`` items; ``scatter(meta, proba)`` gets numpy probabilities.

        CPU: :attr:`threads` model threads with one intra-op thread each. CUDA: one thread, the
        copy back of batch k overlapping the forward of batch k+1.
        """
        if self.cuda:
            self._apply_cuda(items, scatter)
            return
        intra = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.threads == 1:
                with torch.inference_mode():
                    for meta, batch in items:
                        scatter(meta, self.proba(batch).numpy())
                return
            it = iter(items)
            take, put = threading.Lock(), threading.Lock()
            errors: list[BaseException] = []

            def work() -> None:
                try:
                    with torch.inference_mode():
                        while not errors:
                            with take:
                                nxt = next(it, None)
                            if nxt is None:
                                return
                            p = self.proba(nxt[1]).numpy()
                            with put:
                                scatter(nxt[0], p)
                except BaseException as exc:
                    errors.append(exc)

            workers = [threading.Thread(target=work, name=f"cropmap-model-{i}") for i in range(self.threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            if errors:
                raise errors[0]
        finally:
            torch.set_num_threads(intra)

    @torch.inference_mode()
    def _apply_cuda(self, items: Iterable[tuple[Any, Batch]], scatter: Callable[[Any, np.ndarray], None]) -> None:
        pending: tuple[Any, torch.Tensor, torch.cuda.Event] | None = None
        for meta, batch in items:
            p = self.proba(batch)
            host = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            p = host.copy_(p, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            if pending is not None:
                self._settle(pending, scatter)
            pending = (meta, p, ev)
        if pending is not None:
            self._settle(pending, scatter)

    @staticmethod
    def _settle(pending: tuple[Any, torch.Tensor, torch.cuda.Event], scatter: Callable[[Any, np.ndarray], None]) -> None:
        meta, p, ev = pending
        ev.synchronize()
        scatter(meta, p.numpy())

    def example(self, n: int = 2, size: int = 16) -> Batch:
        """A random batch of ``n`` samples (``size`` px chips for segmentation) on the device, every
        modality available: what the inference rewrites are checked on (benchmarks time it too)."""
        gen = torch.Generator().manual_seed(0)
        batch: Batch = {}
        for m in self.modalities:
            shape = self.input_shape(m)
            if self.task == "segmentation":
                shape = (int(np.prod(shape)), size, size)
            batch[m] = torch.randn((n, *shape), generator=gen).to(self.device)
        spatial = (size, size) if self.task == "segmentation" else ()
        batch["mask"] = torch.ones((n, len(self.modalities), *spatial), dtype=torch.bool, device=self.device)
        return batch

    # ------------------------------------------------------------------ batches
    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An empty host tensor to gather a batch into (pinned on CUDA, for asynchronous copies)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.cuda)

    def input_shape(self, m: str) -> tuple[int, ...]:
        """Shape of one pixel sample of modality ``m``: ``(T, C)`` (temporal) or ``(C,)``."""
        c = self.bundle["model_kwargs"]["in_channels"][m]
        t = self.bundle["model_kwargs"]["n_steps"]
        return (t, c) if self.bundle["temporal"][m] else (c,)

    # ------------------------------------------------------------------ tiles
    def predict_tile(self, stacks: dict[str, Path], tile: Window, size: int = 32, overlap: float = 0.5,
                     progress: bool = False) -> TileResult:
        """Predict one tile window from the stack files.

        Classification models run on pixel time series (:func:`cropmap.predict.pixels.predict_pixels`),
        segmentation models on overlapping chips (:func:`cropmap.predict.chips.predict_chips`,
        ``size`` px, ``overlap`` of a chip).
        """
        stacks = {m: Path(p) for m, p in stacks.items() if m in self.modalities}
        if self.task == "segmentation":
            return predict_chips(self, stacks, tile, size, overlap, progress)
        return predict_pixels(self, stacks, tile, progress)
