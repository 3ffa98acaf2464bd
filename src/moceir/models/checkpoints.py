"""Checkpoint I/O: upstream Lightning checkpoints, our own checkpoints, plain state_dicts and safetensors.

All upstream compatibility lives here: wrapper prefixes are stripped in one helper, the configuration is
read from the file or inferred from tensor shapes, and loading is strict, naming every mismatched key.
Files are read with ``weights_only=True``: a checkpoint never runs code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..checks import not_a_bool
from ..io import WRITABLE_EXTS, file_problem, write_atomically, write_error_advice
from ..runtime import first_line, resolve_device
from .config import RANK_TYPES, MoCEConfig
from .network import MoCEIR

CONFIG_KEY = "moceir_config"
WRAPPER_PREFIXES = ("net.", "module.", "_orig_mod.")
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "default.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not match the network."""


class NonFiniteWeights(CheckpointError):
    """A checkpoint whose floating-point weights hold NaN or inf."""


class OutputPathError(CheckpointError, FileExistsError):
    """A checkpoint or export cannot be written where asked: the name is taken (a file, a link, a file where a
    folder should be) or names another format. A CheckpointError, so the CLI reports it in one line; a
    FileExistsError, as documented."""


def strip_wrappers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove Lightning (``net.``), DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes.

    In a Lightning checkpoint only the ``net.`` entries belong to the network; others are dropped.
    """
    sd = dict(state_dict)
    if any(k.startswith("net.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("net.")}
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def resolve_path(path: str | Path) -> Path:
    """"default" -> the bundled model; otherwise ``path``, which must be an existing file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or Path (or \"default\"), not {type(path).__name__}")
    if str(path) == "default":
        if not DEFAULT_WEIGHTS.exists():
            raise CheckpointError(
                f"no bundled default model at {DEFAULT_WEIGHTS}; pass a checkpoint (--checkpoint PATH) "
                "or train one with `moceir train` (see README)")
        return DEFAULT_WEIGHTS
    p = Path(path)
    if p.is_dir():  # a run folder: name the files in it that load
        inside = [p / n for n in ("model.safetensors", "model_ema.safetensors", "last.ckpt") if (p / n).is_file()]
        raise CheckpointError(f"checkpoint {p} is a folder; pass a checkpoint file"
                              + (f" in it, e.g. {inside[0]}" if inside else ""))
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} {file_problem(p) or 'is not a regular file'}; check the path")
    return p


def checkpoint_note(path: str | Path) -> str:
    """The 'note' a safetensors checkpoint or an ONNX export carries (e.g. that the bundled model is early and
    weak); "" if none."""
    try:
        p = resolve_path(path)
        if p.suffix.lower() == ".onnx":  # restore printed no note for an export of the bundled model
            import onnx

            from ..onnx import NOTE_KEY

            props = onnx.load(str(p), load_external_data=False).metadata_props  # parses the weights too (~the size)
            return printable_note(next((x.value for x in props if x.key == NOTE_KEY), ""))
        if not _is_safetensors(p):
            return ""
        with _safe_open(p) as f:
            return printable_note(str((f.metadata() or {}).get("note", "")))
    except Exception:  # noqa: BLE001 - an unreadable file is reported by load_model with the real reason
        return ""


def printable_note(note: str) -> str:
    """A model file's note as one line for a terminal: control characters (line breaks, ANSI escapes a hostile
    file could use to fake output or recolour the terminal) become spaces, runs of spaces one."""
    return " ".join("".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in note).split())


@contextlib.contextmanager
def _safe_open(p: Path) -> Iterator[Any]:
    """safetensors' ``safe_open`` of ``p``; a name that is not UTF-8 (which safetensors refuses as "not valid
    UTF-8", blaming the file) is opened by the operating system and passed on as /dev/fd/N."""
    from safetensors import safe_open

    try:
        str(p).encode()
    except UnicodeEncodeError:
        if not os.path.isdir("/dev/fd"):
            raise CheckpointError(f"cannot read checkpoint {p}: its name is not UTF-8, which safetensors cannot open "
                                  "on this system; rename the file") from None
        fd = os.open(p, os.O_RDONLY)
        try:
            with safe_open(f"/dev/fd/{fd}", framework="pt") as f:
                yield f
        finally:
            os.close(fd)
        return
    with safe_open(str(p), framework="pt") as f:
        yield f


