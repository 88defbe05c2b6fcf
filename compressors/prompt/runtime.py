"""Encoder runtimes: what turns token ids into P(keep) for :class:`~.compressor.PromptCompressor`.

The compressor only needs one call, ``runtime(input_ids, attention_mask) -> probs``, so the
token classifier can run on PyTorch (any precision, any device) or on an optimised CPU runtime
without the rest of the compressor knowing.

Runtimes
--------
``"torch"`` (precisions ``"fp32"``, ``"bf16"``, ``"fp16"``)
    The ``*ForTokenClassification`` module itself, in fp32 (exact, the default), bf16 or fp16.
``"openvino"`` (precision ``"int8"``, CPU only; ``pip install 'tokenlean[openvino]'``)
    The encoder converted to OpenVINO in memory (nothing is written to disk), its linear layers'
    weights quantised to int8 (asymmetric, one scale per output channel; embeddings stay fp32),
    and the 2-label head applied in fp32 NumPy on the encoder's last hidden state, so P(keep)
    keeps full resolution whatever the encoder computes in. What the int8 matmuls compute in
    (``compute=``) follows the CPU unless asked:

    * ``"int8"``: activations quantised to int8 on the fly (OpenVINO dynamic quantisation,
      groups of 32 along the reduction axis), int8 dot products on VNNI; the rest in fp32.
      Without VNNI OpenVINO falls back to expanding the weights to fp32 (int8 error, fp32 speed).
    * ``"bf16"``: the int8 weights are expanded to bf16 and every op runs in bf16 on AMX tiles.
      On AMX CPUs this is faster than int8 activations (OpenVINO's dynamic-quantisation kernel
      uses VNNI, not AMX) and as accurate.
    * ``"fp32"``: weight-only int8, fp32 arithmetic.
    * ``"auto"`` (default): ``"bf16"`` where the CPU has AMX and OpenVINO reports bf16 support,
      else ``"int8"``.

    ``build_runtime(model, "fp32" | "bf16", "cpu", runtime="openvino")`` runs the same converted
    encoder with fp32 weights, in fp32 or bf16.

    Precision hints are always set explicitly (OpenVINO would otherwise pick bf16 by itself on
    AMX CPUs); ``runtime.info`` records what the compiled model really runs in. The compiled
    model is cached in memory per (weights, options, threads), so a second compressor on the
    same classifier does not convert again. Importing openvino sends OpenVINO's anonymous usage
    telemetry unless the user opted out (``opt_in_out --opt_out``, from openvino-telemetry).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "EncoderRuntime",
    "OpenVINORuntime",
    "RuntimeError_",
    "TorchRuntime",
    "build_runtime",
    "cpu_features",
]

#: the pip extra that installs the OpenVINO runtime
OPENVINO_EXTRA = "pip install 'tokenlean[openvino]'"


class RuntimeError_(ValueError):  # noqa: N801 - not the builtin RuntimeError
    """A runtime/precision combination that cannot work (message says what to use instead)."""


class EncoderRuntime(Protocol):
    """Callable computing keep probabilities for a padded batch.

    ``input_ids`` int64 ``(batch, width)``, ``attention_mask`` bool ``(batch, width)``;
    returns float32 ``(batch, width)`` P(label 1 = keep); values at padded positions are unspecified.
    """

    name: str

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class TorchRuntime:
    """The PyTorch module, in fp32, bf16 or fp16, on its device."""

    def __init__(self, model: torch.nn.Module, precision: str, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.name = f"torch-{precision}"
        if precision in ("bf16", "fp16"):
            model.to(torch.bfloat16 if precision == "bf16" else torch.float16)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ids_t = torch.from_numpy(input_ids).to(self.device)
            mask_t = torch.from_numpy(attention_mask).to(self.device)
            logits = self.model(input_ids=ids_t, attention_mask=mask_t).logits
            return torch.softmax(logits.float(), dim=-1)[..., 1].cpu().numpy()


# --------------------------------------------------------------------------- OpenVINO


#: oldest OpenVINO release that passes the tests: 2025.1 and 2025.2 return NaN for the full rows
#: of a batch that also holds padded rows
OPENVINO_MIN = (2025, 3)


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(
            f"precision='int8' runs the encoder on OpenVINO, which is not installed: {OPENVINO_EXTRA}"
        ) from exc
    try:
        version = tuple(int(x) for x in openvino.__version__.split("-")[0].split(".")[:2])
    except ValueError:  # a development build: trust it
        version = OPENVINO_MIN
    if version < OPENVINO_MIN:
        raise ImportError(
            f"openvino {openvino.__version__} is too old for the int8 runtime (needs >= "
            f"{'.'.join(map(str, OPENVINO_MIN))}; older releases return NaN for padded batches): "
            f"pip install -U 'tokenlean[openvino]'"
        )
    return openvino


def cpu_features() -> dict[str, bool]:
    """What the CPU offers the int8/bf16 paths: ``{"amx": ..., "vnni": ...}`` (False when unknown)."""
    out = {}
    for key, probe in (("amx", "_is_amx_tile_supported"), ("vnni", "_is_vnni_supported")):
        fn = getattr(torch.cpu, probe, None)
        try:
            out[key] = bool(fn()) if fn is not None else False
        except Exception:  # noqa: BLE001 - a missing probe means "unknown", never an error
            out[key] = False
    return out


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


class _Body(torch.nn.Module):
    """``(input_ids, attention_mask) -> last hidden state`` (what OpenVINO runs)."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=input_ids, attention_mask=attention_mask)[0]


