"""Block-by-block calibration passes with offload (llm-compressor's sequential pipeline).

:class:`SequentialRunner` is a drop-in :class:`~vtquant.core.pipeline.PassRunner`: every calibration
pass of the pipeline (sink statistics, templates, Hessians, activation scales, clip search, the
structure check) runs through it unchanged, but instead of one whole-model forward per batch it

1. runs the model up to its first block once per batch, with every block replaced by a stub that
   records the block's call (hidden state, positional and keyword arguments: attention mask, rotary
   position embeddings ...) and passes the hidden state through, so no block weight is touched;
2. moves block ``l`` to the execution device, runs *all* cached batches through it (the block's
   own hooks fire as in a whole-model pass: probes, detectors, guards, observers), replaces each
   batch's hidden state by the block's output, calls ``after_block(l)`` (the pipeline quantizes
   block ``l``'s weights there from its Hessians, then frees them) and moves the block back;
3. calls ``after()`` once per batch, as the whole-model runner does after each forward.

Only one block's weights (and, with GPTQ, one block's Hessians) are on the accelerator at a time;
the hidden states of all batches are cached (on ``cache_device``).  The final norm and head are not
run: no calibration statistic reads them.

Sink state.  The sink set of a forward pass is decided at the stage layers and read by every
later layer, per batch.  Since a sequential pass interleaves batches, the per-call fields of every
:class:`~vtquant.core.sinks.SinkState` of the model (mask, types, which stage found what) are saved
after each (batch, block) step and restored before the next step of the same batch, so each batch
sees exactly the sink set its own earlier blocks produced.

Equivalence.  Every block sees the same inputs as in the whole-model pass and every per-module
statistic is accumulated in the same batch order, so plans and logits are identical to the
whole-model pipeline (tested on tiny models).  One exception: the activation clip search draws
its random row sample (when a batch holds more rows than ``rows_per_batch``) from one generator in
call order, which differs between the two orders of execution; the samples then differ, not their
distribution.

References (read, not copied): llm-compressor ``pipelines/sequential/pipeline.py`` (subgraphs
traced with torch.fx, cached intermediates, ``IntermediatesCache`` offloaded to the CPU) and its
``pipelines/layer_sequential`` predecessor (capture the first layer's inputs with an early stop,
then layer by layer).  Here the capture stubs every block instead of tracing, which handles
per-layer keyword arguments (sliding-window masks of alternating layers) without torch.fx.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .modules import replace_module
from .sinks import SinkState

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter

_PER_CALL_FIELDS = ("mask", "types", "known_types", "found_by", "is_prefill")
"""The fields of a :class:`SinkState` that belong to one forward call (saved and restored per batch)."""


class _StopCapture(Exception):
    """Raised by the last block's stub: the rest of the model is not needed for the capture."""


