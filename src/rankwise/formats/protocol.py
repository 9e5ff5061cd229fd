"""The one protocol every factorization format speaks, and the registry that finds a format by its name.

Every format container (:class:`~rankwise.formats.SVD`, ``Tucker``, ``CP``, ``TT``, ``TTMatrix``, ``HT``,
``Kronecker``) has ``name`` (a class attribute), ``shape``, ``ranks``, ``num_params`` and ``to_dense()``;
formats whose truncation is well defined (nested bases: SVD, Tucker, TT, TT-matrix, Kronecker) also
have ``truncate(rank)``. Each format file registers its container in :data:`FORMATS` with the function
that decomposes a dense tensor into it, so a layer, the allocator or a checkpoint looks a format up by
name: adding a format is adding one file.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from ..registry import Registry
from ._ops import Tensor

FORMATS = Registry("factorization format")


@runtime_checkable
class Factorization(Protocol):
    """What every format container provides (a structural type: the containers do not inherit it)."""

    name: ClassVar[str]

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ranks(self) -> tuple[int, ...]: ...

    @property
    def num_params(self) -> int: ...

    def to_dense(self) -> Tensor: ...


def format_class(name: str) -> type:
    """The container class registered as ``name``; ``ValueError`` listing the known names otherwise."""
    return FORMATS.get(name).fn


def decompose(name: str, x: Tensor, *args, **kwargs) -> Factorization:
    """Decompose ``x`` into format ``name`` with that format's registered function (same arguments)."""
    return FORMATS.get(name).meta["decompose"](x, *args, **kwargs)


def can_truncate(factorization: object) -> bool:
    """Whether the format has a well-defined ``truncate(rank)`` (nested bases); CP and HT do not."""
    return callable(getattr(factorization, "truncate", None))
