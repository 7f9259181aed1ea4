"""``ParamSpace.views``: the one-call native split must give exactly the pieces of the Python split,
as views of the flat vector (writes through them land in it), including its fallbacks."""
import torch

from neurothermo.curvature.operator import ParamSpace


def reference(space: ParamSpace, flat: torch.Tensor) -> list[torch.Tensor]:
    return [c.reshape(s) for c, s in zip(torch.split(flat, list(space.numels)), space.shapes)]


def check(params: dict[str, torch.Tensor], flat: torch.Tensor) -> None:
    space = ParamSpace.of(params)
    pieces = space.views(flat)
    ref = reference(space, flat)
    assert [p.shape for p in pieces] == list(space.shapes)
    for a, b in zip(pieces, ref):
        assert torch.equal(a, b)
    for p in pieces:  # views: writing through them changes the flat vector
        p.fill_(7.0)
    assert bool((flat == 7.0).all())


def test_views_native_path() -> None:
    params = {"w": torch.zeros(3, 4), "b": torch.zeros(4), "s": torch.zeros(())}
    space = ParamSpace.of(params)
    assert space._templates is not None  # the native path is the one under test
    check(params, torch.randn(space.size))


def test_views_strided_flat() -> None:  # a column of a row-major block
    params = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    block = torch.randn(9, 2)
    check(params, block[:, 1])


def test_views_empty_parameter_falls_back() -> None:  # the native call would return 1-D (0,)
    params = {"w": torch.zeros(2, 3), "e": torch.zeros(0, 5), "b": torch.zeros(3)}
    space = ParamSpace.of(params)
    assert space._templates is None
    check(params, torch.randn(space.size))