def _head(p: Path, n: int = 16) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _is_safetensors(p: Path) -> bool:
    """By suffix (any case), or by content (:func:`_has_safetensors_header`)."""
    return p.suffix.lower() == ".safetensors" or _has_safetensors_header(p)


def _has_safetensors_header(p: Path) -> bool:
    """An 8-byte header length, then the JSON header."""
    return _head(p, 9)[8:] == b"{"


def _is_onnx(p: Path) -> bool:
    """By content: an ONNX ModelProto opens with its ir_version (protobuf field 1, 3 to 15 so far), then
    another of its fields (producer, domain, graph, opsets, ...)."""
    head = _head(p, 3)
    return len(head) == 3 and head[0] == 0x08 and 3 <= head[1] <= 15 and head[2] in (0x12, 0x1A, 0x22, 0x28, 0x32,
                                                                                     0x3A, 0x42, 0x72)


def _is_torch_file(p: Path) -> bool:
    """What torch.save writes: a zip archive, or (legacy) a pickle that opens with a protocol 2-5 marker."""
    head = _head(p, 4)
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


# What a checkpoint's tensors may be, and what save_model writes them as
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_finite(sd: Mapping[str, torch.Tensor], source: str = "checkpoint",
                 advice: str = "the checkpoint is damaged: retrain or use another one") -> None:
    """Refuse NaN or inf in floating-point weights: such a network writes black or garbage images."""
    bad = [k for k, v in sd.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        names = ", ".join(bad[:4]) + (f", ... (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        raise NonFiniteWeights(f"{source}: {len(bad)} tensor(s) hold NaN or inf values ({names}); {advice}")


# check_header(tensors, config): the network's tensors as meta tensors (names and shapes, no data) and the
# embedded config, to refuse a file before its data is read
HeaderCheck = Callable[[dict[str, torch.Tensor], "dict[str, Any] | None"], None]


def read_checkpoint(path: str | Path, check_header: HeaderCheck | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read any supported file -> (network state_dict with upstream names, embedded config dict or None).

    Refuses files that are not checkpoints, pickles of anything but tensors, and non-finite weights.
    ``check_header`` is called on a safetensors file's header before any tensor is read, so that a file padded
    with tensors no network has is refused without loading them (a torch file is read whole first).
    """
    sd, config, _ = read_checkpoint_file(path, check_header)
    return sd, config


class _FromCheck(Exception):
    """Carries an error the caller's ``check_header`` raised past the handlers that blame the file."""

    def __init__(self, error: Exception):
        self.error = error


def _embedded_config(p: Path, config: Any) -> dict[str, Any] | None:
    """A file's embedded config as a dict (None without one); anything else is a CheckpointError naming ``p``."""
    if config is not None and not isinstance(config, Mapping):
        raise CheckpointError(f"{p}: its embedded {CONFIG_KEY} is a {type(config).__name__}, not a dict of fields")
    return dict(config) if config is not None else None


def read_checkpoint_file(path: str | Path, check_header: HeaderCheck | None = None
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Mapping]:
    """:func:`read_checkpoint`, plus the file's top level as loaded (a Lightning checkpoint's ``global_step``,
    ``optimizer_states``, ...; {} for safetensors), so that a caller needing both reads the file once."""
    p = resolve_path(path)
    if p.suffix.lower() == ".onnx" and p.is_file() and not _is_safetensors(p) and not _is_torch_file(p):
        raise CheckpointError(f"{p} is an ONNX graph, which `moceir restore` and `moceir info` run; here the PyTorch "
                              "checkpoint (.safetensors or .ckpt) it was exported from is needed")
    if p.is_file() and _is_onnx(p) and not _has_safetensors_header(p) and not _is_torch_file(p):
        raise CheckpointError(f"{p} is an ONNX graph named {p.suffix or 'without .onnx'}: rename it to "
                              f"{p.stem}.onnx for `moceir restore` and `moceir info`, which run ONNX graphs; other "
                              "commands need the PyTorch checkpoint (.safetensors or .ckpt) it was exported from")
    obj: Mapping = {}
    try:
        if _is_safetensors(p):
            with _safe_open(p) as f:
                meta = f.metadata() or {}
                config = _embedded_config(p, json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None)
                names = strip_wrappers({k: k for k in f.keys()})  # network name -> name in the file
                if check_header is not None:
                    header = {k: torch.empty(f.get_slice(n).get_shape(), device="meta") for k, n in names.items()}
                    try:
                        check_header(header, config)
                    except Exception as e:  # the caller's own error, not a sign of a damaged file
                        raise _FromCheck(e) from e
                sd = {k: f.get_tensor(n) for k, n in names.items()}
        else:
            with warnings.catch_warnings():  # torch's note on pickle protocols would break the one-line error
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                obj = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(obj, Mapping):
                raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a state_dict or checkpoint")
            config = obj.get(CONFIG_KEY)
            sd = obj.get("state_dict", obj.get("model", obj))
    except CheckpointError:
        raise
    except _FromCheck as e:
        raise e.error from None
    except pickle.UnpicklingError:  # weights_only refused it; torch's advice to disable that is wrong here
        if not _is_torch_file(p):
            raise CheckpointError(f"cannot read checkpoint {p}: not a checkpoint (neither safetensors nor a PyTorch "
                                  "file); check the path") from None
        raise CheckpointError(f"cannot read checkpoint {p}: it holds pickled Python objects besides tensors, which "
                              "moceir never loads (they can run code); re-save it as a state_dict or safetensors"
                              ) from None
    except MemoryError:  # "(is the file complete ...?)" sent the user the wrong way
        raise CheckpointError(f"cannot read checkpoint {p}: out of memory loading its tensors (the file is "
                              f"{p.stat().st_size / 2**30:.2f} GiB); free memory, or check that this is the model "
                              "you meant") from None
    except Exception as e:  # empty or truncated file, wrong format
        if p.stat().st_size == 0:
            raise CheckpointError(f"cannot read checkpoint {p}: the file is empty; check the path") from None
        if not _is_safetensors(p) and not _is_torch_file(p):  # torch's own error (KeyError: 101) says nothing
            raise CheckpointError(f"cannot read checkpoint {p}: not a checkpoint (neither safetensors nor a PyTorch "
                                  "file); check the path") from None
        detail = f": {first_line(e)}" if first_line(e) else ""
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}{detail} "
                              "(is the file complete and a PyTorch/safetensors checkpoint?)") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{p}: its state_dict is a {type(sd).__name__}, not a mapping of names to tensors")
    config = _embedded_config(p, config)
    sd = strip_wrappers({k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)})
    odd = [(k, v.dtype) for k, v in sd.items() if v.dtype not in WEIGHT_DTYPES]
    if odd:  # int8 or bool were cast silently on loading (int8: a network that returns its input); float8: traceback
        more = f" (and {len(odd) - 1} more tensors)" if len(odd) > 1 else ""
        raise CheckpointError(f"{p}: {odd[0][0]} holds {str(odd[0][1]).replace('torch.', '')} values{more}, not "
                              "the floating-point weights of a network (float32, float16, bfloat16 or float64); check "
                              "the path, or re-save the weights in one of those types")
    check_finite(sd, str(p))
    return sd, config, obj


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_config(sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> MoCEConfig:
    """Rebuild the architecture from tensor shapes (upstream checkpoints carry no hyper-parameters).

    ``topk`` and ``with_complexity`` leave no trace in the weights and take the preset defaults.
    A missing tensor, or one whose shape describes no network, raises CheckpointError naming ``source``.
    """
    def shape(key: str, ndim: int = 1) -> tuple[int, ...]:
        """The shape of ``sd[key]``: at least ``ndim`` dimensions, none of them empty."""
        if key not in sd:
            raise CheckpointError(f"{source}: not a MoCE-IR state_dict: it has no tensor {key!r}")
        dims = tuple(sd[key].shape)
        if len(dims) < ndim or 0 in dims:
            raise CheckpointError(f"{source}: not a MoCE-IR state_dict: {key} has shape {list(dims)}")
        return dims

    dim, inp = shape("patch_embed.proj.weight", 4)[:2]
    levels = _count(sd, r"enc\.(\d+)\.") + 1
    num_blocks = [_count(sd, rf"enc\.{i}\.0\.layers\.(\d+)\.") for i in range(levels - 1)]
    num_blocks.append(_count(sd, r"latent\.layers\.(\d+)\."))
    # dec.i (deepest first) serves level levels-2-i
    dec = [_count(sd, rf"dec\.{levels - 2 - lvl}\.2\.layers\.(\d+)\.") for lvl in range(levels - 1)]
    heads = [shape(f"dec.{levels - 2 - lvl}.2.layers.0.shared.temperature")[0] for lvl in range(levels - 1)]
    heads.append(shape("latent.layers.0.mixer.temperature")[0])
    expansion = shape("dec.0.2.layers.0.ffn.project_out.weight", 2)[1] / (dim * 2 ** (levels - 2))
    prefix = f"dec.{levels - 2}.2.layers.0.adapter"
    n_exp = _count(sd, rf"{re.escape(prefix)}\.experts\.(\d+)\.")
    ranks = [shape(f"{prefix}.experts.{i}.0.proj.0.weight")[0] for i in range(n_exp)]
    shape(f"{prefix}.routing.complexity")
    complexity = sd[f"{prefix}.routing.complexity"]
    # a header's meta tensor has no values: "max" then, which shapes no tensor (load_model rebuilds the network
    # with the scale the values give, where it differs)
    complexity = float(complexity.max()) if not complexity.is_meta else 1.0
    base = dict(dim=dim, inp_channels=inp, out_channels=shape("output.weight", 4)[0],
                num_blocks=num_blocks, num_dec_blocks=dec, heads=heads,
                num_refinement_blocks=_count(sd, r"refinement\.layers\.(\d+)\."),
                ffn_expansion_factor=expansion, bias="output.bias" in sd, num_exp_blocks=n_exp,
                complexity_scale="max" if math.isclose(complexity, 1.0, rel_tol=1e-3) else "min")
    try:
        MoCEConfig(**base)
    except ValueError as e:
        raise CheckpointError(f"{source}: not a MoCE-IR state_dict: its tensor shapes describe no network "
                              f"({first_line(e)})") from None
    for rank_type in RANK_TYPES:
        for latent in range(1, 65) if rank_type != "spread" else (2,):
            try:
                cfg = MoCEConfig(**base, rank_type=rank_type, latent_dim=latent)
            except ValueError:
                continue
            if cfg.expert_ranks(cfg.dim) == ranks:
                return cfg
    raise CheckpointError(f"{source}: cannot infer the expert rank rule from ranks {ranks}; the file is damaged or "
                          "not a MoCE-IR model")


# What a configuration may ask for: far above every published MoCE-IR, far below what exhausts a machine.
CONFIG_LIMITS = {"dim": 512, "levels": 6, "blocks_per_level": 64, "heads": 64, "num_exp_blocks": 8,
                 "num_refinement_blocks": 64, "ffn_expansion_factor": 8.0}
SHAPE_FIELDS = ("dim", "inp_channels", "out_channels", "num_blocks", "num_dec_blocks", "heads",
                "num_refinement_blocks", "bias", "num_exp_blocks")


def config_from_dict(d: Mapping[str, Any], source: str = "checkpoint") -> MoCEConfig:
    """Validate an embedded configuration (types, by MoCEConfig, and CONFIG_LIMITS) before anything is built."""
    try:
        config = MoCEConfig.from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: its embedded {CONFIG_KEY} is not a valid configuration "
                              f"({first_line(e)}); re-export the checkpoint, or name its architecture "
                              "(--model in test and routing, config= in load_model)") from None
    lim = CONFIG_LIMITS
    too_big = [name for name, bad in (
        ("dim", not 1 <= config.dim <= lim["dim"]),
        ("num_blocks", config.levels > lim["levels"] or max(config.num_blocks) > lim["blocks_per_level"]),
        ("num_dec_blocks", max(config.num_dec_blocks) > lim["blocks_per_level"]),
        ("heads", max(config.heads) > lim["heads"] or min(config.heads) < 1),
        ("num_exp_blocks", not 1 <= config.num_exp_blocks <= lim["num_exp_blocks"]),
        ("num_refinement_blocks", config.num_refinement_blocks > lim["num_refinement_blocks"]),
        ("ffn_expansion_factor", not 0 < config.ffn_expansion_factor <= lim["ffn_expansion_factor"]),
    ) if bad]
    if too_big:
        raise CheckpointError(f"{source}: its embedded {CONFIG_KEY} asks for {', '.join(too_big)} beyond moceir's "
                              f"limits {CONFIG_LIMITS}; the file is damaged or not a MoCE-IR model")
    return config


