"""Domain exceptions. Each subclasses a built-in and its message says what to do."""

from __future__ import annotations


class CropmapError(Exception):
    """Base class of every cropmap error."""


class ConfigError(CropmapError, ValueError):
    """A config value is invalid; the message names the key and the fix."""


class GridMismatchError(CropmapError, ValueError):
    """A raster is not on its region's grid; the message names the file."""


class CorruptRasterError(CropmapError, OSError):
    """A raster cannot be read completely; the message names the file and how to rebuild it."""


class SourceError(CropmapError, RuntimeError):
    """A data source (Earth Engine, STAC) failed after its retries."""


class LabelError(CropmapError, ValueError):
    """A label file has a problem (unknown class code, missing column)."""


class UnknownNameError(CropmapError, KeyError):
    """A name (method, encoder, modality) is not one of the valid choices; the message lists them."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class InputDataError(CropmapError, ValueError):
    """A user's data file (sample table, raster cube) cannot be used as given.

    The one-line message names the file, what was found versus expected, and the fix.
    """


class MissingParamError(ConfigError, KeyError):
    """``cropmap <stage> --params`` lacks a key or is not a JSON object (a stage run by hand)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


def brief(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type when empty):
    the part of a library's error that goes into a one-line cropmap error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."
