"""Per-sample squared gradient norms: neurothermo vs plain backward, vmap(grad), a loop, BackPACK.

    .venv/bin/python benchmarks/bench_gradstats.py [--rounds 15] [--threads N] [--device cpu]
    .venv/bin/python benchmarks/bench_gradstats.py --foreign [--rounds 9] [--threads 1]

``--foreign`` (issue 15): the models researchers train, at b = 16, from ``tests/foreign_models.py``:
torchvision-layout ResNet-18 at width 64 on 3×32×32 (BatchNorm in eval mode), the timm-layout ViT
(32×32, patch 8, d = 32, depth 2, fused qkv + SDPA, model-level cls_token / pos_embed), Hugging
Face BERT (2 layers, d = 32, T = 10, padded attention mask) and GPT-2 (2 layers, d = 32, T = 10,
Conv1D projections, tied wte / lm_head, position_ids [1, T]), the LSTM classifier (embedding
16, hidden 24, T = 7), and Hugging Face Llama (grouped-query attention, rotary, SwiGLU, RMSNorm
with its closed-form rule). Methods: ``plain``, ``neurothermo``, ``vmap`` and Opacus 1.6
``GradSampleModule`` (where it accepts the model), each checked against a per-sample loop first.
Target: neurothermo ≤ 2× plain.

Cases (issue 4): MLP 784-512-512-10 at b = 128; a small CNN on 1×28×28 at b = 128; one pre-norm
transformer block (d = 128, T = 64, 4 heads, b = 32). Methods, all giving ``‖∇_θ l_i‖²`` for every
sample except ``plain``:

* ``plain``     one forward + backward of the mean loss (the baseline every ratio is taken to)
* ``neurothermo`` ``per_sample_grad_norms`` (one forward + one backward, closed-form layer rules)
* ``vmap``      ``torch.func.vmap(grad)`` over samples, then the squared norms (materialises b × P)
* ``loop``      b separate backward passes
* ``backpack``  BackPACK 1.7.1 ``BatchL2Grad`` (only where it supports every layer; optional:
  ``pip install --no-deps backpack-for-pytorch==1.7.1 einops unfoldNd``)

Time: median over interleaved rounds (the methods take turns in every round, so background load
hits them alike; vmap and loop get fewer rounds). Peak memory: the torch.profiler memory timeline,
i.e. the peak of live tensor bytes allocated during one call, excluding tensors that existed before
it (parameters, data); measured in a separate call from the timings. Each method's result is
checked against the loop before anything is timed.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import _common
from _common import mnist_cnn, mnist_mlp
from neurothermo.gradstats import per_sample_grad_norms

try:  # optional peer
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    HAVE_BACKPACK = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_BACKPACK = False


@dataclass
class Case(_common.Case):
    backpack_ok: bool  # BackPACK supports every layer of the model


class Block(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.att(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def cases(device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    mlp, cnn = mnist_mlp(), mnist_cnn()
    ce, mse = nn.CrossEntropyLoss(), nn.MSELoss()
    out = [
        Case("MLP 784-512-512-10, b=128", mlp, ce, torch.randn(128, 784),
             torch.randint(0, 10, (128,)), True),
        Case("CNN 1x28x28 (2 conv + pool), b=128", cnn, ce, torch.randn(128, 1, 28, 28),
             torch.randint(0, 10, (128,)), True),
        Case("transformer block d=128 T=64, b=32", Block(), mse, torch.randn(32, 64, 128),
             torch.randn(32, 64, 128), False),
    ]
    for c in out:
        c.model.to(device)
        c.x, c.y = c.x.to(device), c.y.to(device)
    return out


def methods(c: Case) -> dict[str, Callable[[], Tensor | None]]:
    model, loss_fn, x, y = c.model, c.loss_fn, c.x, c.y
    params = dict(model.named_parameters())

    def plain() -> None:
        torch.autograd.grad(loss_fn(model(x), y), list(params.values()))

    def ours() -> Tensor:
        out = per_sample_grad_norms(model, loss_fn, (x, y))
        assert isinstance(out, Tensor)
        return out

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def by_vmap() -> Tensor:
        g = per_sample({n: p.detach() for n, p in params.items()}, x, y)
        return sum(v.flatten(1).square().sum(1) for v in g.values())  # type: ignore[return-value]

    def loop() -> Tensor:
        rows = []
        for i in range(x.shape[0]):
            g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]),
                                    list(params.values()))
            rows.append(sum(gi.square().sum() for gi in g))
        return torch.stack(rows)  # type: ignore[arg-type]

    out: dict[str, Callable[[], Tensor | None]] = {
        "plain": plain, "neurothermo": ours, "vmap": by_vmap, "loop": loop}
    if HAVE_BACKPACK and c.backpack_ok:
        bp_model = extend(copy.deepcopy(model))
        bp_loss = extend(copy.deepcopy(loss_fn))
        b = x.shape[0]

        def by_backpack() -> Tensor:
            loss = bp_loss(bp_model(x), y)
            with backpack(BatchL2Grad()):
                loss.backward()
            # BackPACK reports ‖∇ l_i / b‖² for a mean loss; b² converts to ‖∇ l_i‖².
            res = sum(p.batch_l2 for p in bp_model.parameters()) * (b * b)
            for p in bp_model.parameters():
                p.grad = None
                del p.batch_l2
            return res  # type: ignore[return-value]

        out["backpack"] = by_backpack
    return out


# ----------------------------------------------------------------- foreign models (issue 15)
def foreign_cases(device: torch.device, size: str = "small", b: int = 16) -> list[Case]:
    """The zoo's architectures at b = 16: ``size="zoo"`` uses the test sizes of
    ``tests/foreign_models.py`` (tiny: Python overhead dominates), ``"small"`` the small real
    configurations named in each case (ResNet-18 is the real width-64 network either way)."""
    import foreign_models as fm

    g = torch.Generator().manual_seed(0)
    vocab, t = (64, 10) if size == "zoo" else (1000, 64)

    def tokens(v: int, length: int) -> Tensor:
        return torch.randint(0, v, (b, length), generator=g)

    images = torch.randn(b, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (b,), generator=g)
    ids = tokens(vocab, t)
    mask = torch.ones_like(ids)
    mask[: b // 2, 3 * t // 4:] = 0  # padded sequences
    lm = tokens(vocab, t + 1)
    rnn_t, rnn_v = (7, 50) if size == "zoo" else (32, 1000)
    rnn_tok = tokens(rnn_v, rnn_t)
    if size == "zoo":
        vit = ("ViT (timm layout, d=32, depth 2, 4 heads, 32x32 / patch 8)",
               lambda: fm.VisionTransformer())
        bert = ("HF BERT (2 layers, d=32, T=10, padded mask)", lambda: fm.hf_bert())
        gpt2 = ("HF GPT-2 (2 layers, d=32, T=10, V=64, tied)", lambda: fm.hf_gpt2())
        lstm = ("LSTM classifier (emb 16, hidden 24, T=7)", lambda: fm.RNNClassifier("lstm"))
        llama = ("HF Llama (2 layers, d=32, 4 heads / 2 KV, T=10, V=64)", lambda: fm.hf_llama())
    else:
        vit = ("ViT (timm layout, d=192, depth 4, 3 heads, 32x32 / patch 4)",
               lambda: fm.VisionTransformer(32, 4, embed_dim=192, depth=4, num_heads=3))
        bert = ("HF BERT (2 layers, d=128, 2 heads, T=64, V=1000, padded mask)",
                lambda: _bert(fm))
        gpt2 = ("HF GPT-2 (2 layers, d=128, 2 heads, T=64, V=1000, tied)", lambda: _gpt2(fm))
        lstm = ("LSTM classifier (emb 64, hidden 128, T=32, V=1000)",
                lambda: fm.RNNClassifier("lstm", vocab=1000, dim=64, hidden=128))
        llama = ("HF Llama (2 layers, d=128, 4 heads / 2 KV, SwiGLU 256, T=64, V=1000)",
                 lambda: fm.hf_llama(vocab=1000, hidden=128))
    specs: list[tuple[str, Callable[[], nn.Module], Tensor, Tensor, bool]] = [
        ("ResNet-18 (torchvision layout, width 64, 3x32x32, BN eval)",
         lambda: fm.resnet18(width=64), images, labels, False),
        (*vit, images, labels, False),
        (*bert, torch.stack([ids, mask], 1), torch.randint(0, 3, (b,), generator=g), True),
        (*gpt2, lm[:, :-1], lm[:, 1:], True),
        (*lstm, rnn_tok, torch.randint(0, 5, (b,), generator=g), False),
        (*llama, lm[:, :-1], lm[:, 1:], True),
    ]
    out = []
    for name, build, x, y, hf in specs:
        if hf and not fm.HAS_TRANSFORMERS:
            print(f"  skipped {name}: transformers is not installed")
            continue
        torch.manual_seed(0)
        model = build().eval()  # BatchNorm on running statistics
        for m in model.modules():  # cuDNN runs an RNN backward in train mode only (no dropout)
            if isinstance(m, nn.RNNBase):
                m.train()
        if hf:
            model = fm.TokensOnly(model)
        model.to(device)
        out.append(Case(name, model, fm.cross_entropy, x.to(device), y.to(device),  # type: ignore[arg-type]
                        False))
    return out


def _bert(fm: object) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, max_position_embeddings=128, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _gpt2(fm: object) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1000, n_embd=128, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=999, eos_token_id=999, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def opacus_method(c: Case) -> Callable[[], Tensor] | None:
    """Opacus ``GradSampleModule`` per-sample norms, or None (with the reason) if it refuses."""
    try:
        from opacus import GradSampleModule
    except ImportError:
        print(f"  opacus: not installed ({c.name})")
        return None
    try:
        # Opacus records activations in train mode only; these models have no dropout and
        # their BatchNorm is refused anyway, so train mode computes the same function.
        gsm = GradSampleModule(copy.deepcopy(c.model).train(), loss_reduction="mean")
    except Exception as e:
        print(f"  opacus refuses {c.name}: {type(e).__name__}: {str(e)[:120]}")
        return None
    params = [p for p in gsm.parameters() if p.requires_grad]

    def by_opacus() -> Tensor:
        gsm.zero_grad(set_to_none=True)
        c.loss_fn(gsm(c.x), c.y).backward()
        # loss_reduction="mean": grad_sample holds ∇ l_i (Opacus rescales by b).
        res = sum(p.grad_sample.flatten(1).square().sum(1) for p in params)  # type: ignore[union-attr]
        for p in params:
            p.grad_sample = None
        return res  # type: ignore[return-value]

    try:
        by_opacus()
    except Exception as e:
        print(f"  opacus fails on {c.name}: {type(e).__name__}: {str(e)[:120]}")
        return None
    return by_opacus


def peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of live tensor bytes allocated during ``fn()`` (torch.profiler memory timeline)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                         else [])
        with profile(activities=acts, profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        cur = peak = 0
        for _, action, _, nbytes in sorted(prof._memory_profile().timeline, key=lambda r: r[0]):
            if action == Action.CREATE:
                cur += nbytes
            elif action == Action.DESTROY:
                cur -= nbytes
            peak = max(peak, cur)
        return peak
    except Exception as e:  # private profiler API: report instead of failing the benchmark
        print(f"  (memory timeline unavailable: {type(e).__name__}: {e})")
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(c: Case, rounds: int, slow_rounds: int, device: torch.device,
             foreign: bool = False, clock: Callable[[], float] = time.perf_counter
             ) -> dict[str, float]:
    fns = methods(c)
    if foreign:  # the loop is the reference only; Opacus joins where it accepts the model
        ref_fn = fns.pop("loop")
        op = opacus_method(c)
        if op is not None:
            fns["opacus"] = op
        fns = {n: fns[n] for n in ("plain", "neurothermo", "vmap", "opacus") if n in fns}
        ref = ref_fn()
    else:
        ref = fns["loop"]()
    assert isinstance(ref, Tensor)
    for name, fn in list(fns.items()):  # correctness first (also the warm-up)
        if name == "plain":
            fn()
            continue
        if foreign and name == "vmap":
            try:
                got = fn()
            except Exception as e:  # torch.func cannot run some models (data-dependent Python)
                print(f"  vmap fails on {c.name}: {type(e).__name__}: {str(e)[:100]}")
                del fns[name]
                continue
        else:
            got = fn()
        assert isinstance(got, Tensor)
        rel = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        tol = 1e-3  # float32 with different summation orders; a wrong formula is off by O(1)
        if foreign and name == "opacus" and not rel < tol:  # a peer's wrong answer: report it
            print(f"  opacus is WRONG on {c.name}: max rel diff {rel:.2e} from the per-sample "
                  "loop; not timed")
            del fns[name]
            continue
        assert rel < tol, f"{c.name}: {name} disagrees with the loop (max rel diff {rel:.2e})"
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if name in ("vmap", "loop") and r >= slow_rounds:
                continue
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            times[name].append(clock() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    mem = (dict.fromkeys(fns) if foreign else {n: peak_bytes(fn) for n, fn in fns.items()})
    print(f"\n{c.name}   (P = {sum(p.numel() for p in c.model.parameters()):,} parameters)")
    print(f"  {'method':<12} {'time ms':>9} {'x plain':>8} {'peak MB':>9} {'x plain':>8}")
    for n in fns:
        m, m0 = mem[n], mem["plain"]
        mem_s = f"{m / 2**20:9.1f} {m / m0:8.2f}" if m is not None and m0 else f"{'n/a':>9} {'':>8}"
        print(f"  {n:<12} {med[n] * 1e3:9.2f} {med[n] / med['plain']:8.2f} {mem_s}")
    if "backpack" not in fns and not foreign:
        print("  backpack     n/a (BackPACK is not installed or does not support these layers)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--slow-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=("small", "zoo"), default="small",
                    help="--foreign: small real configurations, or the tiny test-zoo sizes")
    ap.add_argument("--cases", nargs="*", default=None,
                    help="--foreign: only the cases whose name contains one of these words")
    ap.add_argument("--foreign", action="store_true",
                    help="ResNet-18, ViT, BERT, GPT-2, LSTM at b=16 against vmap and Opacus")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.simplefilter("ignore", UserWarning)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"BackPACK {'available' if HAVE_BACKPACK else 'not installed'}; float32; time = median "
          f"of {args.rounds} interleaved rounds ({args.slow_rounds} for vmap/loop); memory = "
          "torch.profiler memory timeline peak")
    if args.foreign:
        run_foreign(args, device)
        return
    summary = {}
    for c in cases(device):
        summary[c.name] = run_case(c, args.rounds, args.slow_rounds, device)
    print("\nTargets (issue 4):")
    for name, med in summary.items():
        limit = 2.0 if "transformer" in name else 1.5
        r = med["neurothermo"] / med["plain"]
        line = (f"  {name}: {r:.2f}x plain (target <= {limit}), "
                f"vmap/ours {med['vmap'] / med['neurothermo']:.1f}x, "
                f"loop/ours {med['loop'] / med['neurothermo']:.1f}x")
        if "backpack" in med:
            line += f", backpack/ours {med['backpack'] / med['neurothermo']:.2f}x (target >= 1)"
        if "MLP" in name:
            line += " (vmap target >= 50x)"
        print(line)


def run_foreign(args: argparse.Namespace, device: torch.device) -> None:
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    load = os.getloadavg()
    print(f"foreign models ({args.size} sizes) at b = 16; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"on {os.cpu_count()} cores (before)")
    # On a shared CPU, wall time measures the other processes too: with one thread the process's
    # CPU time is the cost of the call itself. A GPU is timed by the wall clock (synchronised).
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if cpu_clock else time.perf_counter
    print(f"time = {'process CPU time (1 thread)' if cpu_clock else 'wall clock'}, median of "
          f"{args.rounds} rounds; methods interleaved (A/B/C/D) in every round")
    summary = {}
    for c in foreign_cases(device, args.size):
        if args.cases and not any(k.lower() in c.name.lower() for k in args.cases):
            continue
        summary[c.name] = run_case(c, args.rounds, args.rounds, device, foreign=True, clock=clock)
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (after)")
    print("Targets (issue 15): neurothermo <= 2x plain forward+backward")
    for name, med in summary.items():
        line = f"  {name}: {med['neurothermo'] / med['plain']:.2f}x plain"
        line += f", vmap {med['vmap'] / med['plain']:.2f}x" if "vmap" in med else ", vmap n/a"
        if "opacus" in med:
            line += f", opacus {med['opacus'] / med['plain']:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
