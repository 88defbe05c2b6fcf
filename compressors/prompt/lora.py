"""A small LoRA for the linear layers of a BERT encoder, and the adapter files it is saved as.

LoRA (Hu et al., 2021) freezes a linear layer ``W`` and learns a low-rank update
``W + (alpha / rank) * B @ A`` with ``A`` of shape (rank, in) and ``B`` of shape (out, rank),
``B`` starting at zero so training starts from the base model. After training the update is
merged into ``W`` (:func:`merge_lora`), so inference runs the plain model with no overhead.

An adapter folder holds two files, each written atomically, the weights first:

* ``adapter.safetensors``: every ``<module>.lora_A`` / ``<module>.lora_B`` and the token
  classification head (``classifier.weight``, ``classifier.bias``), fp16 by default; its
  metadata carries the config too, so the file is complete on its own;
* ``adapter_config.json``: base model (a zoo name such as ``"minilm-l6"``), rank, alpha, targets,
  label names, the training figures and the sha256 of the weights file. A loader uses it only
  if the sha256 matches (after a crash between the two writes, the weights' own copy is used).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenlean._io import atomic_path, atomic_write_json, ensure_writable_dir
from tokenlean.errors import TokenleanError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGETS",
    "AdapterError",
    "LoRALinear",
    "apply_lora",
    "load_adapter",
    "load_adapter_into",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
]

#: File names inside an adapter folder.
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "tokenlean-lora/1"

#: Linear layers of every BERT layer that get a LoRA update (names relative to ``encoder.layer.N``).
DEFAULT_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)

#: Non-LoRA parameters saved with the adapter (the token classification head).
HEAD_PREFIXES = ("classifier.",)


class AdapterError(TokenleanError, ValueError):
    """An adapter folder is missing, incomplete, or does not fit the model."""


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * dropout(x) @ A.T @ B.T`` around a frozen ``nn.Linear``.

    Parameters
    ----------
    base : nn.Linear
        The layer to adapt; its parameters are frozen.
    rank : int
        Rank of the update (>= 1).
    alpha : float
        Scale numerator; the update is multiplied by ``alpha / rank``.
    dropout : float
        Dropout on the input of the low-rank path (training only).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise AdapterError(f"LoRA wraps nn.Linear layers, got {type(base).__name__}")
        self.base = base
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        for p in base.parameters():
            p.requires_grad_(False)
        weight = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(self.rank, base.in_features, dtype=weight.dtype, device=weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, self.rank, dtype=weight.dtype, device=weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The merged update ``scaling * B @ A`` (shape of ``base.weight``)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded into its weight."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        out = out.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        out.weight.requires_grad_(base.weight.requires_grad)
        if out.bias is not None:
            out.bias.requires_grad_(base.bias.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _target_pattern(targets: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(t) for t in targets)
    return re.compile(rf"(?:^|\.)layer\.\d+\.(?:{alternatives})$")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    rank: int = 16,
    alpha: float = 32.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
    freeze: bool = True,
) -> list[str]:
    """Wrap the target linear layers of every encoder layer in :class:`LoRALinear`, in place.

    Parameters
    ----------
    model : nn.Module
        A BERT-style model (``...encoder.layer.N.attention.self.query`` etc.).
    rank, alpha, dropout
        LoRA settings (update scale ``alpha / rank``).
    targets : sequence of str
        Module names relative to ``encoder.layer.N`` (default: query, key, value, attention
        output dense, intermediate dense, output dense).
    freeze : bool
        Freeze every parameter of the model except the LoRA matrices (the caller unfreezes a
        head it wants to train).

    Returns
    -------
    list of str
        The names of the wrapped modules.

    Raises
    ------
    AdapterError
        If the settings are invalid, no module matches, or LoRA is already applied.
    """
    if int(rank) < 1:
        raise AdapterError(f"LoRA rank must be >= 1, got {rank}")
    if not float(alpha) > 0:
        raise AdapterError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0.0 <= float(dropout) < 1.0:
        raise AdapterError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise AdapterError("LoRA is already applied to this model")
    targets = tuple(targets)
    if not targets:
        raise AdapterError("LoRA needs at least one target module name")
    pattern = _target_pattern(targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(n)]
    if not names:
        raise AdapterError(
            f"no linear layer of {type(model).__name__} matches the LoRA targets {list(targets)} "
            "(expected BERT-style names such as encoder.layer.0.attention.self.query)"
        )
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def lora_state_dict(model: nn.Module, include: Iterable[str] = HEAD_PREFIXES) -> dict[str, torch.Tensor]:
    """The trained part of ``model``: every LoRA matrix, plus parameters whose names start with ``include``.

    Keys are ``<module>.lora_A`` / ``<module>.lora_B`` (module names as in the un-adapted model)
    and e.g. ``classifier.weight``. Tensors are detached CPU copies.
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{name}.lora_A"] = module.lora_A.detach().cpu().clone()
            out[f"{name}.lora_B"] = module.lora_B.detach().cpu().clone()
    prefixes = tuple(include)
    if prefixes:
        for name, param in model.named_parameters():
            if name.startswith(prefixes) and ".lora_" not in name:
                out[name] = param.detach().cpu().clone()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its linear layer, in place; the model is then a plain model.

    Returns the model. Outputs are unchanged up to float rounding.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).merged())
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_adapter(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    config: Mapping[str, Any],
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the LoRA matrices and the head of ``model`` into ``out_dir``, atomically.

    Parameters
    ----------
    out_dir : path-like
        Adapter folder (created if needed).
    model : nn.Module
        A model with LoRA applied (not merged).
    config : mapping
        JSON-serialisable settings and figures; must name ``base_model``, ``rank``, ``alpha`` and
        ``targets``. ``format``, ``dtype``, ``weights_sha256`` and ``size_bytes`` are added.
    dtype : torch.dtype
        Storage type of the weights (fp16 by default; loading casts back to the model's dtype).

    Returns
    -------
    Path
        The folder.
    """
    from safetensors.torch import save_file

    for key in ("base_model", "rank", "alpha", "targets"):
        if key not in config:
            raise AdapterError(f"adapter config needs {key!r}")
    state = lora_state_dict(model)
    if not any(k.endswith(".lora_A") for k in state):
        raise AdapterError(
            "the model has no LoRA layers to save (apply_lora first, and save before merge_lora)"
        )
    folder = ensure_writable_dir(out_dir)
    tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
    full = dict(config)
    full.update(
        {"format": ADAPTER_FORMAT, "dtype": str(dtype).replace("torch.", ""), "weights_file": ADAPTER_WEIGHTS}
    )
    weights = folder / ADAPTER_WEIGHTS
    # The weights file carries its own copy of the config: it is complete on its own, so a crash
    # before the JSON below is written never leaves a weights file without its settings.
    with atomic_path(weights) as tmp:
        save_file(
            tensors, str(tmp), metadata={"format": ADAPTER_FORMAT, "config": json.dumps(full, default=str)}
        )
    full.update({"weights_sha256": _sha256(weights), "size_bytes": weights.stat().st_size})
    atomic_write_json(folder / ADAPTER_CONFIG, full)
    return folder


def load_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter folder; returns ``(tensors, config)``.

    Raises
    ------
    AdapterError
        If a file is missing, the config is not valid JSON, or the weights do not match it.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(
            f"adapter folder {str(folder)!r} has no {ADAPTER_WEIGHTS}"
            + ("" if folder.is_dir() else " (the folder does not exist)")
        )
    try:
        tensors = load_file(str(weights))
        with safe_open(str(weights), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise AdapterError(f"cannot read {weights}: {exc}") from exc
    if metadata.get("format") != ADAPTER_FORMAT or "config" not in metadata:
        raise AdapterError(f"{weights} is not a tokenlean LoRA adapter (format {ADAPTER_FORMAT!r})")
    config: dict[str, Any] = json.loads(metadata["config"])
    # The JSON beside it adds the figures written after the weights; use it only if it belongs to
    # these weights (a crash between the two writes leaves an older JSON behind).
    if cfg_path.is_file():
        try:
            side = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            side = None
        if isinstance(side, dict) and side.get("weights_sha256") == _sha256(weights):
            config = side
    return tensors, config


def load_adapter_into(model: nn.Module, folder: str | os.PathLike[str], merge: bool = True) -> dict[str, Any]:
    """Apply the adapter in ``folder`` to ``model`` (LoRA + head) and merge it; returns its config.

    Raises
    ------
    AdapterError
        If the adapter does not fit the model (missing or extra modules, wrong shapes).
    """
    tensors, config = load_adapter(folder)
    apply_lora(
        model,
        rank=int(config["rank"]),
        alpha=float(config["alpha"]),
        targets=tuple(config["targets"]),
        freeze=False,
    )
    own = dict(model.named_parameters())
    expected = set(lora_state_dict(model))
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise AdapterError(
            f"adapter in {str(folder)!r} does not fit {type(model).__name__}: "
            f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}"
        )
    with torch.no_grad():
        for key, value in tensors.items():
            param = own[key]
            if tuple(param.shape) != tuple(value.shape):
                raise AdapterError(
                    f"adapter tensor {key} has shape {tuple(value.shape)}, the model wants {tuple(param.shape)}"
                )
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    if merge:
        merge_lora(model)
    return config
