"""capture_features: layers, pooling, batching, state restored and hooks always removed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from neurothermo import alignment as al


class Tokens(nn.Module):
    """(b, T) → (b, T, D) with a stack of blocks returning tuples, like a Hugging Face encoder."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, h):
            return (torch.tanh(self.lin(h)), "extra")

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList([self.Block() for _ in range(3)])

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        for layer in self.layers:
            h = layer(h)[0]
        return h


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.Flatten(), nn.Linear(5 * 6 * 6, 7),
    )


def test_auto_layers_pick_the_block_stack():
    assert al.auto_layers(_convnet()) == ["0", "1", "2", "3", "4", "5"]
    assert al.auto_layers(Tokens()) == ["layers.0", "layers.1", "layers.2"]
    with pytest.raises(ValueError, match="no submodules"):
        al.auto_layers(nn.Linear(2, 2))


def test_conv_features_mean_pool_and_flatten_match_manual_forward():
    net = _convnet()
    x = torch.randn(10, 3, 6, 6)
    feats = al.capture_features(net, x, layers=["0", "3", "5"], pool="mean")
    net.eval()
    with torch.no_grad():
        h0 = net[0](x)
        h3 = net[3](net[2](net[1](h0)))
    assert torch.allclose(feats["0"], h0.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(feats["3"], h3.mean(dim=(2, 3)), atol=1e-6)
    assert feats["5"].shape == (10, 7)
    flat = al.capture_features(net, x, layers=["3"], pool="flatten")
    assert torch.allclose(flat["3"], h3.flatten(1), atol=1e-6)


def test_batching_gives_the_same_features_and_state_is_restored():
    net = _convnet()
    net.train()
    bn = net[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(11, 3, 6, 6)
    one = al.capture_features(net, x)
    parts = al.capture_features(net, x, batch_size=4)
    for k in one:
        assert torch.allclose(one[k], parts[k], atol=1e-6)
    assert net.training and bn.training  # mode restored
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k])  # eval mode inside: running stats untouched
    assert not any(m._forward_hooks for m in net.modules())


def test_token_pooling_respects_the_attention_mask():
    torch.manual_seed(1)
    model = Tokens()
    ids = torch.randint(0, 10, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    mean = al.capture_features(model, inputs, pool="mean", batch_size=2)
    last = al.capture_features(model, inputs, pool="last")
    with torch.no_grad():
        h = model.emb(ids)
        for layer in model.layers:
            h = layer(h)[0]
    w = mask.unsqueeze(-1).float()
    assert torch.allclose(mean["layers.2"], (h * w).sum(1) / w.sum(1), atol=1e-6)
    lengths = mask.sum(1) - 1
    assert torch.allclose(last["layers.2"], h[torch.arange(5), lengths], atol=1e-6)
    plain = al.capture_features(model, (ids,), pool="mean")  # tuple input: no mask
    assert torch.allclose(plain["layers.2"], h.mean(1), atol=1e-6)


def test_hooks_are_removed_when_the_forward_raises():
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):
            self.a(x)
            raise RuntimeError("boom")

    model = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        al.capture_features(model, torch.randn(4, 3), layers=["a", "b"])
    assert not model.a._forward_hooks and not model.b._forward_hooks
    assert model.training  # mode restored too