class _Logits(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits``: for classifiers whose head is not one Linear."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, np.ndarray | None, float]:
    """(module to convert, keep-minus-drop head weight (hidden,), bias difference) or, when the
    classifier is not ``base model -> Linear(hidden, 2)``, (logits module, None, 0)."""
    head = getattr(model, "classifier", None)
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(head, torch.nn.Linear) and head.out_features == 2 and isinstance(body, torch.nn.Module):
        weight = head.weight.detach().float().cpu().numpy()
        bias = head.bias.detach().float().cpu().numpy() if head.bias is not None else np.zeros(2, np.float32)
        return _Body(body), np.ascontiguousarray(weight[1] - weight[0]), float(bias[1] - bias[0])
    return _Logits(model), None, 0.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Overflow-free float32 sigmoid that keeps tiny probabilities distinct (no ties at 0)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32, copy=False)


def _compress_weights(ov_model: Any) -> int:
    """Replace every MatMul's fp32 2-D constant weight by int8 (u8 + zero point) and a per-output-
    channel scale: the ``Convert -> Subtract -> Multiply`` decompression pattern that OpenVINO
    compiles to compressed fully-connected kernels. Returns the number of layers compressed."""
    import openvino.opset13 as ops

    done = 0
    for node in ov_model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        src = node.input_value(1).get_node()
        if src.get_type_name() != "Constant" or src.get_element_type().get_type_name() != "f32":
            continue
        weight = src.get_data()
        if weight.ndim != 2:
            continue
        axis = 1 if node.get_attributes().get("transpose_b", False) else 0  # reduction axis
        lo = np.minimum(weight.min(axis=axis, keepdims=True), 0.0)
        hi = np.maximum(weight.max(axis=axis, keepdims=True), 0.0)
        scale = (hi - lo) / 255.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zero = np.clip(np.round(-lo / scale), 0, 255)
        q = np.clip(np.round(weight / scale) + zero, 0, 255).astype(np.uint8)
        dequant = ops.multiply(
            ops.subtract(
                ops.convert(ops.constant(q), "f32"), ops.convert(ops.constant(zero.astype(np.uint8)), "f32")
            ),
            ops.constant(scale),
        )
        node.input(1).replace_source_output(dequant.output(0))
        done += 1
    ov_model.validate_nodes_and_infer_types()
    return done


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.Lock()


