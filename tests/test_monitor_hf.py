"""The monitor inside the Hugging Face Trainer: a tiny random-init BERT on an offline text set."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from transformers import Trainer, TrainerCallback, TrainingArguments

from neurothermo.monitor.hf import PREFIX, ThermoTrainerCallback

SEQ, VOCAB, PER_DEVICE, ACCUM, STEPS, NOISE_EVERY = 12, 64, 4, 2, 4, 2


def _texts() -> tuple[list[dict[str, Tensor]], int]:
    """Sentences of the docstrings of str, list and dict methods, labelled by their type (offline)."""
    rows: list[tuple[list[str], int]] = []
    for label, typ in enumerate((str, list, dict)):
        for name in sorted(dir(typ)):
            doc = getattr(typ, name).__doc__ or ""
            words = re.findall(r"[a-z]+", doc.lower())
            if len(words) >= 4:
                rows.append((words, label))
    counts: dict[str, int] = {}
    for words, _ in rows:
        for w in words:
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: i + 2 for i, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w))[:VOCAB - 2])}
    data = []
    for words, label in rows:
        ids = [vocab.get(w, 1) for w in words[:SEQ]]  # 1: unknown word, 0: padding
        mask = [1] * len(ids) + [0] * (SEQ - len(ids))
        data.append({"input_ids": torch.tensor(ids + [0] * (SEQ - len(ids))),
                     "attention_mask": torch.tensor(mask), "labels": torch.tensor(label)})
    return data, len(data)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


class _Reference(TrainerCallback):  # type: ignore[misc]
    """What the monitor should record, computed directly: per-layer ‖g‖² and, at the noise steps,
    Tr Σ from a naive loop of one backward per sample (in eval mode: dropout is 0, so the same
    function, and the monitor's hooks ignore eval-mode forwards)."""

    def __init__(self, layers: list[str]) -> None:
        self.layers, self.inputs, self.rows = layers, [], {}  # type: ignore[var-annotated]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module, **kw: Any) -> None:
        def pre(m: nn.Module, a: Any, k: dict[str, Any]) -> None:
            if "num_items_in_batch" in k:  # the Trainer's forwards (not the monitor's extra pass)
                self.inputs.append(k)
        model.register_forward_pre_hook(pre, with_kwargs=True)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module,
                              optimizer: Any, **kw: Any) -> None:
        step, batch, self.inputs = state.global_step, self.inputs, []
        params = dict(model.named_parameters())
        row: dict[str, float] = {"lr": optimizer.param_groups[0]["lr"]}
        for layer in self.layers:
            row[f"grad_sq/{layer}"] = sum(float(p.grad.double().pow(2).sum()) for n, p in params.items()
                                          if n.rpartition(".")[0] == layer and p.grad is not None)
        if step % NOISE_EVERY == 0:
            full = {k: torch.cat([b[k] for b in batch]) for k in ("input_ids", "attention_mask", "labels")}
            ps = [p for p in params.values() if p.requires_grad]
            model.eval()
            sq = []
            for i in range(len(full["labels"])):
                g = torch.autograd.grad(model(**{k: v[i:i + 1] for k, v in full.items()}).loss, ps,
                                        allow_unused=True)
                sq.append(sum(float(x.double().pow(2).sum()) for x in g if x is not None))
            model.train()
            gb = sum(float(p.grad.double().pow(2).sum()) for p in ps if p.grad is not None)
            b = len(sq)
            row["trace_sigma"] = b / (b - 1) * (np.mean(sq) - gb)
            row["mean_sq"] = float(np.mean(sq))
        self.rows[step] = row


def _train(callbacks: list[Any], tmp: Any, accum: int = ACCUM, **kw: Any) -> tuple[Trainer, nn.Module]:
    data, _ = _texts()
    model = _bert()
    args = TrainingArguments(output_dir=str(tmp), per_device_train_batch_size=PER_DEVICE, **kw,
                             gradient_accumulation_steps=accum, max_steps=STEPS, learning_rate=1e-3,
                             weight_decay=0.01, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             save_strategy="no", disable_tqdm=True, log_level="error", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    return trainer, model


def test_trainer_callback_adds_the_monitor_columns_and_they_match_direct_computation(tmp_path: Any) -> None:
    cb = ThermoTrainerCallback(noise_every=NOISE_EVERY, symmetries=None)
    layers = sorted({n.rpartition(".")[0] for n, _ in _bert().named_parameters()})
    ref = _Reference(layers)
    trainer, model = _train([cb, ref], tmp_path / "a")
    mon = cb.monitor
    assert mon is not None
    h = mon.history
    assert list(h.steps("loss")) == list(range(STEPS))
    # the step's batch is both micro-batches (gradient accumulation)
    np.testing.assert_array_equal(h["batch_size"], PER_DEVICE * ACCUM)
    for step, row in ref.rows.items():
        i = list(h.steps("lr")).index(step)
        assert h["lr"][i] == pytest.approx(row["lr"], rel=1e-12)
        for layer in layers:  # float32 gradients, summed in float64 by both: rounding only
            assert h[f"grad_sq/{layer}"][i] == pytest.approx(row[f"grad_sq/{layer}"], rel=1e-5)
        if "trace_sigma" in row:
            j = list(h.steps("entropic/trace_sigma")).index(step)
            # float32 per-sample gradients (unit roundoff 6e-8; ~1e-6 relative after the sums over
            # ~40k entries in both computations) enter Tr Σ through mean‖g_i‖², so its error is a
            # few 1e-6 of mean‖g_i‖², not of Tr Σ itself (a difference of two sums); 1e-4 of it is
            # a 30x margin, and a wrong b or batch moves Tr Σ by a large fraction.
            assert h["entropic/trace_sigma"][j] == pytest.approx(row["trace_sigma"], abs=1e-4 * row["mean_sq"])
    assert {s for s in ref.rows if "trace_sigma" in ref.rows[s]} == set(h.steps("entropic/trace_sigma"))
    # the Trainer's logs carry the scalar columns; its own loss is the mean over the step's micro-batches
    logged = [e for e in trainer.state.log_history if PREFIX + "loss" in e]
    assert len(logged) == STEPS
    for e, want in zip(logged, h["loss"]):
        assert e[PREFIX + "loss"] == pytest.approx(float(want), rel=1e-6)
        assert e["loss"] == pytest.approx(float(want), abs=1e-4)  # the Trainer rounds to 4 digits
        assert e[PREFIX + "temperature"] == pytest.approx(e[PREFIX + "lr"] / (PER_DEVICE * ACCUM), rel=1e-12)
    assert not any(isinstance(v, list) for e in logged for v in e.values())
    # the monitor never changes training: the same run without it ends at the same parameters
    _, plain = _train([], tmp_path / "b")
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_trainer_callback_refuses_bad_arguments() -> None:
    with pytest.raises(TypeError, match="ThermoMonitor"):
        ThermoTrainerCallback(monitor="x")  # type: ignore[arg-type]
    from neurothermo.monitor.hf import _concat

    with pytest.raises(ValueError, match="pad every batch"):
        _concat([{"input_ids": torch.zeros(2, 3)}, {"input_ids": torch.zeros(2, 4)}])
