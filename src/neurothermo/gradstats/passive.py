"""Per-sample gradient norms read from the caller's own forward and backward pass (no extra pass).

:func:`~neurothermo.gradstats.per_sample_grad_norms` runs its own forward and backward. A training
loop already runs both, so a monitor that wants ``‖g_i‖²`` at some step can instead *arm* a
:class:`BackwardCapture` before that step: the next forward of the model (with gradients enabled)
is recorded by the same layer rules, and the output gradients ``δ = ∂l_B/∂y`` are caught by
hooks on the autograd nodes while the caller's ``loss.backward()`` runs. :meth:`BackwardCapture.norms`
then evaluates the rules: the exact ``[b]`` vector ``‖∇_θ l_i‖²`` (factor ``b²`` as in
``norms.py``: ``g_i`` is sample i's own gradient, ``l_B`` the mean over the batch), for the cost
of the rules alone.

What the caller's pass must be (the monitor's contract anyway): one forward of the model on the
batch, the mean loss ``loss_fn(model(x), y)`` and one ``backward`` of it, unscaled.

Two layouts need more than hooks, and are read without changing a bit of the caller's pass:

* *The model's own parameters* next to its children (timm's ``cls_token`` / ``pos_embed``): an
  op that takes such a parameter ``p`` together with batch tensors runs on ``p`` expanded to the
  batch (``p'[i] = p``), so the gradient reaching ``p'[i]`` is sample i's contribution. Only ops
  whose result is bit for bit the same either way are batched: broadcasting arithmetic (``+``,
  ``*``, ``where`` …, which broadcast by this very stride-0 expansion, and whose backward reduces
  the gradient with the same ``sum_to``), ``expand`` and casts. Any other use declines.
* *Inputs broadcast over the batch* (Hugging Face's ``position_ids`` of shape ``[1, T]``): the
  module's ``[1, T, d]`` output is handed on expanded to the batch (a view), which gives each
  sample its own output gradient. The expanded view may only reach those same ops; any other op
  (a matmul, dropout, indexing) gets the original output, and the capture declines.

What is checked, each making :meth:`~BackwardCapture.norms` return ``None`` with
:attr:`~BackwardCapture.reason` set (the caller then measures with an extra pass): a use of a
parameter or of an expanded output as above that has no bit-for-bit batched form, a parameter used
outside the forward of the module that owns it, a second forward with gradients before ``norms``
(gradient accumulation, two views), a batch of another size, tensors the rules read modified in
place later, an error inside the forward. These checks run as torch-function modes entered in the
model's forward pre-hook and left in its forward hook, which runs also when the forward raises.
Models whose rules replace a module's forward (attention, recurrent layers) are not captured
(:func:`capturable` says why): the replacement need not give bit-identical outputs, and a monitor
must never change training.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_map
from torch.utils.hooks import RemovableHandle

from neurothermo._data import batch_of, model_device
from neurothermo._state import preserved_state
from neurothermo.gradstats._capture import recording
from neurothermo.gradstats._layout import Judgement, judge, probe_log
from neurothermo.gradstats._passive_ops import BroadcastWatch, PassiveRecorder
from neurothermo.gradstats.norms import _evaluate, _key
from neurothermo.gradstats.rules import rule_for
from neurothermo.gradstats.rules._base import judged
from neurothermo.gradstats.rules.fallback import tensor_leaves


def capturable(model: nn.Module, params: Mapping[str, Tensor]) -> str | None:
    """``None`` if ``model`` can be captured passively, else the reason why not."""
    wanted = {id(p) for p in params.values()}
    own = [n for n, p in model.named_parameters(recurse=False) if id(p) in wanted]
    if own and (rule_for(model) is not None or not _has_param_children(model, wanted)):
        return (f"the model's own top-level parameters {own} are used in its own forward, which "
                "the capture starts inside of: they would be left out of the norms")
    for name, module in model.named_modules():
        if not any(id(p) in wanted for p in module.parameters(recurse=False)):
            continue
        rule = rule_for(module)
        if rule is not None and rule.forward is not None:
            return (f"module {name or type(module).__name__!r} ({type(module).__name__}) is measured "
                    "through a replacement forward, which may not match its own bit for bit")
    return None


def _has_param_children(model: nn.Module, wanted: set[int] | frozenset[int]) -> bool:
    return any(id(p) in wanted for c in model.children() for p in c.parameters())


class BackwardCapture:
    """Record the next forward/backward of ``model`` to get per-sample squared gradient norms.

    ``params``: the trainable parameters by name (θ). Use::

        cap = BackwardCapture(model, params)
        cap.arm()                        # before the step's forward
        loss = loss_fn(model(x), y); loss.backward()
        sq = cap.norms(batch_size=x.shape[0])   # [b] ‖g_i‖², or None (see cap.reason)

    The norms are ``‖∇_θ l_i‖²`` of each sample's own loss (the backward of a mean-reduced
    ``l_B`` carries ``1/b``; the capture undoes it), as :func:`per_sample_grad_norms` returns.
    The instance holds hooks only while armed; a pass it cannot read gives ``None`` with
    :attr:`reason` instead of a wrong number.

    Args:
        model: the network whose next forward/backward is recorded.
        params: the trainable parameters θ by name (e.g. ``dict(model.named_parameters())``).

    Raises:
        Nothing: at construction; :meth:`norms` returns ``None`` (and sets :attr:`reason`)
            rather than raising when the recorded pass cannot be read.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import neurothermo as nt
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> loss_fn = nn.CrossEntropyLoss()  # mean-reduced
        >>> params = dict(model.named_parameters())
        >>> cap = nt.BackwardCapture(model, params)
        >>> cap.arm()  # before the step's own forward
        >>> loss_fn(model(x), y).backward()
        >>> sq = cap.norms(32)  # ‖g_i‖² of every sample, read from that backward
        >>> torch.allclose(sq, nt.per_sample_grad_norms(model, loss_fn, (x, y)))
        True
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        self.model = model
        self.params = params
        self._wanted = frozenset(id(p) for p in params.values())
        self._names = {id(p): n for n, p in params.items()}
        self._handles: list[RemovableHandle] = []
        self._node_handles: list[RemovableHandle] = []
        self._state = "idle"  # idle → armed → recording → recorded
        self._rec: PassiveRecorder | None = None
        self._ctx: AbstractContextManager[Any] | None = None
        self._watch: BroadcastWatch | None = None
        self._delta: dict[tuple[int, int], Tensor | None] = {}
        self._seeds: list[Tensor] = []  # gradients reaching a scalar (loss) output of the model
        self.reason: str | None = None

    @property
    def armed(self) -> bool:
        return self._state != "idle"

    def arm(self) -> None:
        """Record the next forward of the model that runs with gradients enabled."""
        self.disarm()
        self.reason = None
        self._state = "armed"
        self._handles = [
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post, with_kwargs=True, always_call=True),
        ]

    def disarm(self) -> None:
        """Remove every hook and drop what was recorded."""
        for h in (*self._handles, *self._node_handles):
            h.remove()
        self._handles, self._node_handles = [], []
        if self._state == "recording":
            self._leave()
        self._state, self._rec, self._delta, self._seeds = "idle", None, {}, []

    def _fail(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _leave(self) -> None:
        if self._rec is not None:
            self._rec.active = False
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # torch's mode, unannotated
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled() or self.reason is not None:
            return
        if self._state != "armed":
            self._fail("the model ran forward more than once with gradients before norms()")
            return
        leaves = tensor_leaves(args) + tensor_leaves(kwargs)
        if not leaves or leaves[0].ndim == 0:
            self._fail("the model's first input is not a batch-first tensor")
            return
        reason = capturable(self.model, self.params)
        if reason is not None:
            self._fail(reason)
            return
        self._b = int(leaves[0].shape[0])
        # Outputs of broadcast inputs are expanded to the batch and free parameters batched only
        # where that leaves the caller's pass bit for bit its own (PassiveRecorder,
        # BroadcastWatch); elsewhere the capture declines and norms() gives None with the reason.
        rec = self._rec = PassiveRecorder(self._b, self._wanted, clone=False, create_graph=False,
                                           names=self._names, expand_broadcast=True)
        self._ctx = recording(self.model, rec, guard=True)
        self._ctx.__enter__()
        self._watch = BroadcastWatch(rec)
        self._watch.__enter__()  # type: ignore[no-untyped-call]  # torch's TorchFunctionMode, unannotated
        # the model's own hooks were collected before this one ran: enter its frame here (its
        # free parameters are then batched op by op, as the hooks do for every other module)
        own = frozenset(id(p) for p in module.parameters(recurse=False)) & self._wanted
        if own:  # (popped by the hook that recording() gave the model)
            free = own if rule_for(module) is None else frozenset()
            rec.enter(type(module).__name__, own, free)
        self._state = "recording"

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              output: Any) -> Any:
        if self._state != "recording":
            return None
        self._leave()
        self._state = "recorded"
        rec = self._rec
        assert rec is not None
        if rec.marked and any(id(t) in rec.marked for t in tensor_leaves(output)):
            self._fail("an expanded broadcast output is part of the model's output")
            marked = rec.marked

            def original(t: Any) -> Any:
                m = marked.get(id(t)) if isinstance(t, Tensor) else None
                return m[1] if m is not None and m[0] is t else t

            return tree_map(original, output)  # the caller gets its own values back
        if rec.problem is not None or rec.free_bad:
            self._fail(rec.problem or f"the model's own parameters "
                       f"{sorted(self._names.get(i, '?') for i in rec.free_bad)} are used in an "
                       "op that does not take them batched")
            return None
        if rec.stray:
            where = "; ".join(f"{p!r} in {m!r}" for p, m in sorted(rec.stray.items()))
            self._fail(f"parameters are used outside the forward of the module that owns them ({where})")
            return None
        if rec.adopted_twice():
            self._fail(f"parameters {rec.adopted_twice()} are used both through their own module "
                       "and directly in another module's forward")
            return None
        if output is None or not any(t.requires_grad for t in tensor_leaves(output)):
            self._fail("the forward raised or its output does not depend on the parameters")
            return None
        seen: set[tuple[int, int]] = set()
        for use in rec.uses:
            for edge in use.targets:
                key = _key(edge)
                if key in seen:
                    continue
                seen.add(key)
                self._node_handles.append(edge.node.register_prehook(self._catch(key, edge.output_nr)))
        # A model that returns its loss (Hugging Face, ``model_loss``): the gradient reaching that
        # scalar must be 1, i.e. the caller backpropagated the loss unscaled (a Trainer under DDP
        # multiplies it by the number of ranks, which would scale every ‖g_i‖² by its square).
        for t in tensor_leaves(output):
            if t.dim() == 0 and t.requires_grad and t.grad_fn is not None:
                edge = get_gradient_edge(t)
                self._node_handles.append(edge.node.register_prehook(self._seed(edge.output_nr)))
        return None

    def _seed(self, index: int) -> Any:
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            d = grad_outputs[index]
            if self._state == "recorded" and d is not None:
                self._seeds.append(d.detach().clone())

        return hook

    def _catch(self, key: tuple[int, int], index: int) -> Any:
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            if self._state == "recorded":
                if key in self._delta:
                    self._fail("backward ran more than once through the recorded forward")
                d = grad_outputs[index]
                # a copy: autograd may pass this very buffer on and accumulate into it later
                self._delta[key] = None if d is None else d.detach().clone()

        return hook

    def norms(self, batch_size: int | Any) -> Tensor | None:
        """``[b]`` of ``‖g_i‖²`` from the recorded pass, or ``None`` (then :attr:`reason` says why).

        ``batch_size``: b, or better the batch itself (data model, ``docs/data.md``): with the
        batch, layer inputs whose leading size is ``b`` only by coincidence (no batch axis, e.g.
        T5's position buckets when the sequence length is ``b``) are found by the layout probe
        (``_layout.py``: one forward on one sample, cached per shape signature, run with the
        model's state preserved) and refused; with ``b`` alone they cannot be told apart. Disarms:
        arm again for the next capture.
        """
        batch = None if isinstance(batch_size, int) else batch_of(batch_size)
        if batch is not None:
            batch_size = batch.size
        try:
            if self.reason is not None:
                return None
            rec = self._rec
            if self._state != "recorded" or rec is None:
                self._fail("no forward with gradients ran since arm()")
                return None
            if self._b != batch_size:
                self._fail(f"the recorded forward had {self._b} samples, the batch has {batch_size}")
                return None
            if not self._delta:
                self._fail("no backward ran through the recorded forward")
                return None
            scaled = [float(d) for d in self._seeds if not bool((d == 1).all())]
            if scaled:
                self._fail(f"the backward started from the model's returned loss scaled by "
                           f"{scaled[0]:g}; the norms are those of the unscaled mean loss")
                return None
            if rec.modified_in_place():
                self._fail(f"tensors recorded at {rec.modified_in_place()} were modified in place")
                return None
            layout = Judgement()
            if batch is not None and batch_size > 1:
                for h in self._handles:  # the probe's forward is not the caller's
                    h.remove()
                self._handles = []
                with preserved_state(self.model):
                    probe = probe_log(self.model, batch.to(model_device(self.model)))
                layout = judge(rec.inputs, batch_size, probe)
            rec.inputs.clear()
            with torch.no_grad(), judged(layout.batchless, layout.folded, layout.axes):
                try:
                    per_param = _evaluate(rec.uses, self._delta)
                except ValueError as e:  # a rule refuses this pass; an extra pass will say why
                    self._fail(str(e))
                    return None
                if not per_param:
                    self._fail("no parameter received a per-sample gradient")
                    return None
                total = torch.stack(list(per_param.values())).sum(0)
            return total * (batch_size * batch_size)
        finally:
            self.disarm()