class OpenVINORuntime:
    """The classifier's encoder compiled by OpenVINO for the CPU (see the module docstring).

    Parameters
    ----------
    model : ``*ForTokenClassification`` module (fp32, on the CPU)
    weights : {"int8", "fp32"}
        Linear-layer weights: int8 per output channel, or left fp32.
    compute : {"auto", "int8", "bf16", "fp32"}
        What the encoder computes in: ``"int8"`` needs ``weights="int8"`` (dynamic int8
        activations); ``"bf16"`` needs a CPU with bf16 support; ``"auto"`` is ``"bf16"`` on AMX
        CPUs, else ``"int8"`` with int8 weights and ``"fp32"`` without.
    num_threads : int, optional
        Inference threads (default: ``torch.get_num_threads()``, what the torch encoder would use).
    group_size : int
        Dynamic activation quantisation group (``compute="int8"``), a multiple of 16.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        weights: str = "int8",
        compute: str = "auto",
        num_threads: int | None = None,
        group_size: int = 32,
    ) -> None:
        ov = _import_openvino()
        if weights not in ("int8", "fp32"):
            raise RuntimeError_(f"weights must be 'int8' or 'fp32', got {weights!r}")
        if compute not in ("auto", "int8", "bf16", "fp32"):
            raise RuntimeError_(f"compute must be 'auto', 'int8', 'bf16' or 'fp32', got {compute!r}")
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
            raise RuntimeError_(f"group_size must be a positive multiple of 16, got {group_size!r}")
        core = ov.Core()
        features = cpu_features()
        compute = self.resolve_compute(compute, weights, core)
        threads = int(num_threads) if num_threads is not None else torch.get_num_threads()
        self.weights, self.compute, self.num_threads = weights, compute, threads
        self.name = self.runtime_name(weights, compute)

        start = time.perf_counter()
        module, self._head_w, self._head_b = _split_head(model)
        key = (
            _digest(module),
            self._head_w is None,
            weights,
            compute,
            group_size if compute == "int8" else 0,
            threads,
            ov.__version__,
        )
        with _CACHE_LOCK:
            entry = _CACHE.get(key)
            if entry is not None:
                _CACHE.move_to_end(key)
        compiled, private = entry if entry is not None else (None, None)
        cached = compiled is not None
        if compiled is None:
            private = copy.deepcopy(module)
            ov_model = self._convert(ov, private)
            if weights == "int8":
                _compress_weights(ov_model)
            config = {
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                "INFERENCE_NUM_THREADS": threads,
                "EXECUTION_MODE_HINT": "PERFORMANCE",
                "INFERENCE_PRECISION_HINT": "bf16" if compute == "bf16" else "f32",
                "DYNAMIC_QUANTIZATION_GROUP_SIZE": group_size if compute == "int8" else 0,
            }
            compiled = core.compile_model(ov_model, "CPU", config)
            with _CACHE_LOCK:
                _CACHE[key] = (compiled, private)  # the copy lives as long as the compiled model
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
        self._compiled, self._weights_owner = compiled, private
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self.info = {
            "runtime": self.name,
            "openvino": ov.__version__,
            "weights": weights,
            "compute": compute,
            "inference_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
            "dynamic_quantization_group_size": int(compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")),
            "num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
            "head": "fp32 numpy" if self._head_w is not None else "in the compiled model",
            "cpu": features,
            "build_s": round(time.perf_counter() - start, 3),
            "cached": cached,
        }

    @staticmethod
    def runtime_name(weights: str, compute: str) -> str:
        """``openvino-fp32``, ``openvino-bf16``, ``openvino-w8-fp32``, ``openvino-w8a8`` or ``openvino-w8-bf16``."""
        if weights == "fp32":
            return f"openvino-{compute}"
        return "openvino-w8a8" if compute == "int8" else f"openvino-w8-{compute}"

    @staticmethod
    def resolve_compute(compute: str = "auto", weights: str = "int8", core: Any = None) -> str:
        """What ``compute`` means on this CPU (``"auto"`` resolved), or :class:`RuntimeError_`."""
        if core is None:
            core = _import_openvino().Core()
        has_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if compute == "auto":
            if cpu_features()["amx"] and has_bf16:
                return "bf16"
            return "int8" if weights == "int8" else "fp32"
        if compute == "int8" and weights != "int8":
            raise RuntimeError_("compute='int8' (dynamic int8 activations) needs weights='int8'")
        if compute == "bf16" and not has_bf16:
            raise RuntimeError_("this CPU has no bf16 support; use compute='int8' or 'fp32'")
        return compute

    @staticmethod
    def _convert(ov: Any, module: torch.nn.Module) -> Any:
        """``module`` (a private copy: the OpenVINO model shares its weights) as an OpenVINO model
        with dynamic batch and sequence dimensions."""
        # a padded example row, so the traced graph keeps the attention-mask path
        ids = torch.ones((2, 8), dtype=torch.long)
        mask = torch.ones((2, 8), dtype=torch.long)
        mask[1, 5:] = 0
        hf_logger = logging.getLogger("transformers.modeling_utils")
        quiet = _DropMessages(("`loss_type=",))  # PreTrainedModel.loss_function, read by the tracer
        hf_logger.addFilter(quiet)
        try:
            with warnings.catch_warnings():
                # what tracing transformers code through OpenVINO's TorchScript frontend says: the
                # data-dependent branches are taken with the padded example, the shapes are made
                # dynamic below, and the deprecations are OpenVINO's and transformers' to act on
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings("ignore", r"`torch\.jit\.trace", DeprecationWarning)
                warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
                ov_model = ov.convert_model(
                    module.eval(),
                    example_input={"input_ids": ids, "attention_mask": mask},
                    share_weights=True,
                )
        finally:
            hf_logger.removeFilter(quiet)
        ov_model.reshape({port: ov.PartialShape([-1, -1]) for port in ov_model.inputs})
        return ov_model

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        with self._lock:
            self._request.infer({0: ids, 1: mask})
            out = self._request.get_output_tensor(0).data
            if self._head_w is None:
                logits = out.astype(np.float32)
                return _sigmoid(logits[..., 1] - logits[..., 0])
            return _sigmoid(out @ self._head_w + np.float32(self._head_b))


def build_runtime(
    model: torch.nn.Module, precision: str, device: torch.device, **options: Any
) -> EncoderRuntime:
    """The runtime for ``precision`` on ``device``.

    ``"fp32"``, ``"bf16"``, ``"fp16"``: the torch module (:class:`TorchRuntime`). ``"int8"``:
    :class:`OpenVINORuntime` with int8 weights on the CPU; ``options`` may set its ``compute``
    (default ``"auto"``), ``num_threads`` and ``group_size``. ``runtime="openvino"`` also runs
    ``"fp32"`` or ``"bf16"`` on OpenVINO (CPU; fp32 weights; ``num_threads`` allowed).
    """
    device = torch.device(device)
    backend = options.pop("runtime", "openvino" if precision == "int8" else "torch")
    if backend == "torch":
        if precision not in ("fp32", "bf16", "fp16"):
            raise RuntimeError_(f"no torch runtime for precision {precision!r}")
        if options:
            raise TypeError(f"the torch runtime takes no options, got {sorted(options)}")
        return TorchRuntime(model, precision, device)
    if backend != "openvino":
        raise RuntimeError_(f"runtime must be 'torch' or 'openvino', got {backend!r}")
    if precision not in ("int8", "fp32", "bf16"):
        raise RuntimeError_(f"no OpenVINO runtime for precision {precision!r}")
    if device.type != "cpu":
        raise RuntimeError_(
            f"precision={precision!r} on OpenVINO runs on the CPU; use 'fp16' or 'bf16' (torch) on a GPU"
        )
    allowed = {"compute", "num_threads", "group_size"} if precision == "int8" else {"num_threads"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)} for precision {precision!r} on OpenVINO")
    if precision == "int8":
        return OpenVINORuntime(model, weights="int8", **options)
    return OpenVINORuntime(model, weights="fp32", compute=precision, **options)
