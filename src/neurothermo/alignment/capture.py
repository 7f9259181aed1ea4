"""Capture per-layer features with forward hooks that are always removed.

``capture_features(model, inputs)`` runs the model in eval mode without gradients, batch by batch,
and returns ``{layer name: (N, D) tensor}``. The model is left exactly as it was (train/eval flags,
BatchNorm buffers, ``.grad``), and every hook is removed also when the forward raises.

Which layers (``layers="auto"``, :func:`auto_layers`): every block of every block stack (a
``Sequential`` / ``ModuleList`` of modules with submodules: each stage of a ResNet, a transformer's
layers, a convnet's ``features``), outermost stacks only; without one, the children of the longest
``nn.Sequential`` / ``nn.ModuleList``; if there is none with ≥ 2 children, the model's top-level
children. Or give a list of names from
``model.named_modules()``. A module that returns a tuple (e.g. a Hugging Face layer) contributes
its first tensor. A module that runs several times in one forward (ALBERT's layer, shared across
depth) contributes one entry per call, ``"name#0"``, ``"name#1"`` …: its features at every depth.

Pooling (``pool``) of one layer's output ``h`` of shape ``(b, ...)``:

* ``"mean"``: ``(b, T, D)`` (tokens, transformer convention) → mean over tokens (over the tokens
  with ``attention_mask == 1`` when ``inputs`` is a mapping holding ``attention_mask``);
  ``(b, C, H, W…)`` (channels first, convnet convention) → mean over the spatial axes; ``(b, D)``
  kept.
* ``"last"``: ``(b, T, D)`` → the last token (the last unmasked one with an attention mask).
* ``"flatten"``: ``h.reshape(b, −1)``.

The mask of a layer is its stream's: a layer inside a ``decoder`` (Hugging Face encoder–decoder
naming) takes ``decoder_attention_mask`` (every token when absent), any other ``attention_mask``;
a mask whose length is not the layer's token count raises ``ValueError``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from neurothermo._data import as_data, model_loss
from neurothermo._state import preserved_state


def _is_block_stack(mod: nn.Module) -> bool:
    """A ``Sequential``/``ModuleList`` whose children are all blocks (modules with submodules of
    their own): a ResNet stage, a transformer's layer list, a convnet's ``features``."""
    kids = list(mod.children())
    return (isinstance(mod, nn.Sequential | nn.ModuleList) and bool(kids)
            and all(any(True for _ in k.children()) for k in kids))


def auto_layers(model: nn.Module) -> list[str]:
    """The blocks of ``model``, in registration order (see the module docstring).

    Every child of every *block stack* (a ``Sequential``/``ModuleList`` of modules that have
    submodules themselves) that does not lie inside another block stack: all four stages of a
    torchvision ResNet (``layer1.0`` … ``layer4.1``), a ViT's ``blocks.i``, BERT's
    ``encoder.layer.i``, GPT-2's ``h.i``; a stack of one block counts (ALBERT's layer group,
    which runs at every depth: :func:`capture_features` then gives one entry per call). Without
    a block stack: the children of the longest
    ``Sequential``/``ModuleList`` with ≥ 2 children (a plain ``nn.Sequential`` of layers), else the
    model's top-level children.

    Args:
        model: the network.

    Returns:
        Qualified module names, in registration order.

    Raises:
        ValueError: the model has no submodules to hook (pass ``layers=[...]`` to
            :func:`capture_features`).

    Example:
        >>> from torch import nn
        >>> from neurothermo.alignment import auto_layers
        >>> auto_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        ['0', '1', '2']
    """
    stacks: list[str] = []
    for name, mod in model.named_modules():
        if _is_block_stack(mod) and not any(name.startswith(f"{s}.") or s == "" for s in stacks):
            stacks.append(name)
    blocks = [f"{s}.{c}" if s else c for s in stacks
              for c, _ in model.get_submodule(s).named_children()]
    if blocks:  # (one block: e.g. ALBERT's layer group, shared across depth: one entry per call)
        return blocks
    best_name, best_len = None, 1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Sequential | nn.ModuleList) and len(mod) > best_len:
            best_name, best_len = name, len(mod)
    if best_name is None:
        names = [n for n, _ in model.named_children()]
        if not names:
            raise ValueError(f"{type(model).__name__} has no submodules to hook; pass layers=[...]")
        return names
    prefix = f"{best_name}." if best_name else ""
    container = model.get_submodule(best_name) if best_name else model
    return [prefix + n for n, _ in container.named_children()]


def _first_tensor(out: Any, name: str) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Sequence) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor (or a tuple starting with one)")


def _from_nested(h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """A nested ``(b, T_i, D)`` output (torch's transformer fast path drops padded tokens under
    ``no_grad``) as a zero-padded ``(b, T, D)`` tensor and its mask of real tokens; ``T`` is the
    attention mask's length when there is one (so every batch flattens alike), else the longest
    ``T_i``. The real tokens of each sample come first."""
    parts = h.unbind()
    if any(x.dim() != 2 for x in parts):
        raise ValueError("a nested layer output must hold (T_i, D) per sample; capture an "
                         "inner layer or disable the fast path (enable_nested_tensor=False)")
    lengths = [int(x.shape[0]) for x in parts]
    t = max(lengths) if mask is None else max(int(mask.shape[1]), max(lengths))
    dim = int(parts[0].shape[-1])
    padded = torch.nested.to_padded_tensor(h, 0.0, output_size=(len(lengths), t, dim))
    real = torch.arange(t, device=padded.device)[None, :] < torch.tensor(
        lengths, device=padded.device)[:, None]
    return padded, real


def pool_output(h: Tensor, pool: str, mask: Tensor | None = None) -> Tensor:
    """Pool one layer output ``(b, ...)`` to ``(b, D)`` (see the module docstring). A nested
    output (``nn.TransformerEncoder``'s fast path with a padding mask) is pooled over each
    sample's own tokens."""
    if h.is_nested:
        h, mask = _from_nested(h, mask)
    b = h.shape[0]
    if pool == "flatten" or h.ndim == 2:
        return h.reshape(b, -1)
    if h.ndim == 1:
        return h.reshape(b, 1)
    if pool == "mean":
        if h.ndim == 3:
            if mask is None:
                return h.mean(dim=1)
            w = mask.to(h.dtype).unsqueeze(-1)
            return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
        return h.flatten(2).mean(dim=2)
    if pool == "last":
        if h.ndim != 3:
            raise ValueError(
                f"pool='last' takes the last token of a (b, T, D) output; got shape {tuple(h.shape)} "
                "(use 'mean' or 'flatten' for convolutional maps)"
            )
        if mask is None:
            return h[:, -1]
        last = (mask.long().cumsum(dim=1).argmax(dim=1)).to(h.device)
        return h[torch.arange(b, device=h.device), last]
    raise ValueError(f"pool must be 'mean', 'last' or 'flatten', got {pool!r}")


def _batches(inputs: Any, batch_size: int | None
             ) -> tuple[int, list[tuple[Any, Mapping[str, Tensor] | None]]]:
    """``(model inputs, the inputs again when they are a mapping, for its masks)`` per batch: ``inputs`` (a tensor, a tuple of tensors as
    positional arguments, a mapping of tensors) split along dim 0, or the batches of an iterable
    (a ``DataLoader``; each one a batch of the data model, ``docs/data.md``, whose targets are
    ignored), each split again when larger than ``batch_size``."""
    size = batch_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if isinstance(inputs, Sequence) and inputs and all(isinstance(t, Tensor) for t in inputs):
        n = inputs[0].shape[0]  # positional arguments model(*inputs)
        if n == 0:
            raise ValueError("inputs hold no samples")
        step = n if size is None else size
        return n, [(tuple(t[i:i + step] for t in inputs), None) for i in range(0, n, step)]
    if isinstance(inputs, Tensor | Mapping):
        data = as_data(inputs, model_loss, name="inputs")
    elif isinstance(inputs, Iterable) and not isinstance(inputs, str | bytes):
        data = as_data([b[0] if _is_target_pair(b) else b for b in inputs], model_loss, name="inputs")
    else:
        raise TypeError(
            "inputs must be a tensor, a tuple of tensors (positional arguments), a dict of tensors "
            f"(keyword arguments) or an iterable of batches (a DataLoader), got {type(inputs).__name__}"
        )
    out: list[tuple[Any, Mapping[str, Tensor] | None]] = []
    for part in data.chunks(size):
        ins = part.inputs
        out.append((ins, ins if isinstance(ins, dict) else None))
    return data.count(), out


def _mask_for(name: str, h: Tensor, masks: Mapping[str, Tensor] | None, pool: str
              ) -> Tensor | None:
    """The token mask of layer ``name``'s stream: ``decoder_attention_mask`` for a layer inside a
    ``decoder`` (Hugging Face encoder–decoder naming; none given: every token counts), else
    ``attention_mask``. A mask whose length is not the layer's token count belongs to another
    stream: an error, not a silent misuse."""
    if masks is None or (not h.is_nested and (h.ndim != 3 or pool == "flatten")):
        return None  # (a nested output needs its mask's length to pad to, flatten included)
    key = "decoder_attention_mask" if "decoder" in name.split(".") else "attention_mask"
    mask = masks.get(key)
    if mask is None:
        return None
    if not h.is_nested and tuple(mask.shape[:2]) != tuple(h.shape[:2]):
        raise ValueError(
            f"layer {name!r} has {h.shape[1]} tokens per sample but {key!r} has "
            f"{mask.shape[1]}: the layer is in another stream than that mask (e.g. the decoder "
            "of an encoder–decoder model, whose mask is 'decoder_attention_mask'); pass the "
            "stream's own mask, capture the layers of one stream, or pool='flatten'")
    return mask


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        model(*batch)


def _size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch
    return next(int(v.shape[0]) for v in values if isinstance(v, Tensor) and v.dim())


def _first_sample(batch: Any) -> Any:
    def cut(v: Any) -> Any:
        return v[:1] if isinstance(v, Tensor) and v.dim() else v

    if isinstance(batch, Tensor):
        return batch[:1]
    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return tuple(cut(v) for v in batch)


def _batch_axis(name: str, h: Tensor, one: tuple[int, ...]) -> int:
    """The axis of layer ``name``'s output ``h`` that holds the samples: the one that is ``b``
    here and 1 on one sample, every other axis unchanged (0 for batch-first outputs; 1 for
    XLNet's time-major ``[T, b, d]``, also when ``T = b``). Raises if there is none."""
    b = h.shape[0] if h.dim() else 0
    found = [d for d in range(h.dim()) if len(one) == h.dim() and one[d] == 1 and h.shape[d] > 1
             and all(one[k] == h.shape[k] for k in range(h.dim()) if k != d)]
    if found:
        return 0 if 0 in found else found[0]
    raise ValueError(
        f"layer {name!r}: no axis of its output follows the samples (shape {tuple(h.shape)} on "
        f"the batch, {one} on one sample; b = {b} or another size): its features are not per "
        "sample. Hook a layer whose output carries the samples on one axis.")


def _is_target_pair(b: Any) -> bool:
    return isinstance(b, tuple | list) and len(b) == 2 and isinstance(b[0], Tensor | Mapping)


def capture_features(
    model: nn.Module, inputs: Any, *, layers: str | Sequence[str] = "auto", pool: str = "mean",
    batch_size: int | None = None,
) -> dict[str, Tensor]:
    """``{layer: (N, D)}`` features of ``model`` on ``inputs`` (see the module docstring).

    ``inputs``: a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``), split
    into batches of ``batch_size`` along dim 0 (``None``: one batch); or an iterable of batches (a
    ``DataLoader``) of the data model (``docs/data.md``): the inputs of each (targets ignored), each
    split again when larger than ``batch_size``. Raises naming the layer if a
    name is unknown or if a hooked layer never ran. A layer that runs ``k > 1`` times in one
    forward (a module shared across depth, as ALBERT's layer) gives one entry per call,
    ``"name#0"`` … ``"name#{k-1}"`` in call order: its features at every depth.

    Args:
        model: the network (run under ``no_grad`` in its current mode).
        inputs: the N samples, as described above.
        layers: ``"auto"`` (:func:`auto_layers`) or a list of qualified module names.
        pool: how a layer output ``(b, ...)`` becomes ``(b, D)``: ``"mean"`` over the sequence
            or spatial axes (masked by an ``attention_mask`` in ``inputs``), ``"last"`` (the last
            position), or ``"flatten"``.
        batch_size: samples per forward (≥ 1); None: the batches as given.

    Returns:
        ``{layer: (N, D)}`` features (detached, on the device the layer ran on), one entry per
        layer (per call, ``"layer#i"``, for a layer that runs several times per forward).

    Raises:
        TypeError: inputs of another type, or a layer whose output is not a tensor (or a tuple
            starting with one).
        ValueError: an unknown ``pool``, bad or unknown ``layers``, ``batch_size`` < 1, inputs
            without samples, a model without submodules (with ``layers="auto"``).
        RuntimeError: a hooked layer never ran, or ran a different number of times in two
            batches.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from neurothermo.alignment import capture_features
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> feats = capture_features(model, torch.randn(10, 4), layers=["1", "2"])
        >>> {name: tuple(f.shape) for name, f in feats.items()}
        {'1': (10, 8), '2': (10, 3)}
    """
    if pool not in ("mean", "last", "flatten"):
        raise ValueError(f"pool must be 'mean', 'last' or 'flatten', got {pool!r}")
    if isinstance(layers, str) and layers != "auto":
        raise ValueError(f"layers must be 'auto' or a list of module names, got {layers!r}")
    names = auto_layers(model) if layers == "auto" else list(layers)
    if not names:
        raise ValueError("layers is empty")
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        avail = [n for n in modules if n][:25]
        raise ValueError(f"unknown layer(s) {unknown}; available (first 25): {avail}")
    n, batches = _batches(inputs, batch_size)
    collected: dict[str, list[Tensor]] = {}
    current: dict[str, list[Tensor]] = {}  # per layer, one pooled output per call
    calls: dict[str, int] = {}  # calls per forward, fixed by the first batch
    mask_now: list[Mapping[str, Tensor] | None] = [None]
    one: dict[str, tuple[int, ...]] = {}  # each layer's output shape on one sample
    axis: dict[str, int] = {}  # each layer's batch axis, found on the first batch of b ≥ 2

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            h = _first_tensor(out, name).detach()
            if probing[0]:
                if not h.is_nested:  # (a nested output has no shape: batch-first, as pooled)
                    one.setdefault(name, tuple(h.shape))
                return
            if not h.is_nested and h.dim() and name in one and h.shape[0] > 1:
                axis.setdefault(name, _batch_axis(name, h, one[name]))
            if axis.get(name, 0):
                h = h.movedim(axis[name], 0)  # time-major (XLNet's [T, b, d]): samples first
            mask = _mask_for(name, h, mask_now[0], pool)
            current.setdefault(name, []).append(pool_output(h, pool, mask))
        return hook

    probing = [False]
    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(hook_for(name)))
        with preserved_state(model, mode="eval"), torch.no_grad():
            first = next((bt for bt, _ in batches if _size(bt) > 1), None)
            if first is not None:  # one sample: which axis of each output follows the batch
                probing[0] = True
                try:
                    _call(model, _first_sample(first))
                finally:
                    probing[0] = False
            for batch, mask in batches:
                current.clear()
                mask_now[0] = mask
                _call(model, batch)
                missing = [nm for nm in names if nm not in current]
                if missing:
                    raise RuntimeError(
                        f"layer(s) {missing} never ran in the forward pass, so they have no features; "
                        "check the names (e.g. a branch the model skipped)"
                    )
                for nm in names:
                    seen = calls.setdefault(nm, len(current[nm]))
                    if len(current[nm]) != seen:
                        raise RuntimeError(
                            f"layer {nm!r} ran {len(current[nm])} times in one forward but "
                            f"{seen} times in the first: its per-call features cannot be "
                            "stacked; capture the batches with the same structure")
                    for i, h in enumerate(current[nm]):
                        collected.setdefault(f"{nm}#{i}" if seen > 1 else nm, []).append(h)
    finally:
        for h in handles:
            h.remove()
    out = {nm: torch.cat(parts) for nm, parts in collected.items()}
    for nm, x in out.items():
        assert x.shape[0] == n, (nm, x.shape)
    return out
