"""Inference by CUDA-graph replay: one captured forward per input shape, a few kept at a time.

A captured graph launches a whole forward at once, which removes the host work that bounds small-image inference on
a GPU (window 3, H200, MoCE-IR-S at 256², batch 1: 88.7 ms eager, 17.8 ms as the benchmark's replayed graph;
docs/performance.md). A graph fixes its shapes, so each input shape (and dtype, memory format, autocast state,
forced-expert shape) gets its own, captured the second time that shape is seen: a folder of photos of all sizes runs
eagerly, while the tiles of large images, or a data set of one size, replay. Capture needs a forward without host
synchronisation, so the network's experts use the dense dispatch.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, NamedTuple, TypeVar

import torch

from .models import MoCEIR

Outputs = tuple[torch.Tensor, torch.Tensor]  # (image [B, 3, H, W], expert indices [layers, B, k])
Capture = Callable[[Callable[[], Outputs]], tuple[Callable[[], None], Outputs]]
T = TypeVar("T")
MAX_KEYS_REMEMBERED = 1024  # sightings kept for at most this many input keys (the least recent forgotten)


def capture_cuda_graph(fn: Callable[[], T], warm_up: bool = True) -> tuple[Callable[[], None], T]:
    """Capture ``fn`` in a CUDA graph on the current device -> (replay, the graph's output tensors).

    ``fn`` must read only tensors that outlive the graph and must not synchronise with the host. The outputs hold
    nothing until the first replay, and every replay rewrites them. ``warm_up``: run ``fn`` once on the capture
    stream first, as capture asks (lazy initialisation, workspaces, FFT plans); a caller whose ``fn`` changes state
    (a training step) warms up and undoes that itself.
    """
    device = torch.cuda.current_device()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    graph = torch.cuda.CUDAGraph()
    # The outer stream context restores the caller's stream even when capture fails (the graph's own exit does not).
    with torch.cuda.stream(side):
        if warm_up:
            fn()
        # thread_local: CUDA calls of other threads (the training loader's pin-memory thread allocating pinned
        # memory) do not invalidate the capture, as they would in the default "global" mode
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            outputs = fn()
    torch.cuda.current_stream(device).wait_stream(side)
    return graph.replay, outputs


def capture_failure(e: RuntimeError) -> tuple[BaseException, str, bool]:
    """What a failed capture says -> (the error that caused it, its first line (at most 200 characters), whether
    memory ran out). A failed capture's own error (capture_end) hides the one that caused it, as its context."""
    cause = e.__context__ or e
    lines = str(cause).strip().splitlines()
    reason = lines[0][:200] if lines else type(cause).__name__
    return cause, reason, isinstance(e, torch.OutOfMemoryError) or isinstance(cause, torch.OutOfMemoryError)


@dataclass
class GraphedOutput:
    """What :class:`GraphedNetwork` returns with ``return_aux``: image [B, 3, H, W], expert_indices [layers, B, k]."""

    image: torch.Tensor
    expert_indices: torch.Tensor


class GraphKey(NamedTuple):
    """What a captured graph is specific to."""

    shape: tuple[int, ...]
    channels_last: bool  # the memory format, not the strides: a tile is a view of its image, its static copy dense
    dtype: torch.dtype
    device: torch.device
    autocast: tuple  # (enabled, dtype) on CUDA and CPU
    forced: tuple | None  # (shape, dtype) of forced experts, or None


@dataclass
class _Graph:
    replay: Callable[[], None]
    x: torch.Tensor  # the static input that every replay reads
    experts: torch.Tensor | None  # the static forced experts, or None
    outputs: Outputs  # rewritten by every replay


class GraphedNetwork:
    """A :class:`MoCEIR` behind the calls that restore_tensor makes (``net(x, return_aux, experts)``), replaying a
    captured CUDA graph per input key.

    ``max_graphs`` graphs are kept, the least recently used dropped first: each holds the memory of one forward at
    its shape. ``capture_after`` is the sighting of a key that captures it (1: the first). When a capture runs out of
    memory, the kept graphs are dropped and that key stays eager; when an eager call runs out of memory, the kept
    graphs are dropped and it runs once more. A capture that fails for another reason turns capture off for this
    network (``disabled`` says why, ``log`` is told once) and every call runs eagerly. ``capture`` is
    :func:`capture_cuda_graph`; tests give a stand-in that runs on the CPU. Outputs are copies, so a later call
    never changes an earlier result. The network is put in eval mode with the dense dispatch.
    """

    def __init__(self, model: MoCEIR, max_graphs: int = 2, capture_after: int = 2, capture: Capture | None = None,
                 log: Callable[[str], None] | None = None):
        if max_graphs < 1 or capture_after < 1:
            raise ValueError(f"max_graphs and capture_after must be >= 1, got {max_graphs} and {capture_after}")
        self.model = model.eval().set_dispatch("dense")
        self.config, self.num_moe_layers = model.config, model.num_moe_layers
        self.max_graphs, self.capture_after = max_graphs, capture_after
        self._capture = capture or capture_cuda_graph
        self._log = log or (lambda line: None)
        self._graphs: OrderedDict[GraphKey, _Graph] = OrderedDict()
        self._seen: OrderedDict[GraphKey, int] = OrderedDict()
        self._eager_keys: set[GraphKey] = set()  # keys whose capture ran out of memory
        self.disabled: str | None = None
        self.captures = 0  # graphs captured so far (for reports and tests)
        self.replays = 0

    training = False  # graphs are captured in eval mode; :func:`moceir.restore` reads this

    def eval(self) -> "GraphedNetwork":
        """Already in eval mode (for callers that call ``net.eval()``)."""
        return self

    def train(self, mode: bool = True) -> "GraphedNetwork":
        """Eval mode only: ``train(False)`` is accepted (as :func:`moceir.restore` restores the mode it found)."""
        if mode:
            raise ValueError("a GraphedNetwork replays eval-mode graphs; train the MoCEIR it wraps instead")
        return self

    def parameters(self):
        """The wrapped network's parameters (callers read the device from them)."""
        return self.model.parameters()

    @staticmethod
    def _key(x: torch.Tensor, experts: torch.Tensor | None) -> GraphKey:
        dev = x.device.type
        autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) if dev in ("cuda", "cpu") else ()
        forced = None if experts is None else (tuple(experts.shape), experts.dtype)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        return GraphKey(tuple(x.shape), channels_last, x.dtype, x.device, autocast, forced)

    def _forward(self, x: torch.Tensor, experts: torch.Tensor | None) -> Outputs:
        dev = x.device.type
        # Autocast's cache of cast weights would hand a graph tensors that die with the caller's autocast context.
        with torch.autocast(dev, dtype=torch.get_autocast_dtype(dev), enabled=torch.is_autocast_enabled(dev),
                            cache_enabled=False):
            out = self.model(x, return_aux=True, experts=experts)
        return out.image, out.expert_indices

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, return_aux: bool = False,
                 experts: torch.Tensor | None = None) -> torch.Tensor | GraphedOutput:
        """x: [B, 3, H, W] (H, W multiples of ``config.size_multiple``); experts: [layers, B] or [layers, B, k] to
        force each MoE layer's choice -> the image, or with ``return_aux`` a :class:`GraphedOutput`."""
        key = self._key(x, experts)
        graph = self._graphs.get(key)
        if graph is None:
            seen = self._seen.pop(key, 0) + 1
            self._seen[key] = seen  # now the most recent key, so the trim below never drops it
            if len(self._seen) > MAX_KEYS_REMEMBERED:
                self._seen.popitem(last=False)
            if seen >= self.capture_after and self.disabled is None and key not in self._eager_keys:
                graph = self._try_capture(key, x, experts)
        if graph is None:
            image, indices = self._eager(x, experts)
        else:
            image, indices = self._replay(key, graph, x, experts)
        return GraphedOutput(image, indices) if return_aux else image

    def _replay(self, key: GraphKey, graph: _Graph, x: torch.Tensor, experts: torch.Tensor | None) -> Outputs:
        self._graphs.move_to_end(key)
        graph.x.copy_(x)
        if experts is not None:
            graph.experts.copy_(experts)
        try:
            with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
                graph.replay()
        except RuntimeError:
            del self._graphs[key]  # a graph that failed once is not trusted again
            raise
        self.replays += 1
        image, indices = graph.outputs
        return image.clone(), indices.clone()

    def _eager(self, x: torch.Tensor, experts: torch.Tensor | None) -> Outputs:
        try:
            return self._forward(x, experts)
        except torch.OutOfMemoryError:
            if not self._graphs:
                raise
        self.clear()  # the kept graphs' memory may be what this forward lacked
        return self._forward(x, experts)

    def _try_capture(self, key: GraphKey, x: torch.Tensor, experts: torch.Tensor | None) -> _Graph | None:
        while len(self._graphs) >= self.max_graphs:
            dropped, _ = self._graphs.popitem(last=False)
            self._seen.pop(dropped, None)  # seen again, it waits for its sightings like a new key
        fmt = torch.channels_last if key.channels_last else torch.contiguous_format
        static_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        static_x.copy_(x)
        static_e = None if experts is None else experts.to(x.device).clone()
        failure = None
        try:
            with torch.cuda.device(x.device) if x.is_cuda else nullcontext():  # capture on the input's GPU
                replay, outputs = self._capture(lambda: self._forward(static_x, static_e))
        except RuntimeError as e:  # out of memory, or e.g. an operation that cannot be captured
            _, reason, out_of_memory = capture_failure(e)
            if out_of_memory:
                self._eager_keys.add(key)
                failure = "memory"
            else:
                self.disabled = f"CUDA graph capture failed ({reason}); running eagerly from here on"
                failure = "error"
        if failure is not None:
            self.clear()  # outside the except block, so the failed graph's memory is no longer referenced
            if failure == "error":
                self._log(f"note: {self.disabled}")
            return None
        self.captures += 1
        graph = _Graph(replay, static_x, static_e, outputs)
        self._graphs[key] = graph
        return graph

    def clear(self) -> None:
        """Drop every kept graph and hand its memory back to the allocator."""
        self._graphs.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
