"""Attention written out with traceable ops, so that its projections and products are quantized and counted.

* :class:`MultiheadAttention` replaces every ``nn.MultiheadAttention`` before
  tracing (torch.fx keeps the original as a leaf, hiding its in/out
  projections and both attention products). Same parameters, same outputs
  (up to float rounding): q/k/v/out projections are ``nn.Linear`` layers,
  ``scores = (q @ k^T) * 1/sqrt(d)``, softmax (float), ``context = p @ v``.
* :func:`decompose_sdpa` rewrites ``F.scaled_dot_product_attention`` calls in
  a traced graph into the same two products around a float softmax.

The products are activation x activation matmuls of the op registry: each
operand gets its own quantizer and gate, and their BOPs are
``MACs x b_left x b_right``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from cgmq_cli.ops.matmul import _NAMED

_SDPA = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (its parameters and call signature) as plain linear layers and matmuls."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        bias = mha.in_proj_bias is not None
        dims = (e, mha.kdim, mha.vdim)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, e, bias=bias) for d in dims)
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                if mha._qkv_same_embed_dim:
                    proj.weight.copy_(mha.in_proj_weight[i * e:(i + 1) * e])
                else:
                    proj.weight.copy_(getattr(mha, ("q", "k", "v")[i] + "_proj_weight"))
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * e:(i + 1) * e])
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        self.out_proj.load_state_dict(mha.out_proj.state_dict())
        self.train(mha.training)

    @staticmethod
    def supported(mha: nn.MultiheadAttention) -> str | None:
        """None when the module can be written out; else why not."""
        if mha.bias_k is not None or mha.add_zero_attn:
            return "bias_k/bias_v or add_zero_attn"
        return None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        scores = _masked(scores, attn_mask, key_padding_mask, is_causal)
        weights = torch.softmax(scores, dim=-1)
        probs = F.dropout(weights, p=self.dropout, training=self.training)
        context = torch.matmul(probs, v).transpose(1, 2)
        out = self.out_proj(context.reshape(context.shape[0], context.shape[1], self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def _masked(scores, attn_mask, key_padding_mask, is_causal):
    if is_causal and attn_mask is None:
        size = scores.shape[-1]
        attn_mask = torch.ones(size, size, dtype=torch.bool, device=scores.device).tril().logical_not()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(key_padding_mask.shape[0], 1, 1, key_padding_mask.shape[-1])
        if pad.dtype == torch.bool:
            scores = scores.masked_fill(pad, float("-inf"))
        else:
            scores = scores + pad
    return scores


def replace_multihead_attention(model: nn.Module, leaves: set[str]) -> list[tuple[str, str]]:
    """Write out every ``nn.MultiheadAttention`` of ``model`` in place; returns (path, reason) of those kept."""
    kept = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.MultiheadAttention or name in leaves:
            continue
        reason = MultiheadAttention.supported(module)
        if reason is not None:
            kept.append((name, reason))
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, MultiheadAttention(module))
    return kept


def decompose_sdpa(gm: fx.GraphModule) -> int:
    """Rewrite ``scaled_dot_product_attention(q, k, v, ...)`` as matmul, scale, mask, softmax, matmul."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        q, k, v = node.args[:3]
        opts = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), node.args[3:]))
        opts.update(node.kwargs)
        if opts.get("enable_gqa"):
            continue  # grouped-query attention: left as it is (counted as float compute)
        graph = gm.graph
        stack = node.meta.get("nn_module_stack")
        path = next(reversed(stack.values()))[0] if stack else ""
        prefix = f"{path}." if path else ""
        with graph.inserting_before(node):
            kt = graph.call_method("transpose", (k, -2, -1))
            scores = graph.call_function(torch.matmul, (q, kt))
            scores.meta[_NAMED] = f"{prefix}scores" + (f"_{count}" if count else "")
            scale = opts.get("scale")
            factor = graph.call_function(_inverse_sqrt_last, (q,)) if scale is None else scale
            scaled = graph.call_function(torch.mul, (scores, factor))
            masked = graph.call_function(_sdpa_masked, (scaled, opts.get("attn_mask"), bool(opts.get("is_causal"))))
            probs = graph.call_function(torch.softmax, (masked, -1))
            dropped = graph.call_function(_train_dropout, (probs, float(opts.get("dropout_p") or 0.0)))
            context = graph.call_function(torch.matmul, (dropped, v))
            context.meta[_NAMED] = f"{prefix}context" + (f"_{count}" if count else "")
        for new in (kt, scores, scaled, masked, probs, dropped, context):
            if stack:
                new.meta["nn_module_stack"] = stack
        node.replace_all_uses_with(context)
        graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _sdpa_masked(scores, attn_mask, is_causal):
    """SDPA's masks: a boolean ``attn_mask`` marks what *may* be attended (the opposite of
    nn.MultiheadAttention's), a float one is added; ``is_causal`` keeps the lower triangle."""
    if is_causal:
        lq, s = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(lq, s, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def _inverse_sqrt_last(q: torch.Tensor) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _train_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """SDPA applies its dropout whenever ``dropout_p > 0`` (callers pass 0 in eval mode)."""
    return F.dropout(x, p=p, training=p > 0)


