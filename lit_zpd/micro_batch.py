"""One optimizer step's loss computed a few rows at a time (``model.micro_batch_size``).

The loss of a batch is a sum of per-row parts (every term's token coefficients are fixed for the
whole batch first, :func:`~lit_zpd.losses.token_weights`), so the batch can be split into row
subsets whose forward and backward run one after the other: activations of one micro-batch are
alive at a time. :func:`micro_batched` does that inside one autograd node, computing each part's
parameter gradients in its forward pass; the outer backward only hands them on. Lightning's
automatic optimization therefore still sees one loss and one backward (gradient clipping,
accumulation, precision plugins and the DDP gradient reduction work as for a single pass).

Deliberate simplification: the inner gradients are taken without the precision plugin's loss
scale, so with ``trainer.precision: 16-mixed`` small float16 gradients can underflow; bf16 and
float32 are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Part = Callable[[list[int]], tuple[Tensor, dict[str, Tensor]]]
"""``rows -> (the rows' share of the loss, their shares of the logged values)``."""


def row_parts(n_rows: int, micro_batch_size: int | None) -> list[list[int]]:
    """Consecutive row subsets of at most ``micro_batch_size`` rows (one subset if ``None``)."""
    size = micro_batch_size or max(1, n_rows)
    return [list(range(i, min(i + size, n_rows))) for i in range(0, n_rows, size)] or [[]]


def micro_batched(part: Part, parts: Sequence[list[int]], params: Sequence[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The sum of ``part(rows)`` over ``parts``, differentiable in ``params``.

    Each part is computed and differentiated before the next starts; the summed gradients are
    held until the returned loss is backpropagated. Equal in loss and gradient to one pass over
    all rows (up to floating-point summation order).

    Returns:
        The loss, and the logged values summed over parts (detached).
    """
    names: list[str] = []
    loss, logged = _MicroBatched.apply(part, list(parts), names, *params)
    return loss, dict(zip(names, logged.unbind(0)))


class _MicroBatched(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, part: Part, parts: list[list[int]], names: list[str], *params: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        total: Tensor | None = None
        sums: dict[str, Tensor] = {}
        grads: list[Tensor | None] = [None] * len(params)
        for rows in parts:
            with torch.enable_grad():
                loss, logged = part(rows)
                wanted = [i for i, p in enumerate(params) if p.requires_grad]
                found = torch.autograd.grad(loss, [params[i] for i in wanted], allow_unused=True) if loss.requires_grad else [None] * len(wanted)
            for i, g in zip(wanted, found):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i].add_(g)  # type: ignore[union-attr]
            total = loss.detach() if total is None else total + loss.detach()
            for name, value in logged.items():
                sums[name] = value.detach() if name not in sums else sums[name] + value.detach()
        names.extend(sums)
        ctx.grads = grads
        logged_values = torch.stack(list(sums.values())) if sums else torch.zeros(0)
        ctx.mark_non_differentiable(logged_values)
        assert total is not None
        return total, logged_values

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, _grad_logged: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("a micro-batched loss was backpropagated twice; its gradients are released after the first")
        grads, ctx.grads = ctx.grads, None
        return (None, None, None, *(g if g is None else g * grad_loss.to(g.dtype) for g in grads))
