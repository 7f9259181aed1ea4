"""Every second-order path through ``scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

The fused SDPA kernels (flash on CPU and CUDA, memory-efficient, cuDNN) have no second derivative;
each function selects the math kernel inside the call and restores the caller's choice. References
are independent of that choice: central differences of the gradient in float64, computed with the
caller's default (fused) kernels, whose truncation error is ``O(h²)`` (h = 1e-5: ≈ 1e-10 relative)
and rounding ``≈ ε₆₄‖∇L‖/h ≈ 1e-11``; the tolerance 1e-6 leaves five orders of margin for the
conditioning of a sum over ~10⁴ parameters, and is far below any kernel or factor error.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import neurothermo as nt
from foreign_models import HAS_TRANSFORMERS, VisionTransformer, devices, hf_bert, hf_gpt2
from neurothermo._state import ModeWarning

H = 1e-5
RTOL = 1e-6


class Ids(nn.Module):
    """An HF model called on a tensor of ``input_ids`` (no dict batches needed), returning logits."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, ids: Tensor) -> Tensor:
        return self.hf(input_ids=ids).logits


class MHANet(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (batch_first, need_weights=False: SDPA)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        o, _ = self.attn(h, h, h, need_weights=False)
        return self.head(o.mean(1))


def lm_loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build(name: str, device: str) -> tuple[nn.Module, tuple[Tensor, Tensor], object]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        model: nn.Module = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1,
                                             num_heads=2)
        x, y = torch.randn(3, 3, 16, 16, generator=g), torch.randint(0, 10, (3,), generator=g)
        loss = F.cross_entropy
    elif name == "mha":
        model = MHANet()
        x, y = torch.randn(3, 5, 4, generator=g), torch.randint(0, 3, (3,), generator=g)
        loss = F.cross_entropy
    else:
        if not HAS_TRANSFORMERS:
            pytest.skip("transformers is not installed (dev extra)")
        hf = hf_bert(layers=1, hidden=16) if name == "bert" else hf_gpt2(layers=1, hidden=16)
        model = Ids(hf)
        ids = torch.randint(0, 64, (3, 7), generator=g)
        if name == "bert":
            x, y, loss = ids, torch.randint(0, 3, (3,), generator=g), F.cross_entropy
        else:
            x, y, loss = ids, torch.randint(0, 64, (3, 7), generator=g), lm_loss
    model = model.to(device=device, dtype=torch.float64).eval()
    return model, (x.to(device=device, dtype=torch.float64 if x.is_floating_point() else x.dtype),
                   y.to(device)), loss


NAMES = ["vit", "bert", "gpt2", "mha"]


def flat_grad(model: nn.Module, loss_fn, batch, names: list[str], shift: Tensor | None = None) -> Tensor:
    """∇L over the parameters ``names`` at θ + shift, with the caller's (default) kernels."""
    params = dict(model.named_parameters())
    ps = [params[n] for n in names]
    with torch.no_grad():
        if shift is not None:
            off = 0
            for p in ps:
                p.add_(shift[off:off + p.numel()].view_as(p))
                off += p.numel()
    try:
        loss = loss_fn(model(batch[0]), batch[1])
        gs = torch.autograd.grad(loss, ps, allow_unused=True)
        return torch.cat([torch.zeros_like(p).reshape(-1) if gi is None else gi.reshape(-1)
                          for gi, p in zip(gs, ps)])
    finally:
        with torch.no_grad():
            if shift is not None:
                off = 0
                for p in ps:
                    p.sub_(shift[off:off + p.numel()].view_as(p))
                    off += p.numel()


def trainable(model: nn.Module, names: list[str]) -> Tensor:
    """0/1 over the flat parameters ``names``: 0 on the padding row of an embedding (BERT's word
    embeddings), which is used in the forward pass but never trains (its gradient is zeroed)."""
    params = dict(model.named_parameters())
    parts = []
    for n in names:
        m = torch.ones_like(params[n])
        mod = model.get_submodule(n.rsplit(".", 1)[0]) if "." in n else model
        if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
            m[mod.padding_idx] = 0
        parts.append(m.reshape(-1))
    return torch.cat(parts)


def fd_hvp(model, loss_fn, batch, names, v: Tensor) -> Tensor:
    """``P H P v`` by a central difference of the gradient along ``Pv/‖Pv‖`` (step H), scaled back
    by ``‖Pv‖``; ``P`` zeroes the rows that never train (``trainable``)."""
    mask = trainable(model, names)
    v = mask * v
    nrm = torch.linalg.vector_norm(v)
    u = v / nrm
    return mask * nrm * (flat_grad(model, loss_fn, batch, names, H * u)
                         - flat_grad(model, loss_fn, batch, names, -H * u)) / (2 * H)


