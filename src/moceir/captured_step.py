"""The training step captured in one CUDA graph: forward, loss, backward and AdamW, replayed for every batch.

Eager training launches a few thousand kernels per step from Python; a replayed graph launches them at once. Window
3 (one H200, MoCE-IR-S, 128² patches, fp32) measured the benchmark's earlier hand-written version of this step at
67.4 patches/s against 50.2 eager at batch 16, and 85.6 against 81.3 at batch 64 (docs/gpu-window.md); this class
has not run on a GPU yet. ``moceir train --cuda_graphs`` trains with it, and ``benchmarks/train_throughput.py``'s
graphs rows time it. What capture asks of a step, and how this one meets it:

- fixed shapes: the training loader drops its last incomplete batch; a batch of another shape is an error;
- no host synchronisation: dense expert dispatch; callers read the loss from copies, later;
- fixed memory: each batch is copied into the buffers the graph reads; the graph's backward writes the gradients
  (they were unset at capture), so they are never zeroed or unset between steps;
- AdamW's state on the device: ``capturable`` on CUDA, and the learning rate a device tensor, which Lightning's
  scheduler fills in place each step (a float would be frozen into the graph);
- autocast without its cast cache (cast weights must not outlive the capture).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from .cuda_graphs import capture_cuda_graph, capture_failure
from .models import MoCEIR
from .models.network import MoCEOutput

LossFn = Callable[[MoCEOutput, torch.Tensor], dict[str, torch.Tensor]]
Parts = dict[str, torch.Tensor]
Capture = Callable[[Callable[[], Parts]], tuple[Callable[[], None], Parts]]


class CaptureError(RuntimeError):
    """Capturing the step failed (its warm-up ran); the message is the operation's own error. ``out_of_memory``
    says whether memory ran out during the capture."""

    def __init__(self, message: str, out_of_memory: bool = False):
        super().__init__(message)
        self.out_of_memory = out_of_memory


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Put an Adam-family optimizer's learning rate and step counts on ``device`` (in place, for capture).

    Also undoes what loading a state dict of an uncaptured run did (a float rate, ``capturable`` off, CPU steps).
    """
    for group in optimizer.param_groups:
        group["capturable"] = device.type == "cuda"  # capturable AdamW asserts a CUDA device
        lr = group["lr"]
        group["lr"] = (lr.to(device, torch.float32) if torch.is_tensor(lr)
                       else torch.tensor(float(lr), dtype=torch.float32, device=device))
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].to(device, torch.float32)


def portable_optimizer_state(state: dict) -> dict:
    """A copy of ``optimizer.state_dict()`` whose groups hold a float learning rate and ``capturable`` off, so an
    uncaptured run, or one on the CPU, can resume from it (one host sync per tensor rate)."""
    groups = [{**g, "lr": float(g["lr"]) if torch.is_tensor(g["lr"]) else g["lr"], "capturable": False}
              for g in state.get("param_groups", [])]
    return {**state, "param_groups": groups}


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class CapturedTrainStep:
    """One optimizer step of ``net`` per call, ``(lq, gt)`` -> loss parts (copies), replayed from a CUDA graph.

    The first call warms up (``warmup_steps`` steps on the capture stream: cuDNN and cuFFT plans, the optimizer's
    state), undoes them (weights, optimizer state and random state put back: training counts replayed steps
    only), then captures and replays. ``loss_fn(output, gt)`` returns the loss parts with the total under "loss".
    ``autocast_dtype``: None runs fp32. ``capture`` is :func:`capture_cuda_graph` without its own warm-up; tests
    give a stand-in that runs on the CPU.
    """

    def __init__(self, net: MoCEIR, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 autocast_dtype: torch.dtype | None = None, capture: Capture | None = None, warmup_steps: int = 3):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.net, self.optimizer, self.loss_fn = net.set_dispatch("dense"), optimizer, loss_fn
        self.autocast_dtype, self.warmup_steps = autocast_dtype, warmup_steps
        self._capture = capture or (lambda fn: capture_cuda_graph(fn, warm_up=False))
        self._replay: Callable[[], None] | None = None
        self._lq: torch.Tensor | None = None
        self._gt: torch.Tensor | None = None
        self._parts: Parts = {}
        self.replays = 0

    def _step(self) -> Parts:
        dev = self._lq.device.type
        with torch.autocast(dev, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):
            out = self.net(self._lq)
            parts = self.loss_fn(out, self._gt)
        parts["loss"].backward()
        self.optimizer.step()
        return {name: t.detach() for name, t in parts.items()}

    @torch.no_grad()
    def _snapshot(self) -> tuple[dict, dict]:
        weights = {k: v.clone() for k, v in self.net.state_dict().items()}
        state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in self.optimizer.state.items()}
        return weights, state

    @torch.no_grad()
    def _restore(self, weights: dict, state: dict) -> None:
        """Copy in place (the graph keeps the tensors' addresses); optimizer state made by the warm-up is zeroed,
        which is a fresh AdamW's first step."""
        for k, v in self.net.state_dict().items():
            v.copy_(weights[k])
        for p, s in self.optimizer.state.items():
            for k, v in s.items():
                if not torch.is_tensor(v):
                    continue
                if p in state:
                    v.copy_(state[p][k])
                else:
                    v.zero_()

    def _setup(self, lq: torch.Tensor, gt: torch.Tensor) -> None:
        device = lq.device
        make_capturable(self.optimizer, device)
        self._lq, self._gt = lq.clone(), gt.clone()  # clone keeps the memory format (channels-last)
        weights, state = self._snapshot()
        rng = _rng_state(device)
        on_device = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
        with on_device:
            side = torch.cuda.Stream(device) if device.type == "cuda" else None
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side) if side is not None else nullcontext():
                for _ in range(self.warmup_steps):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._step()
            if side is not None:
                torch.cuda.current_stream(device).wait_stream(side)
            self._restore(weights, state)
            self.optimizer.zero_grad(set_to_none=True)  # so the captured backward writes the gradients
            try:
                self._replay, self._parts = self._capture(self._step)
            except RuntimeError as e:
                cause, reason, out_of_memory = capture_failure(e)
                if not isinstance(cause, RuntimeError):  # a bug (TypeError, AssertionError, ...): its traceback
                    raise
                raise CaptureError(reason, out_of_memory=out_of_memory) from e
        _set_rng_state(device, rng)  # the first replay draws the router noise an eager first step would

    def __call__(self, lq: torch.Tensor, gt: torch.Tensor) -> Parts:
        """lq, gt: [B, 3, P, P] on the training device -> {"loss", "l1", "balance"[, "fft"]}: [] each (copies)."""
        if self._replay is None:
            self._setup(lq, gt)
        elif lq.shape != self._lq.shape or gt.shape != self._gt.shape:
            raise ValueError(f"a captured training step takes batches of {tuple(self._lq.shape)}, got "
                             f"{tuple(lq.shape)}; use a loader that drops its last incomplete batch")
        self._lq.copy_(lq)
        self._gt.copy_(gt)
        self._replay()
        self.replays += 1
        return {name: t.clone() for name, t in self._parts.items()}
