"""Stage ``predict``: run a trained model over one tile of a region.

Per pixel, the modalities present are detected from the stacks (a modality with too few valid
months counts as missing) and passed to the model as its mask, so one tile can use S2+S1+DEM on
one side and DEM+weather on the other. Pixels with no modality are nodata, never a guess.

Memory is bounded by the read unit, not by the tile or the region: the tile is cut into units
aligned to the stacks' internal blocks (:mod:`~cropmap.predict.reading`); reader threads read
and decode units ahead of the model and cut them into ready batches
(:mod:`~cropmap.predict.prefetch`); the model thread only transfers, runs the model
(``inference_mode``, bf16 autocast on CUDA, the :mod:`~cropmap.predict.rewrites`) and scatters
the probabilities.

Modules:

* :mod:`~cropmap.predict.bundle`: the ``model.ckpt`` format (:func:`save_bundle`,
  :func:`load_bundle`; no Lightning needed to load a model).
* :mod:`~cropmap.predict.predictor`: :class:`Predictor`, a loaded model with its device, thread
  and batching policy; :meth:`Predictor.proba` is the model on one batch.
* :mod:`~cropmap.predict.pixels` (classification: pixel time series) and
  :mod:`~cropmap.predict.chips` (segmentation: overlapping chips on a lattice anchored at the
  grid origin, Hann-blended, so tiled maps have no seams).
* :mod:`~cropmap.predict.tile`: :class:`TileResult` and the tile GeoTIFF; :mod:`~cropmap.predict.stage`:
  :func:`run`, the stage.
"""

from cropmap.predict.bundle import load_bundle, save_bundle
from cropmap.predict.predictor import Predictor
from cropmap.predict.stage import run
from cropmap.predict.tile import TileResult, write_tile

__all__ = ["Predictor", "TileResult", "load_bundle", "run", "save_bundle", "write_tile"]
