"""A small knowledge-distillation loop, for users without a training loop of their own.

After a lossy plan (``fxopt.depth.apply_depth_plan``) the planned model is an ordinary trainable
module; ``distill`` lets the original model teach it (Hinton et al. 2015): the loss is the
KL divergence between their temperature-softened outputs, plus, when the loader yields labels and
``label_weight`` > 0, the cross-entropy with the labels.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from fxopt import progress as progress_bars
from fxopt.errors import InputError

log = logging.getLogger("fxopt.finetune")


def distill(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    *,
    lr: float = 1e-3,
    temperature: float = 4.0,
    label_weight: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool | Callable[[str], None] = True,
) -> list[float]:
    """Train ``student`` in place to match ``teacher`` on the inputs of ``loader``; returns the
    mean loss of each epoch.

    ``loader`` yields input tensors, or (inputs, labels) pairs (a torch DataLoader of a
    TensorDataset does). Loss: T²·KL(softmax(t/T) ‖ softmax(s/T)) over the last dim (T =
    ``temperature``), + ``label_weight``·CE(s, labels). The optimizer defaults to AdamW(lr).
    ``progress``: a bar over each epoch's batches with the time left (on a terminal, see
    ``fxopt.progress``) and a line per epoch logged at INFO on logger ``fxopt.finetune`` (True),
    nothing (False), or a callable given each epoch's line. The teacher runs in eval mode
    without gradients; the student is left in eval mode.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise InputError(f"epochs={epochs!r} must be a positive integer")
    if not temperature > 0:
        raise InputError(f"temperature={temperature!r} must be positive")
    if not 0 <= label_weight:
        raise InputError(f"label_weight={label_weight!r} must be >= 0")
    parameters = [p for p in student.parameters() if p.requires_grad]
    if not parameters:
        raise InputError("the student has no trainable parameters (requires_grad is False everywhere)")
    optimizer = optimizer or torch.optim.AdamW(parameters, lr=lr)
    say = progress if callable(progress) else (log.info if progress else None)
    teacher.eval()
    history = []
    for epoch in range(1, epochs + 1):
        student.train()
        total, batches, started = 0.0, 0, time.perf_counter()
        size = len(loader) if hasattr(loader, "__len__") else None
        bar = progress_bars.bar(size, f"epoch {epoch}/{epochs}", unit="batch", show=progress is True)
        for batch in loader:
            inputs, labels = _split(batch)
            with torch.no_grad():
                target = teacher(*inputs)
            output = student(*inputs)
            loss = distillation_loss(output, target, temperature)
            if label_weight and labels is not None:
                loss = loss + label_weight * F.cross_entropy(output, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            bar.update()
            bar.set_postfix_str(f"loss {total / batches:.4f}")
        bar.close()
        if batches == 0:
            raise InputError("the loader yielded no batches")
        history.append(total / batches)
        if say is not None:
            line = f"epoch {epoch}/{epochs}: loss {history[-1]:.4f} ({batches} batches, {time.perf_counter() - started:.1f} s)"
            say(line)
    student.eval()
    return history


def distillation_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch."""
    if student_output.shape != teacher_output.shape:
        raise InputError(f"student output {tuple(student_output.shape)} and teacher output "
                         f"{tuple(teacher_output.shape)} differ: distill needs models with the same outputs")
    t = temperature
    return F.kl_div(F.log_softmax(student_output / t, -1), F.log_softmax(teacher_output / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def _split(batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(b, torch.Tensor) for b in batch) \
            and not batch[1].is_floating_point():  # (inputs, integer class labels)
        return (batch[0],), batch[1]
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(b, torch.Tensor) for b in batch):
        return tuple(batch), None
    raise InputError(f"the loader yielded a {type(batch).__name__}: give input tensors or (inputs, labels) pairs")

