"""The layout probe: layer inputs whose leading size equals the batch size by coincidence.

A layer called on a tensor with no batch axis (T5's relative position buckets, ``[q_len, k_len]``)
whose first size happens to be ``b`` looks batch-first to every rule. Without the probe the
per-sample norms were silently wrong (4.5e-4 relative error on T5 at q_len = b). References: the
per-sample loop (one backward per sample, float64); the controls are the same models with the
cause removed (the layer called on batched input), which must not be refused.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import neurothermo as nt
from neurothermo.gradstats import BackwardCapture, FallbackWarning, LayoutWarning
from neurothermo.gradstats._layout import probe_log

DT = torch.float64


def loop_norms(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """``‖∇_θ l_i‖²`` one sample at a time (the independent reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(y.shape[0]):
        xi = {k: v[i:i + 1] for k, v in x.items()} if isinstance(x, dict) else x[i:i + 1]
        o = model(**xi) if isinstance(xi, dict) else model(xi)
        gs = torch.autograd.grad(loss_fn(o, y[i:i + 1]), params, allow_unused=True)
        out.append(sum(g.square().sum() for g in gs if g is not None))
    return torch.stack(out)


class PositionBias(nn.Module):
    """``x + emb(positions)``: with ``batched=False`` the embedding runs on ``arange(T)`` (no batch
    axis, its ``[T, d]`` output shared by every sample), else on the positions expanded to
    ``[b, T]``; with ``through``, the shared output passes a Linear before it meets ``x``."""

    def __init__(self, d: int = 5, t_max: int = 8, batched: bool = False,
                 through: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(t_max, d)
        self.mix = nn.Linear(d, d) if through else None
        self.proj = nn.Linear(d, 3)
        self.batched = batched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        if self.batched:
            pos = pos.expand(x.shape[0], -1)
        e = self.emb(pos) if self.mix is None else self.mix(self.emb(pos))
        return self.proj(torch.tanh(x + e)).mean(1)


def _data(b: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 5, generator=g, dtype=DT), torch.randn(b, 3, generator=g, dtype=DT)


@pytest.mark.parametrize(("b", "t"), [(4, 4), (4, 6), (3, 5)])
def test_a_shared_layer_output_is_measured_where_it_meets_the_batch(b: int, t: int) -> None:
    """The embedding runs on ``arange(T)`` (no batch axis; T = b included): its output is
    followed to ``x + pos``, where each sample's share of the gradient is read; exact."""
    torch.manual_seed(0)
    model = PositionBias().to(DT)
    x, y = _data(b, t)
    got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(got, loop_norms(model, nn.MSELoss(), x, y), rtol=1e-12, atol=0)


def test_control_a_shared_output_through_a_layer_is_refused_with_the_way_out() -> None:
    """The shared output goes through a recorded layer before it meets the batch: that layer's
    rule would read its rows as samples, so the module is refused, naming it and the way out;
    the way out (the embedding frozen) is exact."""
    torch.manual_seed(0)
    model = PositionBias(through=True).to(DT)
    x, y = _data(4, 4)
    with pytest.raises(nt.PerSampleUnsupportedError,
                       match=r"'emb' \(Embedding\) gives an output every sample shares.*"
                             r"module 'mix' takes it as an input.*requires_grad_\(False\)"):
        nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    model.emb.requires_grad_(False)
    got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(got, loop_norms(model, nn.MSELoss(), x, y), rtol=1e-12, atol=0)


def test_what_the_probe_prevents_is_a_silently_wrong_number() -> None:
    """The reason for the probe, measured: with its log emptied, the same call returns norms that
    differ from the loop's (the rule reads positions as samples)."""
    import neurothermo.gradstats.norms as norms_mod

    torch.manual_seed(0)
    model = PositionBias().to(DT)
    x, y = _data(4, 4)
    real = norms_mod.probe_log
    norms_mod.probe_log = lambda model, batch: None  # type: ignore[assignment]
    try:
        wrong = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    finally:
        norms_mod.probe_log = real
    ref = loop_norms(model, nn.MSELoss(), x, y)
    assert (wrong - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize(("b", "t"), [(4, 4), (3, 4), (1, 4), (4, 1)])
def test_batched_positions_are_not_refused(b: int, t: int) -> None:
    """Control: the same layer on positions expanded to the batch follows it; no refusal at any
    b, T (b = T included), and the norms equal the loop's."""
    torch.manual_seed(0)
    model = PositionBias(batched=True).to(DT)
    x, y = _data(b, t)
    got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(got, loop_norms(model, nn.MSELoss(), x, y), rtol=1e-12, atol=0)


class MaskedMix(nn.Module):
    """No rule (fallback): ``y = (mask @ x) W`` with a ``[T, T]`` mask shared by every sample."""

    def __init__(self, d: int = 5) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, 3) * 0.3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ts,bsd,de->bte", mask, x, self.w)


class MaskedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = MaskedMix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.tril(torch.ones(t, t, dtype=x.dtype, device=x.device))
        return torch.tanh(self.mix(x, mask)).mean(1)


def test_fallback_holds_a_batch_less_input_constant() -> None:
    """The torch.func fallback maps over inputs of leading size b; a shared ``[T, T]`` mask with
    T = b was mapped over too (each sample got one row of it). The probe marks it batch-less, so
    it is held constant, and the norms equal the loop's."""
    torch.manual_seed(0)
    model = MaskedNet().to(DT)
    x, y = _data(4, 4)
    with pytest.warns(FallbackWarning):
        got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    torch.testing.assert_close(got, loop_norms(model, nn.MSELoss(), x, y), rtol=1e-12, atol=0)


def test_t5_relative_bias_is_measured_at_every_sequence_length() -> None:
    """T5's relative position bias (an Embedding on ``[q_len, k_len]`` buckets, no batch axis):
    followed to where it meets the attention mask; exact at q_len = b (silently 4.5e-4 wrong
    before the probe) and at q_len ≠ b (refused before), in the norms and in Tr Σ."""
    pytest.importorskip("transformers")
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg).double().eval()

    def ce(out, t):
        return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), t.reshape(-1))

    # (b = 2 = the number of heads: the bias's permute gives a leading 2, an op on the shared
    # tensor alone, which must stay a derived shared tensor, not a meeting with the batch)
    for b, t_enc, t_dec in ((4, 4, 4), (4, 6, 5), (2, 5, 3)):
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(b, t_enc, dtype=torch.long)
        mask[0, -2:] = 0
        x = {"input_ids": torch.randint(1, 32, (b, t_enc), generator=g), "attention_mask": mask,
             "decoder_input_ids": torch.randint(1, 32, (b, t_dec), generator=g)}
        y = torch.randint(1, 32, (b, t_dec), generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            got = nt.per_sample_grad_norms(model, ce, (x, y), by_parameter=True)
        params = dict(model.named_parameters())
        for name in ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"):
            ref = torch.stack([torch.autograd.grad(
                ce(model(**{k: v[i:i + 1] for k, v in x.items()}), y[i:i + 1]),
                params[name])[0].square().sum() for i in range(b)])
            assert float(ref.min()) > 0
            torch.testing.assert_close(got[name], ref, rtol=1e-10, atol=0)
        total = sum(got.values())
        torch.testing.assert_close(total, loop_norms(model, ce, x, y), rtol=1e-10, atol=0)


def test_passive_capture_declines_with_the_batch_and_names_the_module() -> None:
    torch.manual_seed(0)
    model = PositionBias().to(DT)
    params = dict(model.named_parameters())
    x, y = _data(4, 4)
    cap = BackwardCapture(model, params)
    cap.arm()
    nn.MSELoss()(model(x), y).backward()
    assert cap.norms((x, y)) is None
    assert "'emb'" in (cap.reason or "") and "only by coincidence" in (cap.reason or "")
    # control: the batched layout is captured, equal to the loop
    model = PositionBias(batched=True).to(DT)
    cap = BackwardCapture(model, dict(model.named_parameters()))
    cap.arm()
    nn.MSELoss()(model(x), y).backward()
    got = cap.norms((x, y))
    assert got is not None, cap.reason
    torch.testing.assert_close(got, loop_norms(model, nn.MSELoss(), x, y), rtol=1e-12, atol=0)


def test_monitor_goes_on_without_noise_columns_and_says_why() -> None:
    """The monitor never ends a training run: the refusal becomes one MonitorWarning naming the
    layer and the way out, the noise columns are left out, and no later step tries again."""
    torch.manual_seed(0)
    model = PositionBias(through=True).to(DT)
    x, y = _data(4, 4)
    mon = nt.ThermoMonitor(model, nn.MSELoss(), noise_every=1, symmetries=None)
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with pytest.warns(nt.MonitorWarning, match=r"'emb'.*every sample shares.*requires_grad_"):
        hist = nt.train(model, nn.MSELoss(), (x, y), lr=0.1, batch_size=4, steps=3, monitor=mon)
    assert "entropic/trace_sigma" not in hist and len(hist["loss"]) == 3
    # the steps' own forwards (4 samples), one refused extra pass (4) after its probe (1) only
    assert calls == [4, 1, 4, 4, 4]
    model.emb.requires_grad_(False)  # the way out: the columns are there
    mon = nt.ThermoMonitor(model, nn.MSELoss(), noise_every=1, symmetries=None)
    hist = nt.train(model, nn.MSELoss(), (x, y), lr=0.1, batch_size=4, steps=2, monitor=mon)
    assert len(hist["entropic/trace_sigma"]) == 2


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = PositionBias(batched=True)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.net(x)


def test_probe_runs_once_per_shape_signature_and_leaves_the_rng_alone() -> None:
    torch.manual_seed(0)
    model = Counting().to(DT)
    x, y = _data(4, 4)
    nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    assert model.calls == [1, 4]  # the probe on one sample, then the pass
    nt.per_sample_grad_norms(model, nn.MSELoss(), (x[:3], y[:3]))  # other b, same shapes
    nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    assert model.calls == [1, 4, 3, 4]
    x5, y5 = _data(4, 5)  # another sequence length: a new signature
    nt.per_sample_grad_norms(model, nn.MSELoss(), (x5, y5))
    assert model.calls == [1, 4, 3, 4, 1, 4]
    from neurothermo._data import as_batch
    drop = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.5)).to(DT)
    state = torch.get_rng_state()
    assert probe_log(drop, as_batch((x[:, 0], y), nn.MSELoss())) is not None
    assert torch.equal(torch.get_rng_state(), state)


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 4:
            raise ValueError("this model takes batches of 4")
        return self.lin(x).mean(1)


