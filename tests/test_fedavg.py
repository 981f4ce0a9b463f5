import pytest
import torch

from aggregator.strategies import ClientUpdate, WeightedMean, fedavg


def test_fedavg_equals_hand_computed_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    c = {"w": torch.tensor([-1.0, 0.0]), "b": torch.tensor([[8.0]])}
    out = fedavg([ClientUpdate("a", a, 1), ClientUpdate("b", b, 3), ClientUpdate("c", c, 4)])
    # (1*[1,2] + 3*[3,6] + 4*[-1,0]) / 8 = [6/8, 20/8];  (0 + 12 + 32) / 8 = 5.5
    assert torch.allclose(out["w"], torch.tensor([0.75, 2.5]))
    assert torch.allclose(out["b"], torch.tensor([[5.5]]))
    assert out["w"].dtype == torch.float32


def test_fedavg_is_order_independent_and_keeps_dtype():
    g = torch.Generator().manual_seed(0)
    ups = [ClientUpdate(str(i), {"x": torch.randn(50, generator=g).half()}, i + 1) for i in range(5)]
    x = fedavg(ups)["x"]
    y = fedavg(list(reversed(ups)))["x"]
    assert x.dtype == torch.float16 and torch.equal(x, y)


def test_mismatched_updates_refused():
    acc = WeightedMean()
    acc.add({"a": torch.zeros(2)}, 1)
    with pytest.raises(ValueError):
        acc.add({"b": torch.zeros(2)}, 1)
    with pytest.raises(ValueError):
        acc.add({"a": torch.zeros(2)}, 0)
    with pytest.raises(ValueError):
        fedavg([])
