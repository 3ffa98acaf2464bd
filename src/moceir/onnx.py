"""ONNX export of a MoCE-IR network, and an ONNX Runtime runner that takes and returns torch tensors.

The exported graph:
- input ``image``: float32 [B, 3, H, W] in [0, 1], with B, H and W dynamic; H and W must be multiples of the
  model's ``config.size_multiple`` (8 for the presets), as for the PyTorch model (pad first, e.g. with
  ``moceir.inference.pad_to_multiple``);
- outputs ``restored`` (float32 [B, 3, H, W]) and ``experts`` (int64 [layers, B, k]: each MoE layer's chosen
  experts per image, as :attr:`moceir.MoCEOutput.expert_indices`).

Every image goes to its own experts inside the graph, with no host round trip: a [B, E] gate matrix built from the
router's top-k selects, and each expert runs on the batch behind an ``If`` that skips it when no image chose it
(MoCEAdapter's "conditional" dispatch; ``dispatch="dense"`` runs all of them). The experts' patch
FFT product is exported through the real-valued path (``fft_impl="matmul"``), so the graph holds no complex
tensors and no DFT operator.

That product is traced as one opaque operator (``moceir::patch_product``) and written out in ONNX operators by
:func:`_patch_product_onnx`, which mirrors ``moceir.models.attention._product_matmul`` step by step, computing the
patch counts ceil(H / p) in the graph. Traced op by op under symbolic H and W, the product took 3/4 of
torch.export's time (docs/onnx-and-fft.md). The model's config (as JSON, key ``moceir_config``, as in the
safetensors metadata of moceir.models.checkpoints) and an optional note are stored in the ONNX metadata_props.

Needs ``pip install 'moceir[onnx]'`` (onnx, onnxscript for the exporter, onnxruntime to run).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import nn

from .models import MoCEConfig, MoCEIR, attention, fused
from .models.checkpoints import (CONFIG_KEY, CheckpointError, OutputPathError, check_output_path,
                                 config_from_dict, printable_note, write_output)

DEFAULT_OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("restored", "experts")
NOTE_KEY = "note"
INSTALL_HINT = "pip install 'moceir[onnx]'"


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"ONNX support needs the {module} package: {INSTALL_HINT}") from None


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporter's notes that concern torch, not the user: one line per torchvision operator when
    torchvision is absent, and a deprecation inside torch's own pytree code."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        log.setLevel(level)


@torch.library.custom_op("moceir::patch_product", mutates_args=())
def _patch_product_op(q: torch.Tensor, k: torch.Tensor, w_cos: torch.Tensor, w_sin: torch.Tensor,
                      h_fwd: torch.Tensor, h_inv: torch.Tensor, w_inv: torch.Tensor, patch: int) -> torch.Tensor:
    """fft_impl="matmul" as one operator for torch.export (see :func:`_patch_product_onnx` for its ONNX form)."""
    return attention.patch_fft_product(q, k, patch, "matmul", (w_cos, w_sin, h_fwd, h_inv, w_inv))


@_patch_product_op.register_fake
def _(q, k, w_cos, w_sin, h_fwd, h_inv, w_inv, patch):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _traced_product(q: torch.Tensor, k: torch.Tensor, patch: int, dft: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    return torch.ops.moceir.patch_product(q, k, *dft, patch)


EXPORT_IMPL = "matmul, as one operator for export"
attention.PATCH_PRODUCTS[EXPORT_IMPL] = _traced_product  # set on the exported copy's FFTAttention modules only


def _patch_product_onnx(q, k, w_cos, w_sin, h_fwd, h_inv, w_inv, patch: int):
    """ONNX operators for ``moceir::patch_product``: ``_product_matmul`` with shapes computed in the graph."""
    from onnxscript import opset18 as op

    p, m = patch, patch // 2 + 1

    def ints(*values: int):
        return op.Constant(value_ints=list(values))

    def cat(*parts):
        return op.Concat(*parts, axis=0)

    b, c, h, w = (op.Slice(op.Shape(q), ints(i), ints(i + 1)) for i in range(4))
    nh, nw = op.Div(op.Add(h, ints(p - 1)), ints(p)), op.Div(op.Add(w, ints(p - 1)), ints(p))
    pads = cat(ints(0, 0, 0, 0, 0, 0), op.Sub(op.Mul(nh, ints(p)), h), op.Sub(op.Mul(nw, ints(p)), w))
    rows = op.Mul(op.Mul(b, c), nh)
    stacked = cat(rows, ints(2 * p), op.Mul(nw, ints(m)))  # [G, 2p, nw * m]
    split = cat(rows, ints(2, p), nw, ints(m))  # [G, 2, p, nw, m]

    def halves(t):  # [G, 2, ...] -> [G, 1, ...] twice
        return op.Slice(t, ints(0), ints(1), ints(1)), op.Slice(t, ints(1), ints(2), ints(1))

    def spectrum(t):
        x = op.Reshape(op.Pad(op.Cast(t, to=1), pads), cat(rows, ints(p), nw, ints(p)))
        re_im = op.Concat(op.Unsqueeze(op.MatMul(x, w_cos), ints(1)), op.Unsqueeze(op.MatMul(x, w_sin), ints(1)),
                          axis=1)
        z = op.Reshape(op.MatMul(h_fwd, op.Reshape(re_im, stacked)), split)
        return halves(z)

    qr, qi = spectrum(q)
    kr, ki = spectrum(k)
    prod = op.Concat(op.Sub(op.Mul(qr, kr), op.Mul(qi, ki)), op.Add(op.Mul(qr, ki), op.Mul(qi, kr)), axis=1)
    ur, ui = halves(op.Reshape(op.MatMul(h_inv, op.Reshape(prod, stacked)), split))
    out = op.MatMul(op.Concat(ur, ui, axis=-1), w_inv)  # [G, 1, p, nw, p]
    out = op.Reshape(out, cat(b, c, op.Mul(nh, ints(p)), op.Mul(nw, ints(p))))
    return op.Slice(out, ints(0, 0), cat(h, w), ints(2, 3))


class _Exported(nn.Module):
    """``x -> (restored image, expert indices [layers, B, k])`` of an eval-mode MoCEIR."""

    def __init__(self, model: MoCEIR):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(x, return_aux=True)
        return out.image, out.expert_indices


def _exportable_copy(model: MoCEIR, dispatch: str) -> MoCEIR:
    """A CPU float32 copy of ``model`` on the exportable path: fft_impl="matmul" (as one operator), the given
    dispatch, eval mode. ``model`` itself is left as it was."""
    if model.config.eval_router_noise:
        raise ValueError("the model adds router noise in eval (eval_router_noise=True); an ONNX export is "
                         "deterministic: load it with eval_router_noise=False")
    copy = MoCEIR(model.config.replace(fft_impl="matmul"))
    copy.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()})
    return copy.eval().set_fft_impl(EXPORT_IMPL).set_dispatch(dispatch)


EXPORT_DISPATCHES = ("conditional", "dense")


def onnx_name_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot name an ONNX graph, or None: moceir (and ONNX tools) tell one by its .onnx suffix, and
    take any other name for safetensors, an image or a pickle."""
    if Path(path).suffix.lower() == ".onnx":
        return None
    return f"{path}: an ONNX graph must be named .onnx, which is how moceir and ONNX tools recognise it; name it " \
           "e.g. model.onnx"


