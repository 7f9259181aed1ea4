"""Per-sample squared gradient norms: neurothermo vs plain backward, vmap(grad), a loop, BackPACK.

    .venv/bin/python benchmarks/bench_gradstats.py [--rounds 15] [--threads N] [--device cpu]

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


def run_case(c: Case, rounds: int, slow_rounds: int, device: torch.device) -> dict[str, float]:
    fns = methods(c)
    ref = fns["loop"]()
    assert isinstance(ref, Tensor)
    for name, fn in fns.items():  # correctness first (also the warm-up)
        if name == "plain":
            fn()
            continue
        got = fn()
        assert isinstance(got, Tensor)
        rel = float(((got - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        tol = 1e-3  # float32 with different summation orders; a wrong formula is off by O(1)
        assert rel < tol, f"{c.name}: {name} disagrees with the loop (max rel diff {rel:.2e})"
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if name in ("vmap", "loop") and r >= slow_rounds:
                continue
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    mem = {n: peak_bytes(fn) for n, fn in fns.items()}
    print(f"\n{c.name}   (P = {sum(p.numel() for p in c.model.parameters()):,} parameters)")
    print(f"  {'method':<12} {'time ms':>9} {'x plain':>8} {'peak MB':>9} {'x plain':>8}")
    for n in fns:
        m, m0 = mem[n], mem["plain"]
        mem_s = f"{m / 2**20:9.1f} {m / m0:8.2f}" if m is not None and m0 else f"{'n/a':>9} {'':>8}"
        print(f"  {n:<12} {med[n] * 1e3:9.2f} {med[n] / med['plain']:8.2f} {mem_s}")
    if "backpack" not in fns:
        print("  backpack     n/a (BackPACK is not installed or does not support these layers)")
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--slow-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.simplefilter("ignore", UserWarning)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"BackPACK {'available' if HAVE_BACKPACK else 'not installed'}; float32; time = median "
          f"of {args.rounds} interleaved rounds ({args.slow_rounds} for vmap/loop); memory = "
          "torch.profiler memory timeline peak")
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


if __name__ == "__main__":
    main()