def test_layer_errors():
    net = _convnet()
    x = torch.randn(4, 3, 6, 6)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['9'\]"):
        al.capture_features(net, x, layers=["9"])

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    model = Skip()
    with pytest.raises(RuntimeError, match=r"\['unused'\] never ran"):
        al.capture_features(model, torch.randn(4, 3), layers=["used", "unused"])
    assert not model.unused._forward_hooks

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    twice, x3 = Twice(), torch.randn(4, 3)
    feats = al.capture_features(twice, x3, layers=["lin"])  # one entry per call, in order
    assert list(feats) == ["lin#0", "lin#1"]
    with torch.no_grad():
        torch.testing.assert_close(feats["lin#0"], twice.lin(x3))
        torch.testing.assert_close(feats["lin#1"], twice.lin(twice.lin(x3)))
    with pytest.raises(ValueError, match="pool must be"):
        al.capture_features(net, x, pool="max")
    with pytest.raises(ValueError, match="pool='last'"):
        al.capture_features(net, x, layers=["0"], pool="last")
    with pytest.raises(ValueError, match="layers must be 'auto' or a list"):
        al.capture_features(net, x, layers="0")
    with pytest.raises(ValueError, match="batch_size"):
        al.capture_features(net, x, batch_size=0)
    with pytest.raises(TypeError, match=r"inputs(\[0\])? must be"):
        al.capture_features(net, [1, 2])


def test_auto_layers_take_every_block_of_the_outermost_block_stacks():
    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    class MoEBlock(nn.Module):  # a block holding its own stack of blocks (experts)
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(Expert() for _ in range(3))

        def forward(self, x):
            return sum(e(x) for e in self.experts)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.stage1 = nn.Sequential(MoEBlock(), MoEBlock())
            self.stage2 = nn.Sequential(MoEBlock())
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.stage2(self.stage1(self.stem(x))))

    # every stage's blocks (a one-block stage too), never the experts inside a block
    assert al.auto_layers(Net()) == ["stage1.0", "stage1.1", "stage2.0"]
    # a plain Sequential of layers has no block stack: its layers
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert al.auto_layers(mlp) == ["0", "1", "2"]
    feats = al.capture_features(Net(), torch.randn(5, 4))
    assert list(feats) == ["stage1.0", "stage1.1", "stage2.0"] and feats["stage2.0"].shape == (5, 4)


