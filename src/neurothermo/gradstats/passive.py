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
batch, the mean loss ``loss_fn(model(x), y)`` and one ``backward`` of it, unscaled. What can be
checked is: a rule that refuses an input (a broadcast ``[1, T]`` input: the extra pass handles
it), a second forward with gradients before ``norms`` (gradient accumulation, two views),
a batch of another size, tensors the rules read modified in place later, an error inside the
forward. Parameters used outside their module's forward are *not* checked here (the check is a
torch-function mode, which an interrupted forward would leave behind): run
:func:`per_sample_grad_norms` once first, as the monitor does, which raises for them. Each makes :meth:`~BackwardCapture.norms`
return ``None`` with :attr:`~BackwardCapture.reason` set, and the caller measures with an extra
pass instead. Models whose rules replace a module's forward (attention) are not captured
(:func:`capturable` says why): the replacement need not give bit-identical outputs, and a monitor
must never change training.
"""
from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from neurothermo._data import batch_size_of
from neurothermo.gradstats._capture import Recorder, recording
from neurothermo.gradstats.norms import _evaluate, _key
from neurothermo.gradstats.rules import rule_for
from neurothermo.gradstats.rules.fallback import tensor_leaves


def capturable(model: nn.Module, params: Mapping[str, Tensor]) -> str | None:
    """``None`` if ``model`` can be captured passively, else the reason why not."""
    wanted = {id(p) for p in params.values()}
    own = [n for n, p in model.named_parameters(recurse=False) if id(p) in wanted]
    if own:
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
        self._rec: Recorder | None = None
        self._ctx: AbstractContextManager[Any] | None = None
        self._delta: dict[tuple[int, int], Tensor | None] = {}
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
        self._state, self._rec, self._delta = "idle", None, {}

    def _fail(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def _leave(self) -> None:
        if self._rec is not None:
            self._rec.active = False
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
        # No expansion of broadcast inputs: the caller's pass must stay bit for bit its own
        # (a rule then refuses the broadcast input, and norms() gives None with the reason).
        self._rec = Recorder(self._b, self._wanted, clone=False, create_graph=False,
                             names=self._names, expand_broadcast=False)
        self._ctx = recording(self.model, self._rec, guard=False)
        self._ctx.__enter__()
        self._state = "recording"

    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
              output: Any) -> None:
        if self._state != "recording":
            return
        self._leave()
        self._state = "recorded"
        rec = self._rec
        assert rec is not None
        if output is None or not any(t.requires_grad for t in tensor_leaves(output)):
            self._fail("the forward raised or its output does not depend on the parameters")
            return
        seen: set[tuple[int, int]] = set()
        for use in rec.uses:
            for edge in use.targets:
                key = _key(edge)
                if key in seen:
                    continue
                seen.add(key)
                self._node_handles.append(edge.node.register_prehook(self._catch(key, edge.output_nr)))

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

        ``batch_size``: b, or the batch itself (data model, ``docs/data.md``). Disarms: arm again
        for the next capture.
        """
        if not isinstance(batch_size, int):
            batch_size = batch_size_of(batch_size)
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
            if rec.modified_in_place():
                self._fail(f"tensors recorded at {rec.modified_in_place()} were modified in place")
                return None
            with torch.no_grad():
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