def export_onnx(model: MoCEIR, path: str | Path, opset: int = DEFAULT_OPSET, note: str | None = None,
                overwrite: bool = False, optimize: bool = True, dispatch: str = "conditional") -> Path:
    """Write ``model`` as an ONNX graph with dynamic batch, height and width (see the module docstring).

    The file is written to a unique temporary file beside ``path``, then moved into place; an existing ``path``
    is replaced only with ``overwrite=True`` (else OutputPathError, a FileExistsError: see check_output_path). A
    folder with less free space than the float32 weights is refused (OSError ENOSPC) before the export starts.
    ``note`` is stored in the metadata (``load_onnx(...).note``). Returns ``path``.
    ``optimize`` runs the onnxscript graph optimizer: it about doubles the export time (MoCE-IR-S: 227 s against
    121 s on a loaded 2-core machine) and makes ONNX Runtime 16% faster (it turns the SplitToSequence/SequenceAt
    pairs of ``chunk`` into Split, which took 15% of ORT's time). ``optimize=False`` for quick exports (tests).
    ``dispatch``: "conditional" puts each expert behind an ONNX ``If`` (some image of the batch chose it), so a
    single image runs one expert per MoE layer; "dense" runs all experts and gates them (docs/onnx-and-fft.md).
    """
    if problem := onnx_name_problem(path):
        raise OutputPathError(problem)
    path = check_output_path(path, overwrite)
    if opset < 18:
        raise ValueError(f"opset must be at least 18 (the patch product is written with opset-18 operators), "
                         f"got {opset}")
    for module in ("onnx", "onnxscript"):
        _require(module)
    if dispatch not in EXPORT_DISPATCHES:
        raise ValueError(f"dispatch must be one of {EXPORT_DISPATCHES}, got {dispatch!r}")
    _check_free_space(model, path)
    net = _exportable_copy(model, dispatch)
    config, m = net.config, net.config.size_multiple
    sample = torch.rand(2, config.inp_channels, 2 * m, 3 * m)
    dims = torch.export.Dim
    shapes = {"x": {0: dims("batch", min=1), 2: m * dims("h", min=1), 3: m * dims("w", min=1)}}
    table = {torch.ops.moceir.patch_product.default: _patch_product_onnx}
    # The oneDNN-fused CPU path is a runtime fast path of eager PyTorch, not part of the exported graph.
    with torch.no_grad(), fused.disabled(), _quiet_exporter():
        program = torch.onnx.export(_Exported(net).eval(), (sample,), dynamo=True, dynamic_shapes=shapes,
                                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    opset_version=opset, verbose=False, optimize=optimize,
                                    custom_translation_table=table)
    metadata = {CONFIG_KEY: json.dumps(config.to_dict()), "format": "moceir"}
    if note:
        metadata[NOTE_KEY] = note
    program.model.metadata_props.update(metadata)
    return write_output(path, lambda tmp: program.save(str(tmp), external_data=False), overwrite)