def test_a_model_that_refuses_sub_batches_warns_once_and_still_measures() -> None:
    torch.manual_seed(0)
    model = FixedBatch().to(DT)
    x, y = _data(4, 2)
    with pytest.warns(LayoutWarning, match="layout probe .* failed"):
        got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    params = list(model.parameters())
    ref = []
    for i in range(4):
        # the loop runs the full batch with only sample i's loss (the model needs 4 samples)
        out = model(x)
        gs = torch.autograd.grad(F.mse_loss(out[i:i + 1], y[i:i + 1]), params)
        ref.append(sum(g.square().sum() for g in gs))
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutWarning)  # once per model
        nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))


def test_sharded_models_are_not_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward of an FSDP2 model is collective: a probe run by some ranks only would hang the
    others, so a model with sharded (DTensor) parameters is not probed, with one warning."""
    from neurothermo.gradstats import _layout

    monkeypatch.setattr(_layout, "_sharded", lambda model: True)
    torch.manual_seed(0)
    model = Counting().to(DT)
    x, y = _data(4, 4)
    with pytest.warns(LayoutWarning, match="sharded"):
        got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    assert model.calls == [4]  # no probe forward
    torch.testing.assert_close(got, loop_norms(model, nn.MSELoss(), x, y), rtol=1e-12, atol=0)


class SharedPositions(nn.Embedding):
    """Learned positions from the shape of the ``[b, T]`` token ids (BART's layout): the output,
    ``[1, T, d]``, is shared by every sample; a subclass with its own forward, so no rule."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pos = torch.arange(ids.shape[1], device=ids.device)
        return super().forward(pos).unsqueeze(0)


class Tokens(nn.Module):
    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.tok = nn.Embedding(10, 5)
        self.pos = SharedPositions(8, 5) if not mix else BatchMean()
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids)
        return self.head(torch.tanh(h + self.pos(ids if isinstance(self.pos, SharedPositions)
                                                 else h))).mean(1)


