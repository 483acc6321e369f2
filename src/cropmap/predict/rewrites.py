"""Inference rewrites that keep a model's function: folded BatchNorm, fused TempCNN, channels-last.

:func:`optimize_for_inference` is what :class:`cropmap.predict.Predictor` applies to a loaded
model; each rewrite is checked against the plain model on an example batch and dropped if the
logits differ.
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from cropmap.models.encoders import TempCNN, UNetEncoder

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


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


def fast_layouts(model: nn.Module) -> nn.Module:
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
            fast = fast_layouts(copy.deepcopy(model))
            same = torch.allclose(fast(example)["logits"].float(), ref, atol=1e-3, rtol=1e-3)
    except Exception as exc:  # any failure: keep the plain layout
        log.info("channels-last rewrite skipped: %s", exc)
        return model
    if not same:
        log.info("channels-last rewrite skipped: outputs differ on the example batch")
        return model
    return fast
