"""transformers integration: a "rankwise" quantization method so stock ``from_pretrained`` rebuilds factorized layers.

transformers lets a package register its own quantization config and quantizer
(``register_quantization_config`` / ``register_quantizer``). A rankwise checkpoint's ``config.json``
carries ``"quantization_config": {"quant_method": "rankwise", "version": 1, "ranks": {name: rank}}``;
before the weights are read, the quantizer swaps each listed ``nn.Linear`` (or transformers
``Conv1D``) of the freshly built, empty model for a :class:`~rankwise.layers.LowRankLinear` of that
rank, so the stored ``down.weight`` / ``up.weight`` / ``up.bias`` tensors load as they are: no
conversion, no ``trust_remote_code``. Other factorized layer types (Tucker/CP/SVD convolutions, TT and
Kronecker linears, low-rank and TT embeddings) are listed under an optional ``"modules": {name: spec}``
and rebuilt empty with ``rankwise.layers.registry.empty_layer(old, spec)``. Importing this module
registers both classes (once).
"""

from __future__ import annotations

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._validate import is_int
from ..layers.linear import LowRankLinear, is_conv1d
from ..layers.registry import LAYERS, empty_layer
from ..targets import replace_module

QUANT_METHOD = "rankwise"
FORMAT_VERSION = 1


class RankwiseConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a rankwise checkpoint: which modules are factorized, at which rank.

    Parameters
    ----------
    ranks : dict[str, int]
        Qualified module name (as in ``model.named_modules()`` of the saved model) -> rank.
    version : int
        Format version; only 1 exists.
    modules : dict[str, dict], optional
        Qualified module name -> the ``spec()`` of a factorized layer of another type than LowRankLinear
        (its ``"layer"`` names a type registered in :data:`rankwise.layers.registry.LAYERS`).
    """

    def __init__(
        self,
        ranks: dict[str, int] | None = None,
        version: int = FORMAT_VERSION,
        modules: dict[str, dict] | None = None,
        **kwargs,
    ):
        if version != FORMAT_VERSION:
            raise ValueError(f"rankwise checkpoint format version must be {FORMAT_VERSION}, got {version!r}")
        bad = {k: v for k, v in (ranks or {}).items() if not is_int(v) or v < 1}
        if bad:
            name, value = next(iter(bad.items()))
            raise ValueError(f"rankwise quantization_config ranks must be ints >= 1, got {value!r} for {name!r}")
        self.quant_method = QUANT_METHOD
        self.version = version
        self.ranks = dict(ranks or {})
        for name, spec in (modules or {}).items():
            if not isinstance(spec, dict) or spec.get("layer") not in LAYERS:
                layer = spec.get("layer") if isinstance(spec, dict) else spec
                raise ValueError(
                    f"rankwise quantization_config modules[{name!r}] names layer type {layer!r}; "
                    f"known: {', '.join(LAYERS.names())}"
                )
        if modules:  # absent, not empty, in checkpoints without other layer types (older readers see no change)
            self.modules = {name: dict(spec) for name, spec in modules.items()}


def _resolve(model: nn.Module, name: str) -> str:
    """``name`` as it is called in ``model``, allowing for a base model saved inside a task model or vice versa;
    ``ValueError`` when the model has no such module."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    found = next((c for c in candidates if c in modules), None)
    if found is None:
        raise ValueError(f"rankwise checkpoint lists module {name!r}, which this {type(model).__name__} does not have")
    return found


def replace_with_low_rank(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Swap each module named in ``ranks`` for an uninitialized ``LowRankLinear`` of that rank, in place.

    The new layer has the old one's shape, bias presence, device and dtype (on the meta device while
    ``from_pretrained`` builds the model). Raises ``ValueError`` for a name the model lacks or a
    module that is not ``nn.Linear`` / ``Conv1D``.
    """
    for name, rank in ranks.items():
        resolved = _resolve(model, name)
        old = model.get_submodule(resolved)
        if isinstance(old, nn.Linear):
            n_in, n_out = old.in_features, old.out_features
        elif is_conv1d(old):
            n_in, n_out = old.weight.shape[0], old.nf
        elif isinstance(old, LowRankLinear) and old.rank == rank:
            continue
        else:
            raise ValueError(
                f"rankwise checkpoint lists module {name!r} as factorized, "
                f"but it is a {type(old).__name__}, not nn.Linear or Conv1D"
            )
        new = LowRankLinear(
            n_in, n_out, rank, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
        parent = replace_module(model, resolved, new)
        # Some models' _init_weights reach into a child's .weight (GPT-2 scales c_proj.weight); every
        # tensor of a rankwise checkpoint is stored, so the parent needs no init and must skip it.
        parent._is_hf_initialized = True
    return model


def replace_with_factorized(model: nn.Module, modules: dict[str, dict]) -> nn.Module:
    """Swap each module named in ``modules`` for an empty factorized layer of its spec, in place."""
    for name, spec in modules.items():
        resolved = _resolve(model, name)
        old = model.get_submodule(resolved)
        if callable(getattr(old, "spec", None)) and old.spec() == spec:
            continue
        new = empty_layer(old, spec)
        replace_module(model, resolved, new)
        # Every tensor of the new layer is stored; the parent is left to its _init_weights, which may set up
        # non-persistent buffers (BERT's position_ids) that loading does not restore.
        new._is_hf_initialized = True
    return model


class RankwiseHfQuantizer(HfQuantizer):
    """Loads a rankwise checkpoint: factorized layers are built before loading; weights load unchanged."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_with_low_rank(model, self.quantization_config.ranks)
        replace_with_factorized(model, getattr(self.quantization_config, "modules", {}))
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the config and the quantizer with transformers under ``"rankwise"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(RankwiseConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(RankwiseHfQuantizer)


register()
