"""Stage ``predict``: run a trained model over one tile of a region.

Per pixel, the modalities present are detected from the stacks (a modality with too few valid
months counts as missing) and passed to the model as its mask, so one tile can use S2+S1+DEM on
one side and DEM+weather on the other. Pixels with no modality are nodata, never a guess.

Classification models run on pixel time series. Segmentation models run on sliding windows on a
lattice anchored at the grid origin (not the tile), blended with a Hann window whose shifted
copies sum to one: a tile's pixels get exactly the windows they would get if the whole region
were predicted at once, so tiled maps have no seams.

How a tile is processed (memory bounded by the read unit, not by the tile or the region):

* The tile is cut into *units* aligned to the stacks' internal blocks (256 px for the stacks of
  :meth:`cropmap.grid.Grid.profile`), so every compressed block is read with GDAL's aligned fast
  path and decoded once (segmentation: a unit also reads the halo its windows need, from a small
  shared cache of decoded blocks, so a block is decoded about twice instead of once per window).
* Reader threads read and decode units ahead of the model and cut them into ready batches
  (pinned memory on CUDA); the model thread only transfers (non-blocking), runs the model
  (``inference_mode``, bf16 autocast on CUDA, :func:`optimize_for_inference` rewrites) and
  scatters the probabilities.
* On CPU, ``threads`` (or ``CROPMAP_THREADS``, else torch's default, which follows
  ``OMP_NUM_THREADS``) model threads each run whole batches with one intra-op thread: no
  OpenMP barriers between small kernels (which cost up to 3x on a shared 2-core machine), and
  pixel batches run in chunks of :data:`CPU_CHUNK` pixels so activations stay in cache.

Tile files: uint8 bands ``class`` (255 nodata), ``confidence`` (0-100), ``modalities``
(bitmask), then optionally one band per class with its probability in percent.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import os
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval
from tqdm import tqdm

from cropmap.availability import bitmask, presence_stack
from cropmap.grid import Grid, tile_window
from cropmap.io import atomic_path
from cropmap.labels import NODATA
from cropmap.models.encoders import TempCNN, UNetEncoder
from cropmap.train import load_bundle

log = logging.getLogger(__name__)

#: Side (pixels) of a read unit when the stacks' blocks are smaller or striped.
UNIT = 256

#: Pixels per forward pass on CPU (a batch of ``batch_size`` runs in chunks of this size).
CPU_CHUNK = 2048

Batch = dict[str, torch.Tensor]


def read_window(path: Path, window: Window) -> np.ndarray:
    """Read a (possibly out-of-bounds) window, NaN outside the raster."""
    with rasterio.open(path) as src:
        return src.read(window=window, boundless=True, fill_value=np.nan, out_dtype="float32")


def hann(size: int) -> np.ndarray:
    """2-D Hann weights whose half-shifted copies sum to one."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return np.outer(w, w).astype(np.float32)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorm into the Conv/Linear just before it in every ``nn.Sequential``.

    Inference-only rewrite (in place): the folded layer computes the same function up to float
    rounding, with one elementwise pass less per layer. Returns ``module``.
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        items = list(module._modules.items())
        for (name_a, a), (name_b, b) in itertools.pairwise(items):
            if not isinstance(b, nn.modules.batchnorm._BatchNorm) or not b.track_running_stats or b.running_mean is None:
                continue
            if isinstance(a, nn.Conv1d | nn.Conv2d) and isinstance(b, nn.BatchNorm1d | nn.BatchNorm2d):
                module._modules[name_a] = fuse_conv_bn_eval(a, b)
            elif isinstance(a, nn.Linear) and isinstance(b, nn.BatchNorm1d):
                module._modules[name_a] = fuse_linear_bn_eval(a, b)
            else:
                continue
            module._modules[name_b] = nn.Identity()
    return module


