"""The prediction tensor of a model's output: a tensor, ``.logits`` / ``["logits"]`` (Hugging Face
ModelOutput and dicts), or the first tensor of a tuple or list."""

from __future__ import annotations

from typing import Any


def logits(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    found = getattr(out, "logits", None)
    if found is None and isinstance(out, dict):
        found = out.get("logits", next((v for v in out.values() if isinstance(v, torch.Tensor)), None))
    if found is None and isinstance(out, (tuple, list)):
        found = next((logits(v) for v in out if v is not None), None)
    if found is None:
        raise TypeError(f"the model returned {type(out).__name__}, which holds no tensor")
    return found