def attention_slice(model: nn.Module, name: str) -> list[str]:
    """A few parameters whose Hessian block passes through the attention's second derivative."""
    key = {"vit": "attn.qkv", "mha": "attn.in_proj", "bert": "attention.self.query",
           "gpt2": "attn.c_attn"}[name]
    return [n for n, _ in model.named_parameters() if key in n and n.endswith("bias")]


def sdp_flags() -> tuple[bool, ...]:
    return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
            torch.backends.mha.get_fastpath_enabled())


def dense(model, loss_fn, batch, names) -> Tensor:
    n = sum(dict(model.named_parameters())[k].numel() for k in names)
    eye = torch.eye(n, dtype=torch.float64, device=batch[1].device)
    Hm = torch.stack([fd_hvp(model, loss_fn, batch, names, eye[i]) for i in range(n)])
    return (Hm + Hm.T) / 2


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", NAMES)
def test_every_second_order_path_is_exact_through_attention(name: str, device: str) -> None:
    model, batch, loss_fn = build(name, device)
    names = attention_slice(model, name)
    assert names
    all_names = [n for n, _ in model.named_parameters()]
    before = sdp_flags()
    # hvp on the whole model against the float64 finite difference (default kernels)
    g = torch.Generator().manual_seed(2)
    v_flat = torch.randn(sum(p.numel() for p in model.parameters()), generator=g,
                         dtype=torch.float64).to(device)
    hv = nt.hvp(model, loss_fn, batch, v_flat)
    hv_flat = torch.cat([t.reshape(-1) for t in hv.values()])
    ref = fd_hvp(model, loss_fn, batch, all_names, v_flat)
    assert torch.allclose(hv_flat, ref, rtol=0, atol=RTOL * float(ref.abs().max()))
    # entropic force −(lr/2)·H g over all parameters
    lr = 0.1
    gvec = flat_grad(model, loss_fn, batch, all_names)
    force = nt.entropic_force(model, loss_fn, batch, lr=lr)
    f_flat = torch.cat([t.reshape(-1) for t in force.values()])
    ref_f = -lr / 2 * fd_hvp(model, loss_fn, batch, all_names, gvec)
    assert torch.allclose(f_flat, ref_f, rtol=0, atol=RTOL * float(ref_f.abs().max()))
    # the expected force's discretization part −(lr/2)·H ∇L (one chunk = the whole data)
    if name in ("vit", "mha"):  # HF: per-sample norms of broadcast position_ids are h/rules' (issue 15.3)
        exp = nt.expected_entropic_force(model, loss_fn, batch, lr=lr, batch_size=1)
        d_flat = torch.cat([exp.discretization[n].reshape(-1) for n in all_names])
        assert torch.allclose(d_flat, ref_f, rtol=0, atol=RTOL * float(ref_f.abs().max()))
        dec = nt.entropic_decomposition(model, loss_fn, batch, lr=lr, batch_size=1)
        assert dec.grad_norm_sq == pytest.approx(float(gvec @ gvec), rel=1e-10)
    # regularizer: ∇R = (lr/2)·H g, differentiated by the caller's own backward (default kernels)
    reg = nt.EntropicRegularizer(lr=lr)(model, loss_fn, batch)
    rg = torch.autograd.grad(reg, list(model.parameters()), allow_unused=True)
    rg_flat = torch.cat([torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1)
                         for t, p in zip(rg, model.parameters())]) * trainable(model, all_names)
    assert torch.allclose(rg_flat, -ref_f, rtol=0, atol=RTOL * float(ref_f.abs().max()))
    # entropic loss φ = l + (lr/4)‖g‖²: ∇φ = g + (lr/2)·H g by the caller's backward; one Euler
    # step of the entropic flow is θ − t·∇φ
    phi = nt.entropic_loss(model, loss_fn, batch, lr=lr)
    pg = torch.autograd.grad(phi, list(model.parameters()), allow_unused=True)
    pg_flat = torch.cat([torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1)
                         for t, p in zip(pg, model.parameters())]) * trainable(model, all_names)
    ref_phi = gvec - ref_f
    assert torch.allclose(pg_flat, ref_phi, rtol=0, atol=RTOL * float(ref_phi.abs().max()))
    end = nt.entropic_flow(model, loss_fn, batch, lr=lr, time=1e-3, steps=1, method="euler")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    step = torch.cat([end[n].reshape(-1) for n in all_names]) - theta
    assert torch.allclose(step * trainable(model, all_names), -1e-3 * ref_phi, rtol=0,
                          atol=RTOL * 1e-3 * float(ref_phi.abs().max()))
    # eigenvalues, trace and tracker on the attention slice against its dense Hessian
    Hs = dense(model, loss_fn, batch, names)
    lam = torch.linalg.eigvalsh(Hs)
    top = nt.top_eigenvalues(model, loss_fn, batch, k=2, tol=1e-8, param_filter=names)
    assert torch.allclose(top.values, lam.flip(0)[:2].cpu(), rtol=1e-6, atol=1e-9 * float(lam.abs().max()))
    d = Hs.shape[0]  # Hutch++ with a sketch of ≥ d vectors spans the slice: the trace is exact
    tr = nt.hessian_trace(model, loss_fn, batch, n_samples=3 * d + 3, method="hutch++", param_filter=names)
    assert tr.estimate == pytest.approx(float(Hs.trace()), rel=1e-6, abs=1e-9 * float(lam.abs().max()))
    tracker = nt.SharpnessTracker(tol=1e-8, param_filter=names)
    for _ in range(2):
        reading = tracker.update(model, loss_fn, batch)
        assert reading.lambda_max == pytest.approx(float(lam[-1]), rel=1e-6)
    assert sdp_flags() == before