class TempCNNInference(nn.Module):
    """A BatchNorm-folded :class:`~cropmap.models.encoders.TempCNN` fused for inference (same function).

    The ``Conv1d`` layers run as channels-last ``Conv2d`` (oneDNN's and cuDNN's fast kernels: a
    ``[B, T, C]`` series seen as ``[B, C, 1, T]`` is already channels-last, so no copy is needed),
    the ReLUs run in place, and the first dense layer's columns are permuted to the time-major
    order those convolutions leave in memory, so the flatten is a view instead of a copy. Dropout
    and the folded BatchNorm's ``Identity`` are gone.
    """

    def __init__(self, enc: TempCNN) -> None:
        super().__init__()
        layers = [m for m in [*enc.conv, *enc.dense] if not isinstance(m, nn.Identity | nn.Dropout)]
        kinds = [type(m).__name__ for m in layers]
        convs = [m for m in layers if isinstance(m, nn.Conv1d)]
        lins = [m for m in layers if isinstance(m, nn.Linear)]
        if kinds != ["Conv1d", "ReLU"] * len(convs) + ["Flatten", "Linear", "ReLU", "Linear"] or not all(
            c.padding_mode == "zeros" and c.stride == (1,) and c.dilation == (1,) and c.groups == 1
            and isinstance(c.padding, tuple) and c.bias is not None for c in convs
        ):
            raise ValueError(f"not a BatchNorm-folded TempCNN: {kinds}")
        self.pads = [(0, int(c.padding[0])) for c in convs]

        def frozen(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone(), requires_grad=False)

        self.convs = nn.ParameterList([frozen(c.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last))
                                       for c in convs])
        self.conv_bias = nn.ParameterList([frozen(c.bias) for c in convs if c.bias is not None])
        first, last = lins
        w = first.weight.view(first.out_features, convs[-1].out_channels, -1)  # Flatten's (channel, time) order
        self.w1 = frozen(w.transpose(1, 2).reshape(first.out_features, -1).t().contiguous())  # (time, channel)
        self.b1 = frozen(first.bias)
        self.w2 = frozen(last.weight.t().contiguous())
        self.b2 = frozen(last.bias)
        self.out_dim = last.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, C]`` -> ``[B, hidden]``."""
        y = x.transpose(1, 2).unsqueeze(2)
        for w, b, pad in zip(self.convs, self.conv_bias, self.pads, strict=True):
            y = F.conv2d(y.contiguous(memory_format=torch.channels_last), w, b, 1, pad).relu_()
        flat = y.permute(0, 2, 3, 1).reshape(len(x), -1)  # [B, 1, T, hidden]: a view when channels-last
        return torch.addmm(self.b2, torch.addmm(self.b1, flat, self.w1).relu_(), self.w2)


def _channels_last(model: nn.Module) -> nn.Module:
    """Fast layouts where they are known to be safe: fused TempCNN encoders and channels-last U-Nets."""
    def convert(module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, TempCNN):
                try:
                    module._modules[name] = TempCNNInference(child)
                except ValueError as exc:
                    log.info("TempCNN fusion skipped: %s", exc)
            elif isinstance(child, UNetEncoder):
                child.to(memory_format=torch.channels_last)
            else:
                convert(child)

    convert(model)
    return model


def optimize_for_inference(model: nn.Module, example: Batch | None = None) -> nn.Module:
    """Inference rewrites that keep the function (up to float rounding).

    BatchNorm is folded into the layer before it (:func:`fold_batchnorm`, in place). With an
    ``example`` batch, TempCNN encoders are also fused (:class:`TempCNNInference`) and U-Net
    encoders put in channels-last layout, kept only if the
    model still gives the same logits on the example (a model that reshapes feature maps with
    ``view`` would not): otherwise the folded model is returned as is.
    """
    fold_batchnorm(model.eval())
    if example is None:
        return model
    try:
        with torch.inference_mode():
            ref = model(example)["logits"].float()
            fast = _channels_last(copy.deepcopy(model))
            same = torch.allclose(fast(example)["logits"].float(), ref, atol=1e-3, rtol=1e-3)
    except Exception as exc:  # any failure: keep the plain layout
        log.info("channels-last rewrite skipped: %s", exc)
        return model
    if not same:
        log.info("channels-last rewrite skipped: outputs differ on the example batch")
        return model
    return fast


@dataclass
class TileResult:
    """Per-pixel outputs of a tile."""

    cls: np.ndarray  # uint8 [h, w]
    confidence: np.ndarray  # uint8 [h, w]
    bits: np.ndarray  # uint8 [h, w]
    proba: np.ndarray  # float32 [K, h, w]


@dataclass(frozen=True)
class _StackInfo:
    path: Path
    count: int
    width: int
    height: int
    block: tuple[int, int]


class _CellCache:
    """Decoded unit cells shared by the reader threads of one tile (small LRU, decode once per key)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[Any, Future] = OrderedDict()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self._lock:
            fut = self._items.get(key)
            owner = fut is None
            if fut is None:
                fut = Future()
                self._items[key] = fut
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(key)
        if owner:
            try:
                fut.set_result(load())
            except BaseException as exc:
                fut.set_exception(exc)
                with self._lock:
                    self._items.pop(key, None)
                raise
        return fut.result()


