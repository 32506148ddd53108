"""Recording a network's layers: forward hooks and the summary of each output per image.

A layer's output becomes one value per neuron and image (``summarize``): conv maps are pooled
over space (mean or max), ViT token outputs give their CLS token, 2-D outputs are used as they
are. ``LayerRecorder`` hooks the chosen layers for the images stage (dissect_tui.image_pass).
Separate from target loading (targets.py), which decides *which* layers exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dissect_tui.errors import UserError

POOLS = ("mean", "max")


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):  # ModelOutput-style mappings
        for item in output.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def summarize(output: Any, pool: str = "mean") -> torch.Tensor:
    """One value per neuron and image: [B, K] float32.

    >=4-D [B, C, *spatial] (conv maps): mean (default) or max over the spatial dims;
    3-D [B, T, C] (ViT tokens): the CLS token, index 0 (``pool`` does not apply);
    2-D [B, K]: as is; 1-D [B]: one unit. Tuples/lists/dicts: their first tensor.
    """
    if pool not in POOLS:
        raise UserError(f"unknown pooling '{pool}'; choose one of {', '.join(POOLS)}")
    x = _first_tensor(output)
    if x is None:
        raise UserError(f"layer output is {type(output).__name__}, not a tensor; choose another layer")
    if x.ndim == 0:
        raise UserError("layer output is a scalar; choose a layer with one output per image")
    if x.ndim >= 4:
        dims = tuple(range(2, x.ndim))
        # mean accumulates in float32 without a float32 copy of the whole map
        return x.mean(dim=dims, dtype=torch.float32) if pool == "mean" else x.amax(dim=dims).float()
    if x.ndim == 3:
        return x[:, 0, :].float()
    if x.ndim == 1:
        return x[:, None].float()
    return x.float()


class LayerRecorder:
    """Forward hooks on ``layers``; ``pop()`` gives the pooled outputs of the last forward.

    Outputs stay on the model's device and are detached (no host sync). A module that runs
    more than once per forward (a shared ReLU) keeps its last call. Hooks are removed on exit,
    also when the forward raises.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], pool: str = "mean") -> None:
        if pool not in POOLS:
            raise UserError(f"unknown pooling '{pool}'; choose one of {', '.join(POOLS)}")
        self.model = model
        self.layers = list(layers)
        self.pool = pool
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        # raw output shape per layer without the batch dimension (first forward), for the record
        self.output_shapes: dict[str, tuple[int, ...]] = {}

    def _hook(self, layer: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if layer not in self.output_shapes:
                raw = _first_tensor(output)
                if raw is not None:
                    self.output_shapes[layer] = tuple(raw.shape[1:])
            try:
                self._outputs[layer] = summarize(output, self.pool).detach()
            except UserError as exc:
                raise UserError(f"layer {layer}: {exc}") from exc

        return hook

    def __enter__(self) -> LayerRecorder:
        try:
            for layer in self.layers:
                module = self.model.get_submodule(layer)
                self._handles.append(module.register_forward_hook(self._hook(layer)))
        except AttributeError as exc:
            self.close()
            raise UserError(f"unknown layer: {exc}") from exc
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pop(self) -> dict[str, torch.Tensor]:
        """layer -> [B, K] of the last forward; clears the buffer."""
        silent = [layer for layer in self.layers if layer not in self._outputs]
        if silent:
            self._outputs.clear()
            raise UserError(
                f"layer(s) {', '.join(silent)} did not run during the forward pass (unused in eval mode?)"
            )
        out = {layer: self._outputs[layer] for layer in self.layers}
        self._outputs.clear()
        return out