class BatchMean(nn.Module):
    """A leading-1 output that mixes the samples: ``w ⊙ mean over the batch``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w * h.mean(0, keepdim=True)


def test_a_shared_output_of_leading_one_is_measured_per_sample() -> None:
    """BART's learned positions: the ``[1, T, d]`` output is expanded to the batch, each sample
    gets its own output gradient, and the norms equal the loop's (T = b included)."""
    for t in (4, 6):
        torch.manual_seed(0)
        model = Tokens().to(DT)
        g = torch.Generator().manual_seed(3)
        x, y = torch.randint(0, 10, (4, t), generator=g), torch.randn(4, 3, generator=g, dtype=DT)
        with pytest.warns(FallbackWarning):
            got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
        torch.testing.assert_close(got, loop_norms(model, nn.MSELoss(), x, y), rtol=1e-12, atol=0)


def test_control_a_leading_one_output_that_mixes_samples_is_refused() -> None:
    torch.manual_seed(0)
    model = Tokens(mix=True).to(DT)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 10, (4, 6), generator=g), torch.randn(4, 3, generator=g, dtype=DT)
    with pytest.warns(FallbackWarning), pytest.raises(nt.PerSampleUnsupportedError,
                                                      match="'pos'.*does not reproduce"):
        nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))


class Cache:
    """State for the whole batch, as a Hugging Face cache holds it."""

    def __init__(self, b: int) -> None:
        self.b = b


