"""The one data model of every measuring function (documented in ``docs/data.md``).

A **batch** is

* a pair ``(inputs, targets)``: ``inputs`` a tensor (``model(inputs)``) or a mapping of tensors
  (a dict or a Hugging Face ``BatchEncoding``: ``model(**inputs)``), ``targets`` a tensor; the loss
  is ``loss_fn(model(inputs), targets)``, the **mean** over the batch of per-sample losses; or
* with ``loss_fn=model_loss`` (or ``None``), the inputs alone (or ``(inputs, None)``): the model
  returns its own loss (a scalar tensor, ``outputs.loss`` or ``outputs["loss"]``; Hugging Face
  models do when the labels are among the inputs).

Every tensor holds the samples on its leading axis, and all of them agree on the batch size ``b``.

**Data** is one batch or an iterable of batches (a list, a ``DataLoader``, a generator: a one-shot
iterator is read into memory once). Quantities over data are means over its samples: a batch of
``b_m`` samples enters with weight ``b_m / N``, ``N = Σ_m b_m``, so unequal batch sizes are weighted
correctly and a list of batches gives what their concatenation gives (except where samples interact
inside a batch, e.g. BatchNorm in train mode: then each batch is its own). Batches are moved to the
model's device as they are read.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._validate import all_finite, check_scalar_loss


def model_loss(outputs: Any, targets: Any = None) -> Tensor:
    """The loss the model returned: pass as ``loss_fn`` when the model computes its own loss.

    ``outputs`` is a scalar tensor, an object with a ``.loss`` (Hugging Face ``ModelOutput``) or a
    mapping with ``"loss"``; ``targets`` is ignored (the labels are among the inputs). The loss must
    be the mean over the batch (Hugging Face's is the mean over tokens: the mean of per-sample
    means when every sample has the same number of labelled tokens).

    Args:
        outputs: what the model returned.
        targets: ignored.

    Returns:
        The model's loss, a scalar tensor (still attached to the graph).

    Raises:
        ValueError: the outputs carry no loss (``loss=None``: the labels were not among the
            inputs), or the loss is not a scalar tensor.

    Example:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> import neurothermo as nt
        >>> nt.model_loss(SimpleNamespace(loss=torch.tensor(1.5)))  # Hugging Face style outputs.loss
        tensor(1.5000)
    """
    loss = outputs
    if not isinstance(outputs, Tensor):
        if isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        else:
            loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(
                f"loss_fn=model_loss, but the model returned {type(outputs).__name__} without a loss "
                "(loss=None): put the labels among the inputs (Hugging Face: inputs['labels'], e.g. "
                "the input_ids for a causal LM) or pass a loss_fn(outputs, targets) and (inputs, "
                "targets) batches"
            )
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn=model_loss: the model's loss must be a scalar tensor (the mean over the "
            f"batch), got {shape}; reduce it in the model or pass a mean-reduced loss_fn"
        )
    return loss


def is_model_loss(loss_fn: Any) -> bool:
    return loss_fn is None or loss_fn is model_loss


def resolve_loss_fn(loss_fn: Any) -> Callable[..., Tensor]:
    """``loss_fn`` itself, or :func:`model_loss` for ``None``."""
    return model_loss if loss_fn is None else loss_fn


def _is_inputs(obj: Any) -> bool:
    return isinstance(obj, Tensor | Mapping)


def _is_pair(obj: Any, loss_fn: Any) -> bool:
    """``(inputs, targets)``; with the model's own loss only ``(inputs, None)`` (a tuple of two
    tensors is then two batches of inputs)."""
    if not (isinstance(obj, tuple | list) and len(obj) == 2 and _is_inputs(obj[0])):
        return False
    return obj[1] is None or (isinstance(obj[1], Tensor) and not is_model_loss(loss_fn))


@dataclass(frozen=True, eq=False)
class Batch:
    """One checked batch: ``inputs`` (tensor or dict of tensors), ``targets`` (or None), ``size``."""

    inputs: Tensor | dict[str, Any]
    targets: Tensor | None
    size: int

    @property
    def args(self) -> tuple[Any, ...]:
        return (self.inputs,) if isinstance(self.inputs, Tensor) else ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return {} if isinstance(self.inputs, Tensor) else dict(self.inputs)

    def tensors(self) -> list[Tensor]:
        """Every tensor of the batch (inputs, then targets)."""
        ins = [self.inputs] if isinstance(self.inputs, Tensor) else [
            v for v in self.inputs.values() if isinstance(v, Tensor)]
        return ins + ([] if self.targets is None else [self.targets])

    def map(self, f: Callable[[Tensor], Tensor]) -> Batch:
        """This batch with ``f`` applied to every tensor (inputs and targets)."""
        return self._map(f)

    def _map(self, f: Callable[[Tensor], Tensor]) -> Batch:
        if isinstance(self.inputs, Tensor):
            ins: Tensor | dict[str, Any] = f(self.inputs)
        else:
            ins = {k: f(v) if isinstance(v, Tensor) else v for k, v in self.inputs.items()}
        tg = None if self.targets is None else f(self.targets)
        probe = ins if isinstance(ins, Tensor) else (tg if tg is not None else next(
            v for v in ins.values() if isinstance(v, Tensor)))
        return Batch(ins, tg, int(probe.shape[0]))

    def to(self, device: torch.device | None) -> Batch:
        """The batch on ``device`` (itself when every tensor is already there, or for None)."""
        if device is None or all(t.device == device for t in self.tensors()):
            return self
        return self._map(lambda t: t.to(device))

    def __getitem__(self, index: slice | Tensor) -> Batch:
        """The samples ``index`` (a slice or an index tensor) of every tensor."""
        return self._map(lambda t: t[index])

    def split(self, size: int) -> list[Batch]:
        """Consecutive pieces of ``size`` samples (the last one possibly smaller)."""
        return [self[i:i + size] for i in range(0, self.size, size)]

    def tensor_split(self, k: int) -> list[Batch]:
        """``k`` consecutive pieces of near-equal size (as ``torch.tensor_split``)."""
        q, r = divmod(self.size, k)  # torch.tensor_split's sizes: the first r pieces get q + 1
        starts = [i * q + min(i, r) for i in range(k + 1)]
        return [self[starts[i]:starts[i + 1]] for i in range(k)]

    def as_given(self) -> Any:
        """The batch in the form a user passes it: ``(inputs, targets)``, or the inputs alone."""
        return self.inputs if self.targets is None else (self.inputs, self.targets)

    def outputs(self, model: Callable[..., Any]) -> Any:
        """``model(inputs)`` or ``model(**inputs)``."""
        return model(*self.args, **self.kwargs)

    def loss_value(self, model: Callable[..., Any], loss_fn: Any) -> Any:
        """``loss_fn(model(inputs), targets)`` as returned (unchecked)."""
        return resolve_loss_fn(loss_fn)(self.outputs(model), self.targets)

    def loss(self, model: Callable[..., Any], loss_fn: Any) -> Tensor:
        """The mean loss of the batch, checked to be a finite scalar tensor."""
        return check_scalar_loss(self.loss_value(model, loss_fn))


def concat(batches: list[Batch]) -> Batch:
    """One batch holding the samples of ``batches`` in order."""
    first = batches[0]
    if len(batches) == 1:
        return first
    if isinstance(first.inputs, Tensor):
        ins: Tensor | dict[str, Any] = torch.cat([b.inputs for b in batches])  # type: ignore[misc]
    else:
        ins = {k: (torch.cat([b.inputs[k] for b in batches])  # type: ignore[index]
                   if isinstance(v, Tensor) else v) for k, v in first.inputs.items()}
    tg = None if first.targets is None else torch.cat([b.targets for b in batches])  # type: ignore[misc]
    return Batch(ins, tg, sum(b.size for b in batches))


def _leading(name: str, key: str, t: Tensor) -> int:
    if t.ndim == 0:
        raise ValueError(f"{name}: {key} is a scalar tensor; every tensor of a batch needs the "
                         "samples on its leading axis")
    return int(t.shape[0])


def as_batch(obj: Any, loss_fn: Any = None, *, name: str = "batch", min_size: int = 1,
             device: torch.device | None = None, finite: bool = True) -> Batch:
    """Check one batch of the data model (module docstring) and return it as a :class:`Batch`.

    Raises:
        TypeError: not a batch (names what was given and what a batch is).
        ValueError: tensors disagreeing on the batch size, fewer than ``min_size`` samples, NaN/Inf.
    """
    own = is_model_loss(loss_fn)
    if isinstance(obj, Batch):
        return obj.to(device)
    if _is_pair(obj, loss_fn):
        inputs, targets = obj
    elif own and _is_inputs(obj):
        inputs, targets = obj, None
    elif _is_inputs(obj):
        raise TypeError(
            f"{name} is {type(obj).__name__} without targets; pass the pair (inputs, targets) for "
            "loss_fn(outputs, targets), or loss_fn=neurothermo.model_loss if the model returns its "
            "own loss (labels among the inputs)"
        )
    else:
        what = type(obj).__name__ + (f" of length {len(obj)}" if isinstance(obj, tuple | list) else "")
        raise TypeError(
            f"{name} must be a pair (inputs, targets), inputs a tensor or a mapping of tensors (dict, "
            f"BatchEncoding) and targets a tensor; got {what}"
            + (". Convert numbers with torch.as_tensor" if isinstance(obj, tuple | list) else "")
        )
    sizes: dict[str, int] = {}
    if isinstance(inputs, Tensor):
        sizes["inputs"] = _leading(name, "inputs", inputs)
        ins: Tensor | dict[str, Any] = inputs
    else:
        ins = dict(inputs)
        for k, v in ins.items():
            if isinstance(v, Tensor):
                sizes[f"inputs[{k!r}]"] = _leading(name, f"inputs[{k!r}]", v)
        if not sizes:
            raise TypeError(f"{name}: the inputs mapping holds no tensors (keys {list(ins)})")
    if targets is not None:
        sizes["targets"] = _leading(name, "targets", targets)
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"{name}: its tensors disagree on the batch size (leading axis) — {listing}; every "
            "tensor of a batch must hold the same samples on its leading axis (expand broadcast "
            "inputs such as position_ids of shape [1, T] to [b, T], or leave them to the model)"
        )
    n = next(iter(sizes.values()))
    if n < min_size:
        what = "is empty" if n == 0 else f"has {n} sample(s)"
        raise ValueError(f"{name} {what}; at least {min_size} needed")
    batch = Batch(ins, targets, n)
    for k, t in zip(sizes, batch.tensors()):
        if finite and t.is_floating_point() and not all_finite(t):
            raise ValueError(f"{name}: {k} contain NaN or Inf")
    return batch.to(device)


class Data:
    """One batch or an iterable of batches, read as :class:`Batch` objects (module docstring).

    Iterate it (again and again: a one-shot iterator is read into a list first). ``single`` is
    the batch when ``data`` was one batch, else None; ``n_samples`` is ``N`` after a full pass.
    """

    def __init__(self, data: Any, loss_fn: Any = None, *, name: str = "data",
                 device: torch.device | None = None, min_size: int = 1) -> None:
        self.name, self.loss_fn, self.device, self.min_size = name, loss_fn, device, min_size
        self.single: Batch | None = None
        self.n_samples: int | None = None
        self.n_batches: int | None = None
        self._source: Iterable[Any] | None = None
        if isinstance(data, Batch) or _is_pair(data, loss_fn) or _is_inputs(data):
            self.single = as_batch(data, loss_fn, name=name, min_size=min_size, device=device)
            self.n_samples, self.n_batches = self.single.size, 1
            return
        if isinstance(data, str | bytes) or not isinstance(data, Iterable):
            as_batch(data, loss_fn, name=name)  # raises the TypeError describing a batch
        if iter(data) is data:  # a one-shot iterator: keep what it yields
            data = list(data)
        self._source = data

    def __iter__(self) -> Iterator[Batch]:
        if self.single is not None:
            yield self.single
            return
        assert self._source is not None
        n = k = 0
        for k, obj in enumerate(self._source, 1):
            b = as_batch(obj, self.loss_fn, name=f"{self.name}[{k - 1}]", min_size=self.min_size,
                         device=self.device)
            n += b.size
            yield b
        if k == 0:
            raise ValueError(
                f"{self.name} yielded no batches (an empty list or DataLoader? a DataLoader with "
                "drop_last=True and fewer samples than its batch_size?); pass at least one batch"
            )
        self.n_samples, self.n_batches = n, k

    def count(self) -> int:
        """``N``, the number of samples (one pass over the data if not yet known)."""
        if self.n_samples is None:
            for _ in self:
                pass
        assert self.n_samples is not None
        return self.n_samples

    def batches(self) -> list[Batch]:
        """Every batch, in memory."""
        return list(self)

    def chunks(self, size: int | None) -> Iterator[Batch]:
        """The batches cut into pieces of at most ``size`` samples (None: as they are)."""
        for b in self:
            if size is None or b.size <= size:
                yield b
            else:
                yield from b.split(size)


def as_data(data: Any, loss_fn: Any = None, *, name: str = "data", model: nn.Module | None = None,
            min_size: int = 1) -> Data:
    """``data`` as :class:`Data`, moved to ``model``'s device when a model is given."""
    if isinstance(data, Data):
        data = data.single if data.single is not None else data._source
    return Data(data, loss_fn, name=name, device=None if model is None else model_device(model),
                min_size=min_size)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model without either."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def batch_size_of(obj: Any) -> int:
    """``b`` of a batch in any form of the data model: a pair ``(inputs, targets)`` or inputs."""
    return batch_of(obj).size


def batch_of(obj: Any) -> Batch:
    """A batch in any form of the data model (a pair ``(inputs, targets)`` or inputs) as a
    :class:`Batch`, its values unchecked."""
    if isinstance(obj, Batch):
        return obj
    own = not (isinstance(obj, tuple | list) and len(obj) == 2 and isinstance(obj[1], Tensor))
    return as_batch(obj, model_loss if own else _pair_loss, finite=False)


def _pair_loss(outputs: Any, targets: Any) -> Any:  # marks "a loss_fn that takes targets"
    raise AssertionError("never called")


def check_num_data(num_data: int | None, counted: int, name: str = "data") -> int:
    """``N``: the samples counted in the data, checked against ``num_data`` when given."""
    if num_data is not None and num_data != counted:
        raise ValueError(
            f"num_data={num_data}, but {name} holds {counted} samples (a DataLoader with "
            "drop_last=True drops the last partial batch); pass the number the data really holds, "
            "or num_data=None to count them"
        )
    return counted
