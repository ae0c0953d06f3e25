"""Kick-test a causal LM: forward, backward and a few SGD steps, failing loudly when something is off.

Checks, each naming what broke:

* the loss of every step is finite (NaN/inf -> :class:`KickTestError`);
* after the first backward every trainable parameter has a gradient (``None`` means the parameter is
  not reached by the loss: detached, unused, or cut off by a ``no_grad``);
* every gradient is finite;
* every trainable parameter gets a non-zero gradient in at least one step (checked at the end, so a
  parameter whose gradient is exactly zero by chance in one step does not fail the test).

Inputs are random token ids (from a seeded CPU generator, fresh ones every step) or rows of token
windows from the evaluator's data loader, cycled. Padding positions are excluded from the loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge_opt.errors import EvoMergeError

logger = logging.getLogger(__name__)


class KickTestError(EvoMergeError):
    """The model fell over: a non-finite loss or gradient, or parameters the gradient never reaches."""

    def __init__(self, message: str, result: KickTestResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass
class StepRecord:
    step: int
    loss: float
    grad_norm: float
    tokens: int
    seconds: float

    def line(self, steps: int) -> str:
        return (f"step {self.step}/{steps}  loss {self.loss:.4f}  grad-norm {self.grad_norm:.4g}  "
                f"tokens {self.tokens}  {self.seconds * 1000:.0f} ms")


@dataclass
class KickTestResult:
    steps: list[StepRecord] = field(default_factory=list)
    trainable: int = 0  # trainable parameter tensors
    frozen: int = 0

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]


def random_batches(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> Callable[[int], dict[str, Any]]:
    """``step -> batch`` of uniform random token ids ``[batch_size, seq_len]`` (seeded, CPU generator)."""
    generator = torch.Generator().manual_seed(seed)

    def make(step: int) -> dict[str, Any]:
        ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return make


def window_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> Callable[[int], dict]:
    """``step -> batch`` cycling over the rows of token windows ``[n, L]`` (trimmed to the batch's longest row)."""
    rows = int(input_ids.shape[0])
    if rows == 0:
        raise EvoMergeError("the dataset gave no token windows to test on.")

    def make(step: int) -> dict[str, Any]:
        index = torch.arange(step * batch_size, (step + 1) * batch_size) % rows
        ids, mask = input_ids[index], attention_mask[index].long()
        width = max(int(mask.sum(dim=1).max()), 2)
        return {"input_ids": ids[:, :width], "attention_mask": mask[:, :width]}

    return make


def enable_gradient_checkpointing(model: Any) -> None:
    """Turn on activation (gradient) checkpointing, non-reentrant; a clear error where unsupported."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise EvoMergeError(f"{type(model).__name__} does not support gradient checkpointing.")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # HF causal LMs shift labels inside the loss; -100 marks padding so it is not scored.
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


class _GradWatch:
    """What the gradients of one backward showed: reached parameters, non-finite ones, the norm."""

    def __init__(self, names: list[str]) -> None:
        self.never_nonzero = set(names)
        self.reached: set[str] = set()
        self.bad: list[str] = []
        self.squares: list[torch.Tensor] = []

    def new_step(self) -> None:
        self.reached, self.bad, self.squares = set(), [], []

    def observe(self, name: str, grad: torch.Tensor) -> None:
        self.reached.add(name)
        if not bool(torch.isfinite(grad).all()):
            self.bad.append(name)
        if name in self.never_nonzero and bool(grad.any()):
            self.never_nonzero.discard(name)
        self.squares.append(grad.detach().float().pow(2).sum())

    @property
    def norm(self) -> float:
        return float(torch.stack(self.squares).sum().sqrt()) if self.squares else 0.0


def kick_test(
    model: Any,
    batches: Callable[[int], dict[str, torch.Tensor]],
    steps: int = 1,
    lr: float = 0.01,
    gradient_checkpointing: bool = False,
    on_step: Callable[[StepRecord], None] | None = None,
    fuse_optim_with_backward: bool = False,
) -> KickTestResult:
    """Run ``steps`` SGD steps of ``model`` on ``batches(step)``; raise :class:`KickTestError` on a failure.

    ``fuse_optim_with_backward``: each parameter takes its SGD step in a post-accumulate-grad hook
    during the backward and its gradient is freed at once, so gradients of the whole model never
    exist together (the same arithmetic as the plain SGD step; less peak memory).
    """
    if steps < 1:
        raise EvoMergeError(f"`steps >= 1` must hold, but got steps={steps}.")
    if not math.isfinite(lr) or lr <= 0:
        raise EvoMergeError(f"`lr > 0` must hold, but got lr={lr}.")
    device = next(model.parameters()).device
    if device.type == "meta":
        raise EvoMergeError("`model test` needs a real device: the model is on 'meta'; pass --device cpu (or cuda).")
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise EvoMergeError(
            f"{type(model).__name__} has no language-model head; the kick-test trains causal LMs "
            "(next-token loss), not classifiers."
        )
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    result = KickTestResult(trainable=len(named), frozen=sum(1 for p in model.parameters() if not p.requires_grad))
    if not named:
        raise KickTestError("the model has no trainable parameters (every requires_grad is False).", result)
    watch = _GradWatch([n for n, _ in named])
    handles = []
    optimizer = None
    if fuse_optim_with_backward:
        def make_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(param: torch.Tensor) -> None:
                watch.observe(name, param.grad)
                with torch.no_grad():
                    param.add_(param.grad, alpha=-lr)
                param.grad = None
            return hook

        handles = [p.register_post_accumulate_grad_hook(make_hook(n)) for n, p in named]
    else:
        optimizer = torch.optim.SGD([p for _, p in named], lr=lr)
    model.train()
    try:
        for step in range(steps):
            start = time.perf_counter()
            batch = {k: v.to(device) for k, v in batches(step).items()}
            watch.new_step()
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            loss = model(**batch, labels=_labels(batch), use_cache=False).loss
            value = float(loss.detach().float())
            if not math.isfinite(value):
                raise KickTestError(
                    f"loss is {value} at step {step + 1}/{steps}: the model produces non-finite values "
                    "(check the weights for NaN/inf, the dtype, or lower --lr).", result)
            loss.backward()
            if optimizer is not None:
                for name, param in named:
                    if param.grad is not None:
                        watch.observe(name, param.grad)
            if step == 0:
                unreached = [n for n, _ in named if n not in watch.reached]
                if unreached:
                    raise KickTestError(
                        f"{len(unreached)} trainable parameter(s) got no gradient after the first backward (not "
                        f"reached by the loss: detached or unused): {', '.join(unreached)}", result)
            if watch.bad:
                raise KickTestError(
                    f"non-finite gradient at step {step + 1}/{steps} in: {', '.join(watch.bad)}", result)
            if optimizer is not None:
                optimizer.step()
            record = StepRecord(step + 1, value, watch.norm, int(batch["attention_mask"].sum()),
                                time.perf_counter() - start)
            result.steps.append(record)
            logger.debug("%s", record.line(steps))
            if on_step is not None:
                on_step(record)
    finally:
        for handle in handles:
            handle.remove()
    if watch.never_nonzero:
        ordered = [n for n, _ in named if n in watch.never_nonzero]
        raise KickTestError(
            f"{len(ordered)} trainable parameter(s) never received a non-zero gradient in {steps} step(s): "
            f"{', '.join(ordered)}", result)
    model.eval()
    return result