class PaddedEncoder(nn.Module):
    """``nn.TransformerEncoder`` with a key-padding mask: in eval mode under ``no_grad`` (as
    feature capture runs) torch's fast path hands the layer hooks nested tensors without the
    padded tokens; with gradients on it takes the ordinary path and pads."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_outputs_of_the_transformer_fast_path_pool_over_each_samples_tokens():
    """Reference: the same layers' outputs with gradients enabled (no fast path, padded
    tensors), pooled by hand over the real tokens; float32 round-off between the two paths."""
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    ids = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:2, 5:] = 0
    mask[3, 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.__setitem__(n, o.detach())) for n in ("enc.layers.0", "enc.layers.1")]
    model(**inputs)  # gradients on: the padded path
    for h in hooks:
        h.remove()
    assert not seen["enc.layers.1"].is_nested
    w = mask.unsqueeze(-1).float()
    last = mask.sum(1) - 1
    for pool in ("mean", "last", "flatten"):
        got = al.capture_features(model, inputs, layers=["enc.layers.0", "enc.layers.1"], pool=pool,
                                  batch_size=2)
        for n, h in seen.items():
            if pool == "mean":
                ref = (h * w).sum(1) / w.sum(1)
            elif pool == "last":
                ref = h[torch.arange(4), last]
            else:  # the padded tokens are zeros
                ref = (h * w).reshape(4, -1)
            torch.testing.assert_close(got[n], ref, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_layers_pool_with_their_own_streams_mask():
    """A T5 (encoder–decoder): encoder layers are pooled with ``attention_mask``, decoder layers
    with ``decoder_attention_mask`` (every token when it is not given). Reference: the layers'
    outputs hooked by hand and pooled by hand. Before, the encoder's mask was applied to the
    decoder too: wrong when the lengths agree, a bare shape error when they do not."""
    pytest.importorskip("transformers")
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, 4:] = 0
    for dec_len in (5, 6):  # different from the encoder's length, and equal to it
        dec = torch.randint(1, 32, (4, dec_len), generator=g)
        inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
        seen: dict[str, torch.Tensor] = {}
        names = ["encoder.block.0", "decoder.block.0"]
        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n, seen=seen: seen.__setitem__(n, o[0].detach())) for n in names]
        with torch.no_grad():
            model(**inputs)
        for h in hooks:
            h.remove()
        got = al.capture_features(model, inputs, layers=names)
        w = mask.unsqueeze(-1).float()
        torch.testing.assert_close(got["encoder.block.0"],
                                   (seen["encoder.block.0"] * w).sum(1) / w.sum(1))
        torch.testing.assert_close(got["decoder.block.0"], seen["decoder.block.0"].mean(1))
        dmask = torch.ones_like(dec)
        dmask[0, 3:] = 0
        with_dec = al.capture_features(model, {**inputs, "decoder_attention_mask": dmask},
                                       layers=names)
        wd = dmask.unsqueeze(-1).float()
        # the decoder is causal: masking its trailing tokens leaves the earlier ones unchanged,
        # so the unmasked run's outputs are the reference over the tokens the mask keeps
        torch.testing.assert_close(with_dec["decoder.block.0"],
                                   (seen["decoder.block.0"] * wd).sum(1) / wd.sum(1))
    # a mask of another stream's length is named, not a bare shape error
    with pytest.raises(ValueError, match="another stream"):
        al.capture_features(model, {"input_ids": ids, "attention_mask": mask,
                                    "decoder_input_ids": dec[:, :5],
                                    "decoder_attention_mask": torch.ones(4, 6, dtype=torch.long)},
                            layers=names)


def test_a_layer_shared_across_depth_gives_its_features_at_every_depth() -> None:
    """ALBERT runs one layer group at every depth: auto finds it, and each call is an entry,
    equal to that call's output pooled over the unmasked tokens (hand-made hook)."""
    pytest.importorskip("transformers")
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=30, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                       num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = AlbertModel(cfg).eval()
    ids = torch.randint(0, 30, (4, 6))
    mask = torch.ones_like(ids)
    mask[:2, 4:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    (group,) = al.auto_layers(model)
    assert group == "encoder.albert_layer_groups.0"
    feats = al.capture_features(model, x)
    assert list(feats) == [f"{group}#{i}" for i in range(3)]
    seen = []
    h = model.get_submodule(group).register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        model(**x)
    h.remove()
    w = mask.unsqueeze(-1).to(seen[0].dtype)
    for i, out in enumerate(seen):
        torch.testing.assert_close(feats[f"{group}#{i}"], (out * w).sum(1) / w.sum(1))


class TimeMajor(nn.Module):
    """XLNet's layout: a layer whose output is ``[T, b, d]`` (time-major), and a position table
    whose output ``[T, d]`` every sample shares."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.pos = nn.Embedding(8, 4)
        self.layer = nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        h = self.emb(input_ids).transpose(0, 1)  # [T, b, d]
        h = h + self.pos(torch.arange(h.shape[0]))[:, None]
        return self.layer(torch.tanh(h))


@pytest.mark.parametrize(("b", "t"), [(4, 4), (4, 6)])
def test_time_major_outputs_are_pooled_per_sample(b: int, t: int) -> None:
    """The batch axis of each layer is found against a one-sample pass (axis 1 here, also when
    T = b, where reading axis 0 as the samples was silently wrong), and each sample is pooled
    over its own unmasked tokens; equal to a hook pooled by hand."""
    torch.manual_seed(0)
    model = TimeMajor()
    ids = torch.randint(0, 10, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -2:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    feats = al.capture_features(model, x, layers=["layer"])
    with torch.no_grad():
        out = model(**x).transpose(0, 1)  # [b, T, d]
    w = mask.unsqueeze(-1).to(out.dtype)
    torch.testing.assert_close(feats["layer"], (out * w).sum(1) / w.sum(1))


def test_a_layer_output_without_a_sample_axis_is_refused() -> None:
    torch.manual_seed(0)
    model = TimeMajor()
    x = {"input_ids": torch.randint(0, 10, (4, 5))}
    with pytest.raises(ValueError, match=r"layer 'pos': no axis of its output follows the samples"):
        al.capture_features(model, x, layers=["pos"])