def _check_free_space(model: MoCEIR, path: Path) -> None:
    """Refuse before the export (minutes for MoCE-IR-S) a folder that cannot hold the weights in float32."""
    need = sum(t.numel() for t in model.state_dict().values()) * 4
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:  # the folder is checked by the write itself
        return
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device: the file needs at least {need / 2**20:.1f} MiB, "
                      f"{free / 2**20:.1f} MiB are free", str(path))


class OnnxModel:
    """An exported MoCE-IR in ONNX Runtime: ``model(x) -> (restored [B, 3, H, W], experts [layers, B, k])``.

    x: float32 torch tensor [B, 3, H, W] in [0, 1], H and W multiples of ``config.size_multiple``.
    """

    def __init__(self, session: Any, config: MoCEConfig, note: str | None, path: str | Path = "the ONNX file"):
        self.session = session
        self.config = config
        self.note = note
        self.path = path

    @property
    def num_moe_layers(self) -> int:
        return sum(self.config.num_dec_blocks)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.config.inp_channels:
            raise ValueError(f"expected [B, {self.config.inp_channels}, H, W], got {tuple(x.shape)}")
        m = self.config.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"input H and W must be multiples of {m}, got {tuple(x.shape[-2:])}; "
                             "use moceir.inference.pad_to_multiple")
        feed = {INPUT_NAME: x.detach().to("cpu", torch.float32).contiguous().numpy()}
        image, experts = self.session.run(list(OUTPUT_NAMES), feed)
        if image.shape != tuple(x.shape) or experts.ndim != 3 or experts.shape[1] != x.shape[0]:
            raise CheckpointError(f"{self.path}: its graph returned {OUTPUT_NAMES[0]} {list(image.shape)} and "
                                  f"{OUTPUT_NAMES[1]} {list(experts.shape)} for an input of {list(x.shape)}, not what "
                                  "moceir export writes; export the model again")
        return torch.from_numpy(image), torch.from_numpy(experts)


def load_onnx(path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> OnnxModel:
    """Open a file written by :func:`export_onnx` with ONNX Runtime.

    ``providers``: ONNX Runtime execution providers in order of preference (default: all available ones, e.g.
    CUDA then CPU); ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core).
    """
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist or is not a file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the conditional graph's If branches draw "unused initializer" notes
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if providers is None:  # the Azure provider (remote inference) is listed as available but runs nothing here
        providers = [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    meta = session.get_modelmeta().custom_metadata_map
    if CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata: not written by moceir.onnx.export_onnx")
    try:
        config = json.loads(meta[CONFIG_KEY])
    except ValueError:
        raise CheckpointError(f"{path}: its {CONFIG_KEY!r} metadata is not JSON; export the model again") from None
    _check_signature(session, path)
    note = meta.get(NOTE_KEY)
    return OnnxModel(session, config_from_dict(config, str(path)), printable_note(note) if note else None, path)


def _check_signature(session: Any, path: Path) -> None:
    """Refuse a graph that does not take ``image`` [B, 3, H, W] float and return ``restored`` [B, 3, H, W] and
    ``experts`` [layers, B, k]: moceir's metadata on another graph (ONNX Runtime fails at the first image)."""
    inputs = [(i.name, i.type, len(i.shape)) for i in session.get_inputs()]
    outputs = {o.name: len(o.shape) for o in session.get_outputs()}
    if inputs != [(INPUT_NAME, "tensor(float)", 4)] or outputs.get(OUTPUT_NAMES[0]) != 4 or \
            outputs.get(OUTPUT_NAMES[1]) != 3:
        takes = ", ".join(f"{name} ({kind}, {rank}-D)" for name, kind, rank in inputs) or "nothing"
        returns = ", ".join(f"{name} ({rank}-D)" for name, rank in outputs.items()) or "nothing"
        raise CheckpointError(f"{path}: its graph takes {takes} and returns {returns}, not {INPUT_NAME} (4-D) -> "
                              f"{OUTPUT_NAMES[0]} (4-D), {OUTPUT_NAMES[1]} (3-D) as moceir export writes them; "
                              "export the model again")
