from __future__ import annotations

import pytest
import torch
from torch import nn

from neurothermo.models import DeepLinear, EmbeddedDeepLinear, mlp


def test_mlp_structure_and_errors() -> None:
    net = mlp([4, 8, 8, 3], "tanh")
    assert [type(m).__name__ for m in net] == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert net(torch.zeros(2, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown activation"):
        mlp([2, 2], "swish")
    with pytest.raises(ValueError, match="at least 2"):
        mlp([3])


def test_embedded_deep_linear_is_the_matrix_product() -> None:
    g = torch.Generator().manual_seed(0)
    m_in = torch.randn(4, 3, dtype=torch.float64, generator=g)
    m_out = torch.randn(2, 5, dtype=torch.float64, generator=g)
    net = EmbeddedDeepLinear(m_in, [4, 6, 5], m_out, generator=g).double()
    x = torch.randn(7, 3, dtype=torch.float64, generator=g)
    w1, w2 = (layer.weight for layer in net.body.layers)
    torch.testing.assert_close(net(x), x @ (m_out @ w2 @ w1 @ m_in).T)
    (h,) = net.hidden(x)  # one hidden layer between the two trainable maps
    torch.testing.assert_close(h, x @ (w1 @ m_in).T)
    assert [n for n, _ in net.named_parameters()] == ["body.layers.0.weight", "body.layers.1.weight"]
    with pytest.raises(ValueError, match="do not chain"):
        EmbeddedDeepLinear(m_in, [5, 5], m_out)


def test_deep_linear_init_scale() -> None:
    g = torch.Generator().manual_seed(1)
    net = DeepLinear([400, 400], init_scale=0.5, generator=g)
    w = net.layers[0].weight
    # entries ~ N(0, (0.5/20)²): the sample std over 160k entries is within 1% of 0.025
    assert float(w.detach().std()) == pytest.approx(0.025, rel=0.01)
    assert isinstance(net.layers[0], nn.Linear) and net.layers[0].bias is None