class _BlockStub(nn.Module):
    """Stands in for a block during the capture: records the call, returns the hidden state.

    Attribute reads it does not have go to the real block (a decoder may read e.g. the block's
    ``attention_type`` to pick its mask).
    """

    def __init__(self, block: nn.Module, index: int, calls: list, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_vt_block", block)  # not a submodule: its hooks must not fire
        object.__setattr__(self, "_vt_calls", calls)
        self.index = index
        self.last = last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_vt_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest, by_name = args[0], tuple(args[1:]), False
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, rest, by_name = kwargs.pop("hidden_states"), (), True
        else:
            raise RuntimeError(f"sequential calibration: block {self.index} was called without a hidden state "
                               f"(keyword arguments {sorted(kwargs)}); use pipeline='basic' for this model")
        self._vt_calls.append((hidden, rest, kwargs, by_name))
        if self.last:
            raise _StopCapture
        return hidden


def _to_device(obj: Any, device: Optional[torch.device], memo: dict) -> Any:
    """``obj`` with every tensor (in tuples, lists, dicts) on ``device``; shared tensors stay shared."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device))  # keep obj alive so its id is not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, memo) for k, v in obj.items()}
    return obj


def sink_states(model: nn.Module) -> list[SinkState]:
    """Every :class:`SinkState` reachable from the model's modules (known-sink site, detectors, guards)."""
    found: dict[int, SinkState] = {}
    for module in model.modules():
        for attr in ("vtquant_sink_state", "state"):
            value = module.__dict__.get(attr)
            if isinstance(value, SinkState):
                found[id(value)] = value
    return list(found.values())


def _snapshot(states: list[SinkState], device: Optional[torch.device] = None) -> list[dict]:
    memo: dict = {}
    return [{k: _to_device(getattr(s, k, None), device, memo) for k in _PER_CALL_FIELDS} for s in states]


def _restore(states: list[SinkState], snapshots: list[dict]) -> None:
    for state, snap in zip(states, snapshots):
        for k, v in snap.items():
            setattr(state, k, v)
        state.generation = getattr(state, "generation", 0) + 1  # a new sink set for every cache keyed on it
        state._index_key = None


class _Cached:
    """One calibration batch between blocks: its hidden state, per-block call arguments, sink state."""

    __slots__ = ("hidden", "calls", "snapshots")

    def __init__(self, hidden: torch.Tensor, calls: list, snapshots: list) -> None:
        self.hidden = hidden
        self.calls = calls
        self.snapshots = snapshots


def _device_of(module: nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


class SequentialRunner:
    """Runs calibration passes block by block (see the module docstring).

    Args:
        adapter: the model's adapter (blocks, how to run a batch, where a block's output is).
        batches: the calibration batches.
        quiet: no progress bars.
        device: where each block runs; ``None`` runs every block where it already is (no offload,
            only the one-block-at-a-time order, e.g. for a model already on the GPU).  Blocks are
            moved back to where they were after their step.
        cache_device: where the cached hidden states wait between blocks (default: ``device``;
            ``"cpu"`` for long calibration sets on a small GPU).
    """

    sequential = True

    def __init__(self, adapter: "ModelAdapter", batches: list, quiet: bool = False,
                 device: Union[str, torch.device, None] = None,
                 cache_device: Union[str, torch.device, None] = None) -> None:
        self.adapter = adapter
        self.batches = batches
        self.quiet = quiet
        self.device = torch.device(device) if device is not None else None
        self.cache_device = torch.device(cache_device) if cache_device is not None else self.device
        self.passes = 0

    # ---- capture ------------------------------------------------------------------------------
    def _capture(self, batch: Any, blocks: list, names: list, states: list) -> _Cached:
        calls: list = []
        model = self.adapter.model
        stubs = [_BlockStub(b, i, calls, i == len(blocks) - 1) for i, b in enumerate(blocks)]
        replaced = []
        try:
            for name, stub in zip(names, stubs):
                replaced.append((name, replace_module(model, name, stub)))
            try:
                self.adapter.forward(batch)
            except _StopCapture:
                pass
        finally:
            for name, block in reversed(replaced):
                replace_module(model, name, block)
        if len(calls) != len(blocks):
            raise RuntimeError(f"sequential calibration: the model called {len(calls)} of its {len(blocks)} blocks "
                               "(the adapter's blocks() must be every block, each called once per forward); "
                               "use pipeline='basic' for this model")
        memo: dict = {}
        hidden = _to_device(calls[0][0], self.cache_device, memo)
        per_block = [(_to_device(rest, self.device, memo), _to_device(kwargs, self.device, memo), by_name)
                     for _, rest, kwargs, by_name in calls]
        return _Cached(hidden, per_block, _snapshot(states, self.device))

    # ---- one pass -----------------------------------------------------------------------------
    def _step(self, block: nn.Module, li: int, cached: list) -> None:
        """Every cached batch through block ``li``: its output replaces the batch's hidden state."""
        states = sink_states(self.adapter.model)
        for item in cached:
            _restore(states, item.snapshots)
            rest, kwargs, by_name = item.calls[li]
            hidden = item.hidden if self.device is None else item.hidden.to(self.device)
            out = block(hidden_states=hidden, **kwargs) if by_name else block(hidden, *rest, **kwargs)
            new_hidden = self.adapter.block_output(out)
            item.hidden = new_hidden if self.cache_device is None else new_hidden.to(self.cache_device)
            item.snapshots = _snapshot(states)

    def run(self, desc: str, after: Optional[Callable[[], None]] = None,
            after_block: Optional[Callable[[int], None]] = None, rerun_after_block: bool = False) -> None:
        """One pass over every batch, block by block.

        Args:
            desc: progress bar label.
            after: called once per batch at the end of the pass, with that batch's sink state in place.
            after_block: ``after_block(layer)`` once block ``layer`` has run every batch (it is still
                on the execution device then).
            rerun_after_block: after ``after_block(layer)`` (which may change the block, e.g. quantize its
                weights), run every batch through the block again from the same inputs and sink state,
                and pass *those* outputs on (GPTQ's sequential order: later blocks see the quantized ones).
        """
        self.passes += 1
        model = self.adapter.model
        blocks = self.adapter.blocks()
        module_names = {id(m): n for n, m in model.named_modules()}
        missing = [i for i, b in enumerate(blocks) if id(b) not in module_names]
        if missing:
            raise RuntimeError(f"sequential calibration: blocks {missing} are not submodules of the model")
        names = [module_names[id(b)] for b in blocks]
        states = sink_states(model)
        with torch.no_grad():
            cached = [self._capture(batch, blocks, names, states)
                      for batch in tqdm(self.batches, desc=f"{desc} (inputs)", disable=self.quiet, leave=False)]
            for li, block in enumerate(tqdm(blocks, desc=desc, disable=self.quiet, leave=False)):
                home = _device_of(block)
                moved = self.device is not None and home is not None and home != self.device
                if moved:
                    block.to(self.device)
                try:
                    inputs = [(item.hidden, item.snapshots) for item in cached] if rerun_after_block else None
                    self._step(block, li, cached)
                    if after_block is not None:
                        after_block(li)
                    if inputs is not None:
                        for item, (hidden, snapshots) in zip(cached, inputs):
                            item.hidden, item.snapshots = hidden, snapshots
                        self._step(block, li, cached)
                finally:
                    if moved:
                        block.to(home)
            for item in cached:
                _restore(states, item.snapshots)
                if after is not None:
                    after()