@pytest.mark.parametrize("name", ["vit", "mha"])
def test_the_callers_kernel_choice_is_restored_also_on_error(name: str) -> None:
    model, batch, loss_fn = build(name, "cpu")
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            chosen = sdp_flags()
            assert chosen[:3] == (True, False, False)
            nt.top_eigenvalues(model, loss_fn, batch, tol=1e-2, param_filter=attention_slice(model, name))
            assert sdp_flags() == chosen
            nt.entropic_force(model, loss_fn, batch, lr=0.1)
            assert sdp_flags() == chosen
            with pytest.raises(ValueError, match="shape"):
                nt.entropic_force(model, lambda o, t: F.cross_entropy(o, t, reduction="none"),
                                  batch, lr=0.1)
            assert sdp_flags() == chosen
            # without the selection inside the call the double backward raises: the kernel
            # choice is what the functions fix, not something the caller has to know about
            if name == "vit":
                loss = loss_fn(model(batch[0]), batch[1])
                gs = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
                with pytest.raises(RuntimeError, match="derivative for"):
                    torch.autograd.grad(sum(g.sum() for g in gs), list(model.parameters()))
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert sdp_flags() == (True, True, True, True, True)


def test_multihead_attention_in_eval_under_no_grad() -> None:
    """MHA's fused inference path (eval mode, no grad) has no derivative at all; the functions run
    it with grad on and the fast path off, so a caller's ``no_grad`` changes nothing."""
    model, batch, loss_fn = build("mha", "cpu")
    names = attention_slice(model, "mha")
    v = torch.randn(sum(dict(model.named_parameters())[n].numel() for n in names), dtype=torch.float64)
    with torch.no_grad():
        hv = nt.hvp(model, loss_fn, batch, {names[0]: v.view_as(dict(model.named_parameters())[names[0]])},
                    param_filter=names)
    ref = fd_hvp(model, loss_fn, batch, names, v)
    assert torch.allclose(hv[names[0]].reshape(-1), ref, atol=RTOL * float(ref.abs().max()), rtol=0)


def test_functional_hf_attention_dropout_warns_llama() -> None:
    """Llama applies attention dropout as a function of its float ``attention_dropout`` (no
    ``nn.Dropout`` module): the warning names the attention module and the attribute, and the
    per-sample norms it warns about are indeed random; eval mode is quiet."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (dev extra)")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3,
                      attn_implementation="eager")
    model = Ids(LlamaForCausalLM(cfg)).double().train()
    seq = torch.randint(0, 32, (4, 8))
    x, y = seq[:, :-1], seq[:, 1:]

    def ce(out: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))

    with pytest.warns(ModeWarning, match=r"self_attn \(attention_dropout=0\.3\)"):
        a = nt.per_sample_grad_norms(model, ce, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ModeWarning)
        b = nt.per_sample_grad_norms(model, ce, (x, y))
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModeWarning)
        model.eval()
        nt.per_sample_grad_norms(model, ce, (x, y))


def test_hf_attention_dropout_warns_with_its_module_names() -> None:
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed (dev extra)")
    torch.manual_seed(0)
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    model = Ids(BertForSequenceClassification(cfg)).train()
    x, y = torch.randint(0, 64, (4, 7)), torch.randint(0, 3, (4,))
    with pytest.warns(ModeWarning, match=r"attention\.self\.dropout"):
        nt.entropic_force(model, F.cross_entropy, (x, y), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModeWarning)
        nt.entropic_force(model, F.cross_entropy, (x, y), lr=0.1, mode="eval")