class Cached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 3))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if x.shape[0] != cache.b:
            raise RuntimeError(f"Sizes of tensors must match: {x.shape[0]} vs {cache.b}")
        return x @ self.w


class CachedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = Cached()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, cache=Cache(x.shape[0])).mean(1)


def test_fallback_names_the_way_out_when_a_module_cannot_run_on_one_sample() -> None:
    torch.manual_seed(0)
    model = CachedNet().to(DT)
    x, y = _data(4, 2)
    with pytest.warns(FallbackWarning), pytest.raises(
            nt.PerSampleUnsupportedError, match=r"'layer'.*one sample at a time \(RuntimeError: "
                                                r"Sizes.*use_cache=False.*requires_grad_"):
        nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))


class Windows(nn.Module):
    """Window attention's layout: ``[b, T, d]`` folded sample-major into ``[b·w, T/w, d]`` (each
    sample's windows together), a Linear, a LayerNorm and a rule-less module on the windows,
    unfolded again; or, with ``interleaved``, the window index outermost (``[w·b, …]``)."""

    def __init__(self, w: int = 3, interleaved: bool = False) -> None:
        super().__init__()
        self.w, self.interleaved = w, interleaved
        self.proj = nn.Linear(5, 5)
        self.norm = nn.LayerNorm(5)
        self.gain = Gain()
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        win = x.reshape(b, self.w, t // self.w, d)
        if self.interleaved:
            win = win.transpose(0, 1)
        h = self.gain(self.norm(torch.tanh(self.proj(win.reshape(-1, t // self.w, d)))))
        h = h.reshape(self.w, b, t // self.w, d).transpose(0, 1) if self.interleaved else h
        return self.head(h.reshape(b, t, d)).mean(1)


class Gain(nn.Module):
    """No rule (the torch.func fallback): ``x ⊙ g`` plus a window-mean term."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.g + x.mean(1, keepdim=True) * self.g.square()


def test_a_sample_major_fold_of_the_batch_is_measured() -> None:
    """Swin-style windows: the probe sees ``[w·b', …]`` and the first rows equal its own, so
    sample i owns rows [i·w, (i+1)·w); the Linear, LayerNorm and fallback pieces are exact."""
    for b in (4, 3):
        torch.manual_seed(0)
        model = Windows().to(DT)
        x, y = _data(b, 6)
        with pytest.warns(FallbackWarning):
            got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y), by_parameter=True)
        ref = {n: torch.stack([sum(g.square().sum() for g in torch.autograd.grad(
            nn.MSELoss()(model(x[i:i + 1]), y[i:i + 1]), [p])) for i in range(b)])
            for n, p in model.named_parameters()}
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=0, msg=n)


def test_control_a_window_major_fold_is_refused_and_the_order_check_matters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same layers with the window index outermost: rows of a sample are not together, so
    it is refused (naming the fold); and accepting it regardless (the order check skipped) gives
    wrong norms, which is what the check prevents."""
    torch.manual_seed(0)
    model = Windows(interleaved=True).to(DT)
    x, y = _data(4, 6)
    with pytest.raises(nt.PerSampleUnsupportedError, match=r"'proj'.*leading dimension 12.*"
                                                            r"multiple of the batch size"):
        nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    from neurothermo.gradstats import _layout

    monkeypatch.setattr(_layout, "_fold", lambda probe, leaf, t, m: m)
    _layout._CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        wrong = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))
    ref = loop_norms(model, nn.MSELoss(), x, y)
    assert (wrong - ref).abs().max() > 1e-3 * ref.abs().max()


def test_hf_swin_with_its_bias_tables_frozen_is_exact() -> None:
    """Hugging Face Swin: windows folded into the batch (exact, as above); its relative position
    bias tables feed every sample alike (refused, naming them and the way out, which is exact)."""
    pytest.importorskip("transformers")
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    cfg = SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[2, 1],
                     num_heads=[2, 2], window_size=2, mlp_ratio=2.0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3)
    model = SwinForImageClassification(cfg).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    x = {"pixel_values": torch.randn(4, 3, 8, 8, generator=g, dtype=DT)}
    y = torch.randint(0, 3, (4,), generator=g)

    def ce(out, t):
        return F.cross_entropy(out.logits, t)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(nt.PerSampleUnsupportedError,
                           match=r"relative_position_bias'.*requires_grad_\(False\)"):
            nt.per_sample_grad_norms(model, ce, (x, y))
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.requires_grad_(False)
        got = nt.per_sample_grad_norms(model, ce, (x, y))
    torch.testing.assert_close(got, loop_norms(model, ce, x, y), rtol=1e-10, atol=0)


class Adopting(nn.Module):
    """No rule: its own forward uses its child's weight directly (as HF Mamba's mixer passes
    ``conv1d.weight`` and ``dt_proj.weight`` to its kernels); with ``call_child`` the child also
    runs as a module, and with ``own=False`` the parent owns no parameter of its own."""

    def __init__(self, call_child: bool = False, own: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 5)
        if own:
            self.scale = nn.Parameter(torch.randn(5))
        self.call_child = call_child

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, self.proj.weight, self.proj.bias))
        if self.call_child:
            h = h + self.proj(x)
        return h * self.scale if hasattr(self, "scale") else h


class AdoptingNet(nn.Module):
    def __init__(self, **kw: bool) -> None:
        super().__init__()
        self.block = Adopting(**kw)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x)).mean(1)


def test_a_module_without_rule_measures_child_weights_its_forward_uses() -> None:
    torch.manual_seed(0)
    model = AdoptingNet().to(DT)
    x, y = _data(4, 3)
    with pytest.warns(FallbackWarning, match="'block'"):
        got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y), by_parameter=True)
    assert set(got) == {"block.proj.weight", "block.proj.bias", "block.scale", "head.weight",
                        "head.bias"}
    for n, p in model.named_parameters():
        ref = torch.stack([sum(g.square().sum() for g in torch.autograd.grad(
            nn.MSELoss()(model(x[i:i + 1]), y[i:i + 1]), [p])) for i in range(4)])
        torch.testing.assert_close(got[n], ref, rtol=1e-12, atol=0, msg=n)