def architecture_differences(a: MoCEConfig, b: MoCEConfig) -> list[tuple[str, str, str]]:
    """Where networks of configs ``a`` and ``b`` differ in shape: (what, as ``a`` has it, as ``b`` has it) for each
    of SHAPE_FIELDS and ffn_expansion_factor (beyond 2%, as inferring it from weights allows), else for the expert
    ranks; [] when the same weights fit both."""
    diff = [(f, repr(getattr(a, f)), repr(getattr(b, f))) for f in SHAPE_FIELDS if getattr(a, f) != getattr(b, f)]
    if not math.isclose(a.ffn_expansion_factor, b.ffn_expansion_factor, rel_tol=0.02):
        diff.append(("ffn_expansion_factor", f"{a.ffn_expansion_factor:.3g}", f"{b.ffn_expansion_factor:.3g}"))
    if not diff and a.expert_ranks(a.dim) != b.expert_ranks(b.dim):
        diff.append(("expert ranks", str(a.expert_ranks(a.dim)), str(b.expert_ranks(b.dim))))
    return diff


def check_config_matches(config: MoCEConfig, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse an embedded config that contradicts the tensor shapes, before a network is built from it."""
    diff = [f"{what} {mine} but the weights say {theirs}"
            for what, mine, theirs in architecture_differences(config, infer_config(sd, source))]
    if diff:
        raise CheckpointError(f"{source}: its embedded {CONFIG_KEY} contradicts its weights ({'; '.join(diff)}); "
                              "the file is damaged or was edited")


def load_state_dict_strict(model: MoCEIR, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``sd`` into ``model``; on any mismatch raise CheckpointError naming the keys."""
    check_state_dict_matches(model, sd, source)
    model.load_state_dict(sd, strict=True)


def check_state_dict_matches(model: MoCEIR, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the missing, unexpected and mis-shaped keys of ``sd`` (shapes only: meta
    tensors do)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        def show(name: str, items: list[str]) -> str:
            head = ", ".join(items[:8]) + (f", ... (+{len(items) - 8} more)" if len(items) > 8 else "")
            return f"{len(items)} {name}: [{head}]"
        parts = [show(n, i) for n, i in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if i]
        raise CheckpointError(f"{source} does not match the network ({model.config.dim=}): " + "; ".join(parts))


def load_model(path: str | Path = "default", device: str | torch.device = "cpu",
               config: MoCEConfig | None = None, channels_last: bool = True, **overrides: Any) -> MoCEIR:
    """Build the network described by a checkpoint and load its weights, strictly; returns it in eval mode.

    ``path`` may be an upstream Lightning ``last.ckpt``, our checkpoint, a plain state_dict, a
    ``.safetensors`` file or ``"default"`` (the bundled model). ``config`` (a MoCEConfig or a dict of its
    fields) replaces the embedded or
    inferred configuration; ``overrides`` change fields of it (e.g. ``eval_router_noise=True``).
    ``channels_last`` (default) stores the weights channels-last: the same outputs, faster convolutions.
    """
    if isinstance(config, Mapping):  # e.g. a settings.json's "config"; unlike a file's, unknown fields are refused
        config = MoCEConfig().replace(**config)
    elif config is not None and not isinstance(config, MoCEConfig):
        raise TypeError(f"config must be a MoCEConfig (moceir.get_config) or a dict of its fields, not "
                        f"{type(config).__name__}")
    if problem := not_a_bool("channels_last", channels_last):
        raise TypeError(problem)
    # before building: a CUDA request on a CPU machine is one line, not a traceback
    device = resolve_device("cpu" if device is None else device)
    built: list[MoCEIR] = []

    def check_header(tensors: dict[str, torch.Tensor], embedded: dict[str, Any] | None) -> None:
        built.append(MoCEIR(_network_config(tensors, embedded, config, overrides, str(path))))
        check_state_dict_matches(built[0], tensors, str(path))

    sd, embedded = read_checkpoint(path, check_header)
    final = _network_config(sd, embedded, config, overrides, str(path))
    model = built[0] if built and built[0].config == final else MoCEIR(final)  # a header cannot tell the scale
    load_state_dict_strict(model, sd, source=str(path))
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _network_config(sd: Mapping[str, torch.Tensor], embedded: dict[str, Any] | None, config: MoCEConfig | None,
                    overrides: Mapping[str, Any], source: str) -> MoCEConfig:
    """The config to build: ``config`` if given, else the embedded one (checked against the weights' shapes),
    else one inferred from the weights; then ``overrides``."""
    if config is None:
        if embedded:
            config = config_from_dict(embedded, source)
            check_config_matches(config, sd, source)
        else:
            config = infer_config(sd, source)
    return config.replace(**overrides) if overrides else config


def check_output_path(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse to write ``path`` if that would clobber what is there: an existing file or link (unless
    ``overwrite``: then a link is replaced, never followed), a folder, or a file where a parent folder should be."""
    if problem := not_a_bool("overwrite", overwrite):  # the file replaced on a "no"
        raise TypeError(problem)
    path = Path(path)
    if os.path.lexists(path):
        if path.is_dir() and not path.is_symlink():
            raise OutputPathError(f"{path} is a folder; give the output a file name")
        if not overwrite:
            what = " (a link)" if path.is_symlink() else ""
            raise OutputPathError(f"{path} exists{what}; remove it or choose another name, or pass overwrite=True "
                                  "(--overwrite) to replace it")
    ancestor = next((a for a in path.parents if os.path.lexists(a)), None)
    if ancestor is not None and not ancestor.is_dir():
        raise OutputPathError(f"{ancestor} is not a folder, so {path} cannot be written; choose another path")
    return path


def write_output(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """:func:`moceir.io.write_atomically` into ``path`` (its folder made first); ``path`` has passed
    :func:`check_output_path`. A full disk or a read-only or unwritable folder raises its OSError, naming ``path``
    (the CLI prints it in one line, exit 1); other write failures are a one-line CheckpointError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write, overwrite)
    except OSError as e:
        if write_error_advice(e.errno, "path") is not None:
            raise
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}; choose another path") from None
    return path


# Names save_model refuses: `moceir restore` would take the file for an image, load_model for an ONNX network.
OTHER_FORMAT_SUFFIXES = WRITABLE_EXTS + (".onnx",)


def save_model(model: MoCEIR, path: str | Path, dtype: torch.dtype | None = None, note: str | None = None,
               overwrite: bool = False) -> Path:
    """Write the network as safetensors with its config embedded (``dtype`` e.g. torch.float16 to halve it).

    ``note`` is stored in the metadata; :func:`load_model` callers such as the CLI print it. An existing
    ``path`` raises OutputPathError (a FileExistsError) unless ``overwrite`` (as ``moceir export``), see
    :func:`check_output_path`; the write is atomic.
    """
    from safetensors.torch import save

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: save the network it compiled
    if not isinstance(model, MoCEIR):
        what = "a state_dict (it has no config to embed)" if isinstance(model, Mapping) else type(model).__name__
        raise TypeError(f"save_model takes a MoCEIR network, not {what}; build one with create_model (then "
                        "load_state_dict) or load_model")
    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, WEIGHT_DTYPES))} or None, not {dtype!r}: other "
                         "types truncate the weights or cannot be read back")
    suffix = Path(path).suffix.lower()
    if suffix in OTHER_FORMAT_SUFFIXES:
        raise OutputPathError(f"{path}: save_model writes safetensors, which a {suffix} name would pass off as "
                              f"{'an ONNX file' if suffix == '.onnx' else 'an image'}; name it .safetensors")
    state = model.state_dict()
    meta = [k for k, v in state.items() if v.is_meta]
    if meta:
        more = f" and {len(meta) - 1} more tensors are" if len(meta) > 1 else " is"
        raise ValueError(f"the network has no weights to save: {meta[0]}{more} on the meta "
                         "device; load or initialise them first (model.to_empty(device=...), then load_state_dict)")
    path = check_output_path(path, overwrite)
    check_finite(state, "the network to save",
                 "nothing was written: such a network restores to black or noise (did training diverge?)")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in state.items()}
    if dtype is not None:
        check_finite(sd, f"the network cast to {dtype}", "its finite weights overflow that type; nothing was "
                     "written: keep float32 or use bfloat16 (moceir export --dtype fp32 or bf16)")
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict()), "format": "moceir"}
    if note:
        metadata["note"] = note
    # serialised in memory, then written by Python: safetensors' own file writer reports a full disk as a
    # SafetensorError, not as the OSError it is
    return write_output(path, lambda tmp: tmp.write_bytes(save(sd, metadata=metadata)), overwrite)