class _Stop(Exception):
    """The consumer went away: the producer stops."""


_END = object()


class _Error:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def counted(items: Iterable[tuple[Any, Any]], bar: Any) -> Iterator[tuple[Any, Any]]:
    """The ``(meta, batch)`` items of a producer; a ``(meta, None)`` marks a finished block and
    advances the progress ``bar`` instead of being yielded."""
    for meta, batch in items:
        if batch is None:
            bar.update()
            continue
        yield meta, batch


def prefetch(units: Iterable[Any], produce: Callable[[Any, Callable[[Any], None]], None], readers: int,
             depth: int = 2) -> Iterator[Any]:
    """Items that ``produce(unit, put)`` puts, unit after unit, produced ahead in reader threads.

    Up to ``readers + 1`` units are in flight, each holding at most ``depth`` produced items
    that the consumer has not taken yet, so memory is bounded whatever the number of units.
    Exceptions in a producer are raised in the consumer.
    """
    stop = threading.Event()
    it = iter(units)
    pending: deque[queue.Queue] = deque()

    def job(unit: Any, q: queue.Queue) -> None:
        def put(item: Any) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            raise _Stop

        try:
            produce(unit, put)
            put(_END)
        except _Stop:
            pass
        except BaseException as exc:  # handed to the consumer
            with contextlib.suppress(_Stop):
                put(_Error(exc))

    ex = ThreadPoolExecutor(max(1, readers), thread_name_prefix="cropmap-read")

    def submit() -> None:
        unit = next(it, _END)
        if unit is not _END:
            q: queue.Queue = queue.Queue(maxsize=max(1, depth))
            ex.submit(job, unit, q)
            pending.append(q)

    try:
        for _ in range(max(1, readers) + 1):
            submit()
        while pending:
            q = pending.popleft()
            while (item := q.get()) is not _END:
                if isinstance(item, _Error):
                    raise item.exc
                yield item
            submit()
    finally:
        stop.set()
        ex.shutdown(wait=True, cancel_futures=True)


