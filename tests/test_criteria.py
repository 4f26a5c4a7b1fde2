"""Criteria and the interface they share: scores worked out by hand, activation statistics collected by forward
hooks, the row scope, and a criterion defined outside the package plugged into the Pruner."""
import pytest
import torch
from torch import nn

from prune import Pruner
from prune.calibration import InputStats
from prune.criteria import CRITERIA, Criterion, Evidence, get_criterion
from prune.schedules import Constant, LinearRamp


def test_registry_finds_every_criterion_file():
    assert sorted(CRITERIA) == ["magnitude", "movement", "obert", "taylor", "wanda"]
    assert get_criterion(CRITERIA["wanda"]) is CRITERIA["wanda"]
    with pytest.raises(ValueError, match=r"unknown criterion 'x'; choose one of \['magnitude'"):
        get_criterion("x")


def test_input_stats_by_hand():
    stats = InputStats(3, gram=True)
    x = torch.tensor([[[1.0, 2.0, 0.0], [3.0, -1.0, 2.0]]])  # (1, 2, 3): two rows
    stats.update(x)
    assert stats.rows == 2
    assert torch.equal(stats.sq_sum, torch.tensor([10.0, 5.0, 4.0]))
    assert torch.equal(stats.gram, torch.tensor([[10.0, -1.0, 6.0], [-1.0, 5.0, -2.0], [6.0, -2.0, 4.0]],
                                                dtype=torch.float64))
    copy = InputStats(3, gram=True)
    copy.load_state_dict(stats.state_dict())
    assert copy.rows == 2 and torch.equal(copy.gram, stats.gram)
    with pytest.raises(ValueError, match="input has 2 features, these statistics are for 3"):
        stats.update(torch.zeros(1, 2))


def test_wanda_score_by_hand_and_conv1d_orientation():
    stats = InputStats(2)
    stats.update(torch.tensor([[3.0, 0.0], [4.0, 2.0]]))  # norms 5, 2
    w = torch.tensor([[1.0, -3.0], [-2.0, 1.0]])
    expect = torch.tensor([[5.0, 6.0], [10.0, 2.0]])
    assert torch.equal(CRITERIA["wanda"].score(w, Evidence(inputs=stats)), expect)
    assert torch.equal(CRITERIA["wanda"].score(w.t(), Evidence(in_dim=0, inputs=stats)), expect.t())


def _two_layer():
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]]))
        model[1].weight.copy_(torch.tensor([[1.0, 2.0]]))
    return model


@pytest.mark.parametrize("scope, kept", [
    # scores of layer 0 (|W| * norms, norms = 1, 2, 3, 4): [[1, 2, 3, 4], [4, 6, 6, 4]]
    ("layer", [[0, 0, 0, 1], [1, 1, 1, 1]]),  # the 3 lowest of 8: 1, 2, 3 (ties of 4 keep the lower index)
    ("row", [[0, 0, 1, 1], [0, 1, 1, 0]]),  # 2 of 4 per row; row 2 ties 4, 4 and 6, 6: the 6s
])
def test_pruner_with_wanda_masks_by_hand(scope, kept):
    model = _two_layer()
    sparsity = {"layer": 0.375, "row": 0.5}[scope]
    pruner = Pruner(model, LinearRamp(0.0, sparsity, begin_step=1, end_step=1), criterion="wanda", scope=scope,
                    include=["0"])
    model(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))  # the inputs the forward hook sees: norms 1, 2, 3, 4
    pruner.step()
    assert pruner.masks["0"].int().tolist() == kept
    model(torch.ones(1, 4))  # after the last update nothing is collected any more
    assert pruner._inputs["0"].rows == 0
    pruner.finalize()
    assert not model[0]._forward_pre_hooks


def test_wanda_refuses_step_zero_and_updates_without_data():
    with pytest.raises(ValueError, match="criterion 'wanda' ranks weights by the inputs of training steps"):
        Pruner(_two_layer(), 0.5, criterion="wanda")
    pruner = Pruner(_two_layer(), LinearRamp(0.0, 0.5, begin_step=1, end_step=1), criterion="wanda")
    with pytest.raises(RuntimeError, match="no forward pass reached it since the last mask update"):
        pruner.step()


def test_wanda_resumes_with_its_statistics():
    def run(split: bool):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        schedule = LinearRamp(0.0, 0.5, begin_step=2, end_step=4, every=2)
        pruner = Pruner(model, schedule, criterion="wanda")
        xs = torch.randn(5, 3, 8)
        for i in range(5):
            if split and i == 3:  # a fresh pruner from the saved state continues the same run
                state, weights = pruner.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
                model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
                pruner = Pruner(model, schedule, criterion="wanda")
                model.load_state_dict(weights)
                pruner.load_state_dict(state)
            model(xs[i])
            pruner.step()
        return pruner.masks
    a, b = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wanda_refuses_non_linear_layers():
    model = nn.Sequential(nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="layer '0' is a Conv2d: exclude it"):
        Pruner(model, LinearRamp(0.0, 0.5, begin_step=1, end_step=1), criterion="wanda", types=[nn.Conv2d])


class _Inverse(Criterion):
    """A criterion written outside the package: keeps the smallest weights."""

    name = "inverse"

    def score(self, weight, evidence):
        return -weight.detach().abs().float()


def test_a_criterion_from_outside_plugs_in():
    model = _two_layer()
    pruner = Pruner(model, Constant(0.5), criterion=_Inverse(), include=["0"])
    assert pruner.masks["0"].int().tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]  # ties keep the lower index
    pruner = Pruner(_two_layer(), Constant(0.5), criterion=_Inverse(), include=["0"], scope="row")
    assert pruner.masks["0"].int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
