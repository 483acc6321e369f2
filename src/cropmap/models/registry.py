"""The method registry: every multi-modal method registers its class with :func:`register_method`.

Everything that lists methods derives from it: :data:`cropmap.models.METHODS`,
:func:`methods_for`, the ``method`` enum and the ``compare.methods`` default of the config schema
(:func:`cropmap.config.load_schema`), the ``cropmap --help`` epilog and the table of
``docs/methods.md`` (:func:`methods_table`; a test checks the document holds it).

Add a method by decorating its :class:`~cropmap.models.base.CoLearningModel` subclass in a
module that :mod:`cropmap.models` imports::

    @register_method("mymethod", tasks=("segmentation",))
    class MyMethod(CoLearningModel): ...

The registry keeps registration order, which is the order of the tables (``cropmap.models``
imports the method modules in a fixed order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from cropmap.errors import UnknownNameError

if TYPE_CHECKING:
    from cropmap.models.base import CoLearningModel

Task = Literal["classification", "segmentation"]

#: The tasks a method supports unless it says otherwise.
TASKS: tuple[Task, ...] = ("classification", "segmentation")

_REGISTRY: dict[str, type[CoLearningModel]] = {}

M = TypeVar("M", bound="type[CoLearningModel]")


def register_method(name: str, *, tasks: Sequence[Task] = TASKS) -> Callable[[M], M]:
    """Class decorator: register a method under ``name`` for ``tasks``.

    Sets the class attributes ``method`` (the name) and ``tasks``.

    Raises:
        ValueError: the name is taken or a task is unknown.
    """
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"method {name!r}: tasks {list(tasks)} must be a non-empty subset of {TASKS}")

    def register(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.method = name
        cls.tasks = tuple(tasks)
        _REGISTRY[name] = cls
        return cls

    return register


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def methods_for(task: str, gradient: bool | None = None) -> tuple[str, ...]:
    """Methods that support ``task`` (e.g. ``imt`` and ``gemmnet`` are segmentation-only, the tree
    references ``trees_dedicated`` and ``trees_nan`` classification-only).

    Args:
        task: ``"classification"`` or ``"segmentation"``.
        gradient: True: only the methods trained by gradient descent (the neural ones); False:
            only the gradient-free ones (a class attribute ``gradient_free``); None: both.
    """
    return tuple(name for name, cls in _REGISTRY.items()
                 if task in cls.tasks and (gradient is None or gradient != bool(getattr(cls, "gradient_free", False))))


def method_class(name: str) -> type[CoLearningModel]:
    """The class registered as ``name`` (case and surrounding spaces ignored).

    Raises:
        UnknownNameError: naming the valid methods.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise UnknownNameError(f"unknown method {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def summary(name: str) -> str:
    """First paragraph of the method class's docstring, on one line."""
    doc = (method_class(name).__doc__ or "").strip()
    return " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())


def methods_table() -> str:
    """The Markdown table of methods that ``docs/methods.md`` carries (name, tasks, class, summary)."""
    rows = ["| `model.method` | tasks | class | what it is |", "| --- | --- | --- | --- |"]
    for name, cls in _REGISTRY.items():
        rows.append(f"| `{name}` | {', '.join(cls.tasks)} | `{cls.__module__}.{cls.__name__}` | {summary(name)} |")
    return "\n".join(rows) + "\n"


def methods_help() -> str:
    """The methods paragraph of ``cropmap --help``."""
    both = [m for m in _REGISTRY if set(_REGISTRY[m].tasks) == set(TASKS)]
    lines = ["methods (model.method; details in docs/methods.md):"]
    lines.append(f"  every task: {', '.join(both)}")
    for task in TASKS:
        only = [m for m in methods_for(task) if m not in both]
        if only:
            lines.append(f"  {task} only: {', '.join(only)}")
    return "\n".join(lines)