def test_controls_for_adoption_are_refused_with_the_way_out() -> None:
    """The child also run as a module: its two uses cannot be told apart. A parent with no
    parameter of its own opens no record to adopt into. Both refused, naming requires_grad_."""
    x, y = _data(4, 3)
    for kw, pattern in (({"call_child": True}, r"used both through their own module"),
                        ({"own": False}, r"outside the forward of the module that owns them")):
        torch.manual_seed(0)
        model = AdoptingNet(**kw).to(DT)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            with pytest.raises(nt.PerSampleUnsupportedError,
                               match=pattern + r".*requires_grad_\(False\)"):
                nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))


def test_hf_mamba_without_cache_is_exact() -> None:
    """Hugging Face Mamba (pure-torch path): the mixer has no rule and passes its children's
    weights to its kernels, so its fallback measures them; exact against the loop. With its
    cache on, the fallback names use_cache=False as the way out."""
    pytest.importorskip("transformers")
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    cfg = MambaConfig(vocab_size=32, hidden_size=16, state_size=4, num_hidden_layers=1,
                      expand=2, conv_kernel=3, time_step_rank=2)
    model = MambaForCausalLM(cfg).to(DT).eval()
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 32, (4, 6), generator=g), torch.randint(0, 32, (4, 6), generator=g)

    def ce(out, t):
        return F.cross_entropy(out.logits.reshape(-1, 32), t.reshape(-1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        with pytest.raises(nt.PerSampleUnsupportedError, match=r"mixer.*use_cache=False"):
            nt.per_sample_grad_norms(model, ce, ({"input_ids": ids}, y))
        got = nt.per_sample_grad_norms(model, ce, ({"input_ids": ids, "use_cache": False}, y))
    ref = loop_norms(model, lambda o, t: ce(o, t), {"input_ids": ids}, y)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)


class RelBias(nn.Module):
    """Attention-like scores plus a relative bias from buckets ``[T, T]`` (T5's layout): the
    bias goes through ``permute``/``unsqueeze``/a slice, then meets the batch in place
    (``scores += bias``); with ``twice``, two shared biases are added to each other first."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.rel = nn.Embedding(7, 2)
        self.rel2 = nn.Embedding(7, 2) if twice else None
        self.q = nn.Linear(5, 4)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        pos = torch.arange(t)
        buckets = (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3
        bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0)[:, :, :t, :]  # [1, 2, T, T]
        if self.rel2 is not None:
            bias = bias + self.rel2(buckets).permute(2, 0, 1).unsqueeze(0)
        q = self.q(x).reshape(x.shape[0], t, 2, 2).transpose(1, 2)  # [b, 2, T, 2]
        scores = q @ q.transpose(-1, -2)
        scores += bias
        return self.head(torch.softmax(scores, -1).mean(1) @ x).mean(1)


def test_a_shared_bias_meeting_the_batch_in_place_is_exact() -> None:
    for b, t in ((4, 4), (3, 5)):
        torch.manual_seed(0)
        model = RelBias().to(DT)
        x, y = _data(b, t)
        got = nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y), by_parameter=True)
        p = model.rel.weight
        ref = torch.stack([torch.autograd.grad(nn.MSELoss()(model(x[i:i + 1]), y[i:i + 1]),
                                               p)[0].square().sum() for i in range(b)])
        torch.testing.assert_close(got["rel.weight"], ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(sum(got.values()), loop_norms(model, nn.MSELoss(), x, y),
                                   rtol=1e-12, atol=0)


def test_control_two_shared_tensors_meeting_each_other_are_refused() -> None:
    torch.manual_seed(0)
    model = RelBias(twice=True).to(DT)
    x, y = _data(4, 5)
    with pytest.raises(nt.PerSampleUnsupportedError, match=r"'rel'.*takes two shared tensors"):
        nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))


def test_control_a_shared_bias_meeting_a_non_batch_first_result_is_refused() -> None:
    """The bias is added to scores laid out ``[T, b, …]`` (not batch-first): no per-sample share
    can be read there, so it is refused, not taken for a derived shared tensor."""

    class SeqFirst(RelBias):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = x.shape[1]
            pos = torch.arange(t)
            bias = self.rel((pos[None, :] - pos[:, None]).clamp(-3, 3) + 3)  # [T, T, 2]
            h = self.q(x).transpose(0, 1)  # [T, b, 4]
            mixed = h[..., :2].unsqueeze(1) + bias.unsqueeze(2)  # [T, T, b, 2]
            return self.head(x).mean(1) + mixed.mean((0, 1)).sum(-1, keepdim=True)

    torch.manual_seed(0)
    model = SeqFirst().to(DT)
    x, y = _data(4, 5)
    with pytest.raises(nt.PerSampleUnsupportedError, match=r"'rel'.*meets the batch in 'add'"):
        nt.per_sample_grad_norms(model, nn.MSELoss(), (x, y))


def test_a_time_major_input_at_t_equal_b_is_named_as_such() -> None:
    """``[T, b, d]`` into a Linear with T = b: the probe sees the samples on axis 1, and the
    refusal says so (moving the batch axis first is the way out), not "no batch axis"."""

    class SeqFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.transpose(0, 1)).mean(0)

    torch.manual_seed(0)
    x, y = _data(4, 4)
    with pytest.raises(nt.PerSampleUnsupportedError,
                       match=r"'lin' got an input of shape \(4, 4, 5\) whose samples are on "
                             r"axis 1.*batch_first"):
        nt.per_sample_grad_norms(SeqFirst().to(DT), nn.MSELoss(), (x, y))
