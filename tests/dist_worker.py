"""One rank of the multi-process monitor tests (run as a script by tests/test_monitor_distributed.py).

``python tests/dist_worker.py MODE OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.
Rank r trains on samples ``[r·b, (r+1)·b)`` of every global batch; the test compares what the
ranks record with one process on the global batches (``run_single``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STEPS, GLOBAL_B, LR, WD, NOISE_EVERY = 4, 8, 0.05, 0.01, 2


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * GLOBAL_B, 5, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(len(x), 1, generator=g, dtype=torch.float64)
    return x, y


def model() -> nn.Module:
    """Rescale (0→2, 3→5), double rotation (2→3), whole scale (5 → LayerNorm), in float64."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 7),
        nn.LayerNorm(7, eps=0.0, elementwise_affine=False), nn.Tanh(), nn.Linear(7, 1)).double()


def train(net: nn.Module, inner: nn.Module, rank: int, world: int, writer: Any = None,
          **monitor: Any) -> Any:
    """``STEPS`` plain-SGD steps; rank ``rank`` of ``world`` takes its slice of each global batch."""
    import neurothermo as nt

    x, y = data()
    opt = torch.optim.SGD(net.parameters(), lr=LR, weight_decay=WD)
    monitor.setdefault("noise_every", NOISE_EVERY)
    mon = nt.ThermoMonitor(net, nn.MSELoss(), optimizer=opt, writer=writer, **monitor)
    b = GLOBAL_B // world
    for step in range(STEPS):
        lo = step * GLOBAL_B + rank * b
        xb, yb = x[lo:lo + b], y[lo:lo + b]
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(xb), yb)
        loss.backward()
        mon.after_backward(step, (xb, yb), loss=loss)
        opt.step()
        mon.after_step(step)
    mon.close()
    return mon


def run_single(**monitor: Any) -> tuple[list[dict[str, Any]], Tensor]:
    net = model()
    mon = train(net, net, 0, 1, **monitor)
    return mon.history.to_dicts(), torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def lightning_ddp(out: Path) -> None:
    """The Lightning callback under ``strategy="ddp"``: Lightning starts rank 1 by running this
    script again. Each rank loads its own half of every global batch (as in ``train``)."""
    import lightning

    import neurothermo as nt
    from neurothermo.monitor.lightning import ThermoMonitorCallback
    from neurothermo.monitor.writers import JSONLWriter

    net = model()

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=LR, weight_decay=WD)

        def train_dataloader(self) -> Any:  # rank r: samples [8k + 4r, 8k + 4r + 4) at step k
            r, b = self.trainer.global_rank, GLOBAL_B // 2
            batches = [list(range(k * GLOBAL_B + r * b, k * GLOBAL_B + (r + 1) * b)) for k in range(STEPS)]
            x, y = data()
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_sampler=batches)

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    mon = nt.ThermoMonitor(net, nn.MSELoss(), noise_every=NOISE_EVERY,
                           writer=JSONLWriter(out / f"rank{rank}.jsonl"))
    trainer = lightning.Trainer(max_steps=STEPS, callbacks=[ThermoMonitorCallback(mon)],
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, accelerator="cpu", devices=2,
                                strategy="ddp", use_distributed_sampler=False)
    trainer.fit(Module())
    mon.close()
    torch.save({"rows": mon.history.to_dicts(), "meta": mon.history.meta,
                "params": torch.cat([p.detach().reshape(-1) for p in net.parameters()])},
               out / f"hist{trainer.global_rank}.pt")


def hf_ddp(out: Path) -> None:
    """The Trainer callback with 2 ranks of 4 samples per step (no accumulation)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import test_monitor_hf as hf
    from neurothermo.monitor.hf import ThermoTrainerCallback

    cb = ThermoTrainerCallback(noise_every=hf.NOISE_EVERY, symmetries=None)
    hf._train([cb], out / f"trainer{os.environ['RANK']}", accum=1, ddp_backend="gloo")
    assert cb.monitor is not None
    torch.save({"rows": cb.monitor.history.to_dicts(), "meta": cb.monitor.history.meta},
               out / f"hist{os.environ['RANK']}.pt")


def main(mode: str, out: Path) -> None:
    import torch.distributed as dist

    from neurothermo.monitor.writers import JSONLWriter

    torch.set_num_threads(1)
    if mode == "hf_ddp":  # the Trainer initialises the group from RANK / WORLD_SIZE / LOCAL_RANK
        hf_ddp(out)
        return
    if mode == "lightning_ddp":
        lightning_ddp(out)
        return
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    kw: dict[str, Any] = {}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped: nn.Module = DDP(net)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        import neurothermo as nt

        kw = {"symmetries": nt.find_symmetries(net, data()[0][:8]), "noise_every": None}

        for layer in net:
            if any(p.requires_grad for p in layer.parameters()):
                fully_shard(layer)
        wrapped = fully_shard(net)
    else:
        raise SystemExit(f"unknown mode {mode}")
    mon = train(wrapped, net, rank, world, writer=JSONLWriter(out / f"rank{rank}.jsonl"), **kw)
    params = [getattr(p, "full_tensor", p.detach)().detach() for p in net.parameters()]
    torch.save({"rows": mon.history.to_dicts(), "meta": mon.history.meta,
                "params": torch.cat([p.reshape(-1) for p in params])}, out / f"hist{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    os._exit(0)