class Predictor:
    """A loaded model plus everything needed to apply it to stack windows.

    Args:
        ckpt: ``model.ckpt`` bundle.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        batch_size: pixels per forward pass (segmentation: ``batch_size // chip**2`` chips, at least 1).
        threads: CPU model threads, one intra-op thread each (default ``CROPMAP_THREADS`` or
            torch's thread count).
        readers: reader threads (default 1 on CPU; on CUDA every core but one, at most 32).
    """

    def __init__(self, ckpt: Path, device: str = "auto", batch_size: int = 8192, threads: int | None = None,
                 readers: int | None = None) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.threads = max(1, threads or int(os.environ.get("CROPMAP_THREADS", 0)) or torch.get_num_threads())
        self.model, self.norm, self.bundle = load_bundle(ckpt, self.device)
        self.modalities: list[str] = self.bundle["modalities"]
        self.task: str = self.bundle["task"]
        self.min_valid_fraction: float = self.bundle["min_valid_fraction"]
        self.n_classes: int = self.bundle["model_kwargs"]["n_classes"]
        self.batch_size = max(1, int(batch_size))
        self.cuda = self.device.type == "cuda"
        self.autocast = self.cuda
        self.pin = self.cuda
        if self.cuda:
            torch.backends.cudnn.benchmark = True
        intra = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny check: no thread pool spin-up
        try:
            self.model = optimize_for_inference(self.model, self._example())
        finally:
            torch.set_num_threads(intra)
        cpus = os.cpu_count() or 2
        # decoding float32 deflate stacks costs ~0.3 Mpx/s per core: on CUDA every spare core reads
        self.readers = max(1, readers if readers is not None else (min(32, cpus - 1) if self.cuda else 1))

    # ------------------------------------------------------------------ model
    @torch.inference_mode()
    def _proba(self, batch: Batch) -> torch.Tensor:
        """Class probabilities ``[N, K(, H, W)]`` (float32, on the device) of one batch."""
        n = len(batch["mask"])
        if not self.cuda and batch["mask"].dim() == 2 and n > CPU_CHUNK:
            return torch.cat([self._proba({k: v[i : i + CPU_CHUNK] for k, v in batch.items()})
                              for i in range(0, n, CPU_CHUNK)])
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(self.norm(batch))
        return torch.softmax(out["logits"].float(), dim=1)

    def _run(self, items: Iterable[tuple[Any, Batch]], scatter: Callable[[Any, np.ndarray], None]) -> None:
        """Run the model over ``(meta, batch)`` items; ``scatter(meta, proba)`` gets numpy probabilities.

        CPU: :attr:`threads` model threads with one intra-op thread each. CUDA: one thread, the
        copy back of batch k overlapping the forward of batch k+1.
        """
        if self.cuda:
            self._run_cuda(items, scatter)
            return
        intra = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.threads == 1:
                with torch.inference_mode():
                    for meta, batch in items:
                        scatter(meta, self._proba(batch).numpy())
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
                            p = self._proba(nxt[1]).numpy()
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
    def _run_cuda(self, items: Iterable[tuple[Any, Batch]], scatter: Callable[[Any, np.ndarray], None]) -> None:
        pending: tuple[Any, torch.Tensor, torch.cuda.Event | None] | None = None
        for meta, batch in items:
            p = self._proba(batch)
            ev = None
            if self.cuda:
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
    def _settle(pending: tuple[Any, torch.Tensor, Any], scatter: Callable[[Any, np.ndarray], None]) -> None:
        meta, p, ev = pending
        if ev is not None:
            ev.synchronize()
        scatter(meta, p.numpy())

    def _example(self, n: int = 2, size: int = 16) -> Batch:
        """A small random batch (all modalities available) to check inference rewrites on."""
        gen = torch.Generator().manual_seed(0)
        batch: Batch = {}
        for m in self.modalities:
            shape = self._shape(m)
            if self.task == "segmentation":
                shape = (int(np.prod(shape)), size, size)
            batch[m] = torch.randn((n, *shape), generator=gen).to(self.device)
        spatial = (size, size) if self.task == "segmentation" else ()
        batch["mask"] = torch.ones((n, len(self.modalities), *spatial), dtype=torch.bool, device=self.device)
        return batch

    def _tensor(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _shape(self, m: str) -> tuple[int, ...]:
        c = self.bundle["model_kwargs"]["in_channels"][m]
        t = self.bundle["model_kwargs"]["n_steps"]
        return (t, c) if self.bundle["temporal"][m] else (c,)

    # ------------------------------------------------------------------ pixels (classification)
    def _pixel_batches(self, arrays: dict[str, np.ndarray], pres: np.ndarray) -> Iterator[tuple[np.ndarray, Batch]]:
        """``(flat pixel indices, batch)`` for every pixel of ``arrays`` with at least one modality.

        Each batch is gathered straight into a contiguous ``[n, T, C]`` (pinned on CUDA) by the
        calling (reader) thread. Modalities absent from the files are left out of the batch (the
        model treats them as unavailable, exactly as a NaN-filled, masked input).
        """
        h, w = pres.shape[1:]
        pres_flat = pres.reshape(len(self.modalities), h * w)
        idx = np.flatnonzero(pres_flat.any(axis=0))
        full = len(idx) == h * w
        flat = {m: a.reshape(a.shape[0], h * w) for m, a in arrays.items() if m in self.modalities}
        for start in range(0, len(idx), self.batch_size):
            sel = idx[start : start + self.batch_size]
            n = len(sel)
            batch: Batch = {}
            for m, a in flat.items():
                t = self._tensor((n, a.shape[0]))
                np.copyto(t.numpy(), (a[:, start : start + n] if full else np.take(a, sel, axis=1)).T)
                batch[m] = t.view(n, *self._shape(m))
            mask = self._tensor((n, len(self.modalities)), torch.bool)
            np.copyto(mask.numpy(), pres_flat[:, sel].T)
            batch["mask"] = mask
            yield sel, batch

    def predict_pixels(self, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> TileResult:
        """Classify every pixel of a window from ``{m: [bands, h, w]}`` arrays (in memory)."""
        pres = presence_stack(arrays, self.modalities, self.min_valid_fraction, shape)
        proba = np.zeros((self.n_classes, shape[0] * shape[1]), np.float32)

        def scatter(sel: np.ndarray, p: np.ndarray) -> None:
            proba[:, sel] = p.T

        self._run(self._pixel_batches(arrays, pres), scatter)
        return self._finish(proba.reshape(self.n_classes, *shape), pres)

    def _finish(self, proba: np.ndarray, pres: np.ndarray) -> TileResult:
        """Class, confidence and bitmask from probabilities; nodata where ``pres`` has no modality."""
        any_mod = np.asarray(pres.any(axis=0))
        cls = proba.argmax(axis=0).astype(np.uint8)
        conf = np.round(proba.max(axis=0) * 100).astype(np.uint8)
        cls[~any_mod] = NODATA
        conf[~any_mod] = 0
        proba[:, ~any_mod] = 0
        return TileResult(cls, conf, bitmask(pres, self.modalities), proba)

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _stack_info(stacks: dict[str, Path]) -> dict[str, _StackInfo]:
        info = {}
        for m, p in stacks.items():
            with rasterio.open(p) as src:
                info[m] = _StackInfo(Path(p), src.count, src.width, src.height, tuple(src.block_shapes[0]))  # type: ignore[arg-type]
        return info

    @staticmethod
    def _unit_shape(info: dict[str, _StackInfo]) -> tuple[int, int]:
        """Read unit: a whole number of the stacks' blocks, about :data:`UNIT` px (full rows if striped)."""
        if not info:
            return UNIT, UNIT
        first = next(iter(info.values()))
        bh, bw = first.block
        uh = bh * max(1, round(UNIT / bh))
        uw = first.width if bw >= first.width else bw * max(1, round(UNIT / bw))
        return uh, uw

    @staticmethod
    def _cells(win: Window, unit: tuple[int, int]) -> list[Window]:
        """Unit-lattice cells (anchored at the grid origin) intersected with ``win``, row-major."""
        uh, uw = unit
        r0, c0 = int(win.row_off), int(win.col_off)
        r1, c1 = r0 + int(win.height), c0 + int(win.width)
        out = []
        for r in range(r0 - r0 % uh, r1, uh):
            for c in range(c0 - c0 % uw, c1, uw):
                rr, cc = max(r, r0), max(c, c0)
                out.append(Window(cc, rr, min(c + uw, c1) - cc, min(r + uh, r1) - rr))
        return out

    @staticmethod
    def _read(src: Any, info: _StackInfo, win: Window) -> np.ndarray:
        """Read ``win`` (any bounds) as float32, NaN outside the raster, with one in-bounds read."""
        r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        rr0, cc0 = max(r0, 0), max(c0, 0)
        rr1, cc1 = min(r0 + h, info.height), min(c0 + w, info.width)
        if rr0 == r0 and cc0 == c0 and rr1 == r0 + h and cc1 == c0 + w:
            return src.read(window=win, out_dtype="float32")
        out = np.full((info.count, h, w), np.nan, np.float32)
        if rr1 > rr0 and cc1 > cc0:
            out[:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = src.read(
                window=Window(cc0, rr0, cc1 - cc0, rr1 - rr0), out_dtype="float32")
        return out

    def _read_unit(self, info: dict[str, _StackInfo], win: Window) -> dict[str, np.ndarray]:
        """Arrays of a unit window (files opened per unit: GDAL's block cache never outgrows it)."""
        out = {}
        for m, si in info.items():
            with rasterio.open(si.path) as src:
                out[m] = self._read(src, si, win)
        return out

    def _read_region(self, info: dict[str, _StackInfo], win: Window, unit: tuple[int, int],
                     cache: _CellCache) -> dict[str, np.ndarray]:
        """Arrays of ``win`` (any bounds, NaN outside) assembled from whole, cached unit cells."""
        uh, uw = unit
        r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        arrays = {m: np.full((si.count, h, w), np.nan, np.float32) for m, si in info.items()}
        first = next(iter(info.values()))
        for r in range(max(r0, 0) - max(r0, 0) % uh, min(r0 + h, first.height), uh):
            for c in range(max(c0, 0) - max(c0, 0) % uw, min(c0 + w, first.width), uw):
                cell = Window(c, r, min(uw, first.width - c), min(uh, first.height - r))
                cell_arrays = cache.get((r, c), lambda cell=cell: self._read_unit(info, cell))  # type: ignore[misc]
                rr0, rr1 = max(r, r0), min(r + int(cell.height), r0 + h)
                cc0, cc1 = max(c, c0), min(c + int(cell.width), c0 + w)
                for m, a in cell_arrays.items():
                    arrays[m][:, rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = a[:, rr0 - r : rr1 - r, cc0 - c : cc1 - c]
        return arrays

    # ------------------------------------------------------------------ tiles
    def windows(self, tile: Window, size: int, stride: int) -> Iterator[Window]:
        """Lattice windows (anchored at the grid origin) that intersect ``tile``."""
        def starts(lo: int, n: int) -> range:
            first = math.floor((lo - size) / stride) + 1
            last = math.floor((lo + n - 1) / stride)
            return range(first * stride, last * stride + 1, stride)

        for r in starts(int(tile.row_off), int(tile.height)):
            for c in starts(int(tile.col_off), int(tile.width)):
                yield Window(c, r, size, size)

    def _progress(self, total: int, enabled: bool, desc: str) -> tqdm:
        disable = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true")
        return tqdm(total=total, desc=desc, unit="block", disable=disable, leave=False)

    def predict_classification(self, stacks: dict[str, Path], tile: Window, progress: bool = False) -> TileResult:
        """Per-pixel classification of ``tile``, streamed block by block."""
        h, w = int(tile.height), int(tile.width)
        m_n = len(self.modalities)
        info = self._stack_info(stacks)
        proba = np.zeros((self.n_classes, h * w), np.float32)
        pres_tile = np.zeros((m_n, h, w), bool)
        cells = self._cells(tile, self._unit_shape(info))

        def produce(cell: Window, put: Callable[[Any], None]) -> None:
            arrays = self._read_unit(info, cell)
            ch, cw = int(cell.height), int(cell.width)
            pres = presence_stack(arrays, self.modalities, self.min_valid_fraction, (ch, cw))
            r0, c0 = int(cell.row_off - tile.row_off), int(cell.col_off - tile.col_off)
            pres_tile[:, r0 : r0 + ch, c0 : c0 + cw] = pres
            for sel, batch in self._pixel_batches(arrays, pres):
                put(((r0 + sel // cw) * w + c0 + sel % cw, batch))
            put((None, None))  # end of block (progress)

        with self._progress(len(cells), progress, "predict") as bar:
            def scatter(flat_idx: np.ndarray, p: np.ndarray) -> None:
                proba[:, flat_idx] = p.T

            self._run(counted(prefetch(cells, produce, self.readers), bar), scatter)
        return self._finish(proba.reshape(self.n_classes, h, w), pres_tile)

    def predict_segmentation(self, stacks: dict[str, Path], tile: Window, size: int, overlap: float,
                             progress: bool = False) -> TileResult:
        """Sliding-window segmentation of ``tile`` with Hann blending (see module docstring).

        Each lattice window is computed once, in the read unit that holds its (tile-clipped)
        top-left corner; the unit reads the halo its windows need from cached decoded cells.
        """
        stride = max(1, round(size * (1 - overlap)))
        if overlap > 0 and size % 2 == 0 and stride != size // 2:
            log.warning("overlap %.2f: Hann weights sum to one only at 50 %% overlap; blending stays seamless but uneven", overlap)
        h, w = int(tile.height), int(tile.width)
        tr0, tc0 = int(tile.row_off), int(tile.col_off)
        info = self._stack_info(stacks)
        unit = self._unit_shape(info)
        uh, uw = unit
        acc = np.zeros((self.n_classes, h, w), np.float32)
        wsum = np.zeros((h, w), np.float32)
        pres_tile = np.zeros((len(self.modalities), h, w), bool)
        weight = hann(size) if overlap > 0 else np.ones((size, size), np.float32)
        cells = self._cells(tile, unit)
        assigned: dict[tuple[int, int], list[Window]] = {(int(c.row_off) // uh, int(c.col_off) // uw): [] for c in cells}
        for win in self.windows(tile, size, stride):
            r, c = max(int(win.row_off), tr0), max(int(win.col_off), tc0)
            assigned[(r // uh, c // uw)].append(win)
        group = max(1, self.batch_size // (size * size))
        cache = _CellCache(capacity=self.readers + 2)
        any_stack = bool(info)

        def produce(cell: Window, put: Callable[[Any], None]) -> None:
            wins = assigned[(int(cell.row_off) // uh, int(cell.col_off) // uw)]
            rows = [int(cell.row_off)] + [int(v.row_off) for v in wins]
            cols = [int(cell.col_off)] + [int(v.col_off) for v in wins]
            r_end = max([int(cell.row_off + cell.height)] + [int(v.row_off) + size for v in wins])
            c_end = max([int(cell.col_off + cell.width)] + [int(v.col_off) + size for v in wins])
            region = Window(min(cols), min(rows), c_end - min(cols), r_end - min(rows))
            rr, rc = int(region.row_off), int(region.col_off)
            arrays = self._read_region(info, region, unit, cache) if any_stack else {}
            pres = presence_stack(arrays, self.modalities, self.min_valid_fraction, (int(region.height), int(region.width)))
            ch, cw = int(cell.height), int(cell.width)
            cr, cc = int(cell.row_off) - rr, int(cell.col_off) - rc
            tr, tc = int(cell.row_off) - tr0, int(cell.col_off) - tc0
            pres_tile[:, tr : tr + ch, tc : tc + cw] = pres[:, cr : cr + ch, cc : cc + cw]
            if any_stack:
                for start in range(0, len(wins), group):
                    chunk = wins[start : start + group]
                    offs = [(int(v.row_off) - rr, int(v.col_off) - rc) for v in chunk]
                    batch: Batch = {}
                    for m, a in arrays.items():
                        if m not in self.modalities:
                            continue
                        t = self._tensor((len(chunk), a.shape[0], size, size))
                        np.stack([a[:, r : r + size, c : c + size] for r, c in offs], out=t.numpy())
                        batch[m] = t
                    mask = self._tensor((len(chunk), len(self.modalities), size, size), torch.bool)
                    np.stack([pres[:, r : r + size, c : c + size] for r, c in offs], out=mask.numpy())
                    batch["mask"] = mask
                    put((chunk, batch))
            put((None, None))

        def scatter(chunk: list[Window], probs: np.ndarray) -> None:
            for p, win in zip(probs, chunk, strict=True):
                # intersection of the window with the tile, in tile and window coordinates
                r0, c0 = max(int(win.row_off), tr0), max(int(win.col_off), tc0)
                r1, c1 = min(int(win.row_off) + size, tr0 + h), min(int(win.col_off) + size, tc0 + w)
                tr, tc = r0 - tr0, c0 - tc0
                wr, wc = r0 - int(win.row_off), c0 - int(win.col_off)
                ww = weight[wr : wr + r1 - r0, wc : wc + c1 - c0]
                acc[:, tr : tr + r1 - r0, tc : tc + c1 - c0] += p[:, wr : wr + r1 - r0, wc : wc + c1 - c0] * ww
                wsum[tr : tr + r1 - r0, tc : tc + c1 - c0] += ww

        with self._progress(len(cells), progress, "predict") as bar:
            self._run(counted(prefetch(cells, produce, self.readers), bar), scatter)
        proba = acc / np.maximum(wsum, 1e-12)
        return self._finish(proba, pres_tile)

    def predict_tile(self, stacks: dict[str, Path], tile: Window, size: int = 32, overlap: float = 0.5,
                     progress: bool = False) -> TileResult:
        """Predict one tile window from the stack files."""
        stacks = {m: Path(p) for m, p in stacks.items() if m in self.modalities}
        if self.task == "segmentation":
            return self.predict_segmentation(stacks, tile, size, overlap, progress)
        return self.predict_classification(stacks, tile, progress)


def write_tile(res: TileResult, out: Path, grid: Grid, window: Window, probabilities: bool) -> None:
    """Write a tile GeoTIFF (atomic)."""
    bands = [res.cls, res.confidence, res.bits]
    names = ["class", "confidence", "modalities"]
    if probabilities:
        bands += list(np.round(res.proba * 100).astype(np.uint8))
        names += [f"proba_{k}" for k in range(res.proba.shape[0])]
    prof = {
        "driver": "GTiff", "width": int(window.width), "height": int(window.height), "count": len(bands),
        "dtype": "uint8", "crs": grid.crs, "transform": rasterio.windows.transform(window, grid.transform),
        "compress": "deflate", "nodata": NODATA,
    }
    with atomic_path(out) as tmp, rasterio.open(tmp, "w", **prof) as dst:
        dst.write(np.stack(bands))
        dst.descriptions = tuple(names)


def run(ckpt: Path, stack_dir: Path, grid: Grid, name: str, out: Path, *, tile_size: int, modalities: Sequence[str],
        chip_size: int = 32, overlap: float = 0.5, batch_size: int = 8192, device: str = "auto",
        probabilities: bool = False, predictor: Predictor | None = None, threads: int | None = None) -> TileResult:
    """Predict tile ``name`` and write it to ``out`` (``predictor``: reuse a loaded model)."""
    predictor = predictor or Predictor(ckpt, device, batch_size, threads=threads)
    stacks = {m: stack_dir / f"{m}.tif" for m in modalities if (stack_dir / f"{m}.tif").exists()}
    window = tile_window(grid, name, tile_size)
    res = predictor.predict_tile(stacks, window, chip_size, overlap, progress=True)
    write_tile(res, out, grid, window, probabilities)
    return res

