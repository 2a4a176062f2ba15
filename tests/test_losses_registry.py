"""The --loss registry (fastpref.families), LossMetrics, input validation, and KTO's
cross-process reference point."""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

from fastpref.families import OBJECTIVES as LOSSES
from fastpref.families import get_objective as get_loss
from fastpref.losses import (
    ContrastiveEmbeddings,
    KTOLogps,
    ListLogps,
    LossMetrics,
    PairLogps,
    RankPOScores,
    RewardScores,
    SFTLogps,
    kto_reference_point,
    ranknet_loss,
    rankpo,
)
from fastpref.losses.rankllm import RankLLMOutputs

# name -> (inputs type, data_format, needs_reference, hyperparameter defaults). This table is
# the documented contract the trainer codes against; a change here is a change of the CLI.
EXPECTED = {
    "sft": (SFTLogps, "sft", False, {}),
    "dpo": (PairLogps, "pair", True, {"beta": 0.1}),
    "cdpo": (PairLogps, "pair", True, {"beta": 0.1, "label_smoothing": 0.1}),
    "robust": (PairLogps, "pair", True, {"beta": 0.1, "label_smoothing": 0.1}),
    "ipo": (PairLogps, "pair", True, {"beta": 0.1}),
    "hinge": (PairLogps, "pair", True, {"beta": 0.1}),
    "simpo": (
        PairLogps,
        "pair",
        False,
        {"beta": 2.0, "gamma": 1.0, "label_smoothing": 0.0, "alpha": 0.0},
    ),
    "cpo": (PairLogps, "pair", False, {"beta": 0.1, "label_smoothing": 0.0, "alpha": 1.0}),
    "orpo": (PairLogps, "pair", False, {"beta": 0.1}),
    "kto": (
        KTOLogps,
        "kto",
        True,
        {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    ),
    "rdpo": (
        PairLogps,
        "pair_rationale",
        True,
        {"beta": 0.1, "gamma": 1.0, "rationale_term": "nll"},
    ),
    "rorpo": (PairLogps, "pair_rationale", False, {"beta": 0.1, "gamma": 1.0}),
    "lipo": (ListLogps, "list", True, {"beta": 0.1}),
    "rm": (RewardScores, "pair", False, {"center_rewards_coefficient": 0.0}),
    "rankllm": (
        RankLLMOutputs,
        "rankllm",
        False,
        {
            "objective": "combined",
            "ranking_loss": "ranknet",
            "weighted": False,
            "ranking_weight": None,
        },
    ),
    "infonce": (ContrastiveEmbeddings, "triples", False, {"temperature": 0.05, "symmetric": False}),
    "rankpo": (
        RankPOScores,
        "preference",
        True,
        {
            "tau": 0.02,
            "beta": 1.0,
            "gamma": 0.0,
            "loss_type": "sigmoid",
            "label_smoothing": 0.0,
            "sft_weight": 0.0,
            "reference_free": False,
        },
    ),
}


def example_inputs(cls: type, reference: bool = True):
    """Valid inputs of each type, B = 3 (K = 4 for lists)."""
    g = torch.Generator().manual_seed(0)

    def lp(*shape):
        return -torch.rand(*shape, generator=g) * 5 - 0.1

    tokens = torch.tensor([2.0, 3.0, 4.0])
    ref = (lambda *s: lp(*s)) if reference else (lambda *s: None)
    if cls is PairLogps:
        return PairLogps(lp(3), lp(3), tokens, tokens, ref(3), ref(3), lp(3), tokens)
    if cls is KTOLogps:
        return KTOLogps(
            lp(3), tokens, lp(3), tokens, torch.tensor([True, False, True]), ref(3), ref(3)
        )
    if cls is ListLogps:
        mask = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
        return ListLogps(
            lp(3, 4), torch.ones(3, 4), torch.rand(3, 4, generator=g) * 3, mask, ref(3, 4)
        )
    if cls is SFTLogps:
        return SFTLogps(lp(3), tokens)
    if cls is RewardScores:
        return RewardScores(torch.randn(3, generator=g), torch.randn(3, generator=g))
    if cls is RankLLMOutputs:
        mask = torch.tensor([[True] * 4, [True, True, True, False], [True, True, False, False]])
        relevance = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
        return RankLLMOutputs(relevance, mask, lp(3), tokens, torch.randn(3, 4, generator=g))
    if cls is RankPOScores:
        return RankPOScores(torch.rand(3, generator=g), torch.rand(3, generator=g), ref(3), ref(3))
    if cls is ContrastiveEmbeddings:  # 3 queries, groups of 2; query 2's positive is query 0's
        q, p = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g)
        keys = torch.tensor([1, 2, 3, 4, 1, 5])
        return ContrastiveEmbeddings(q, p, keys, keys[::2, None])
    raise AssertionError(cls)


# --------------------------------------------------------------------------- registry


def test_registry_holds_exactly_the_trainer_losses():
    assert list(LOSSES) == list(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_spec_matches_contract(name):
    cls, data_format, needs_reference, hparams = EXPECTED[name]
    spec = get_loss(name)
    assert spec.name == name and spec.inputs is cls
    assert spec.fmt == data_format
    assert spec.needs_reference is needs_reference
    assert spec.hparams() == hparams


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_loss_runs_with_its_defaults(name):
    """Each loss returns a finite scalar with a gradient and detached metrics under TRL names;
    reference-free losses run without reference log-probs."""
    spec = get_loss(name)
    inputs = example_inputs(spec.inputs, reference=spec.needs_reference)
    leaves = [
        v.requires_grad_()
        for v in vars(inputs).values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]
    loss, metrics = spec(inputs, **spec.hparams())
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert any(leaf.grad is not None for leaf in leaves)
    assert isinstance(metrics, LossMetrics)
    values = metrics.as_dict()
    assert values and all(not v.requires_grad and v.shape == () for v in values.values())
    if spec.fmt in ("pair", "pair_rationale", "list"):
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= values.keys()


@pytest.mark.parametrize("name", ["dpo", "kto", "rdpo", "lipo"])
def test_reference_losses_require_reference(name):
    spec = get_loss(name)
    with pytest.raises(ValueError, match=r"ref_\w+ is required"):
        spec(example_inputs(spec.inputs, reference=False))


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'") as err:
        get_loss("dpoo")
    assert all(name in str(err.value) for name in EXPECTED)


# --------------------------------------------------------------------------- metrics


def test_metrics_as_dict_has_trl_names_for_set_fields_only():
    x = torch.tensor(1.5, requires_grad=True)
    m = LossMetrics(rewards_chosen=x * 2, nll_loss=x, kl=torch.tensor(0.0))
    d = m.as_dict()
    assert list(d) == ["rewards/chosen", "nll_loss", "kl"]
    assert not d["rewards/chosen"].requires_grad
    assert d["rewards/chosen"].item() == 3.0


def test_every_metrics_field_has_a_name():
    m = LossMetrics(**{f.name: torch.tensor(0.0) for f in dataclasses.fields(LossMetrics)})
    assert len(m.as_dict()) == len(dataclasses.fields(LossMetrics))


# --------------------------------------------------------------------------- bad input


def _pair(**changes):
    return dataclasses.replace(example_inputs(PairLogps), **changes)


@pytest.mark.parametrize(
    ("name", "inputs", "message"),
    [
        (
            "dpo",
            lambda: _pair(rejected=torch.zeros(4)),
            r"PairLogps.rejected has shape \(4,\), expected \(3,\)",
        ),
        ("dpo", lambda: _pair(ref_chosen=torch.zeros(3, 1)), r"PairLogps.ref_chosen has shape"),
        (
            "orpo",
            lambda: _pair(chosen=torch.zeros(3, 2), rejected=torch.zeros(3, 2)),
            r"PairLogps.chosen must have shape \[B\]",
        ),
        ("rdpo", lambda: _pair(rationale=None), r"PairLogps.rationale is required"),
        (
            "kto",
            lambda: dataclasses.replace(example_inputs(KTOLogps), label=torch.ones(3)),
            r"KTOLogps.label must be a bool tensor",
        ),
        (
            "lipo",
            lambda: dataclasses.replace(example_inputs(ListLogps), scores=torch.ones(3, 3)),
            r"ListLogps.scores has shape \(3, 3\), expected \(3, 4\)",
        ),
        (
            "rm",
            lambda: RewardScores(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2)),
            r"RewardScores.margin has shape",
        ),
    ],
)
def test_bad_shapes_name_the_field(name, inputs, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name)(inputs())


def test_wrong_input_type_is_a_type_error():
    with pytest.raises(TypeError, match="dpo: inputs must be PairLogps, got SFTLogps"):
        get_loss("dpo")(example_inputs(SFTLogps))


@pytest.mark.parametrize("name", ["cdpo", "robust", "simpo", "cpo"])
@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7, math.nan])
def test_label_smoothing_outside_range(name, eps):
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
        get_loss(name)(example_inputs(PairLogps), label_smoothing=eps)


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if "beta" in e[3]])
@pytest.mark.parametrize("beta", [0.0, -0.1, math.inf])
def test_non_positive_beta(name, beta):
    spec = get_loss(name)
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0"):
        spec(example_inputs(spec.inputs), beta=beta)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": 0.0}, r"tau must be a finite number > 0"),
        ({"tau": -1.0}, r"tau must be a finite number > 0"),
        ({"beta": 0.0}, r"beta must be a finite number > 0"),
        ({"loss_type": "ipo"}, r"loss_type must be one of 'sigmoid', 'hinge'; got 'ipo'"),
        ({"label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\)"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, r"label_smoothing must be 0 with"),
        ({"sft_weight": -1.0}, r"sft_weight must be a finite number >= 0"),
    ],
)
def test_rankpo_bad_hyperparameters(kwargs, message):
    x = RankPOScores(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=message):
        rankpo(x, **kwargs)


def test_rankpo_reference_based_needs_reference_scores():
    with pytest.raises(ValueError, match=r"RankPOScores.ref_chosen is required"):
        rankpo(RankPOScores(torch.zeros(2), torch.zeros(2)))


def test_other_bad_hyperparameters():
    pair = example_inputs(PairLogps)
    with pytest.raises(ValueError, match=r"rationale_term must be one of 'nll', 'logsigmoid'"):
        get_loss("rdpo")(pair, rationale_term="sigmoid")
    with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0"):
        get_loss("rorpo")(pair, gamma=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be a finite number >= 0"):
        get_loss("cpo")(pair, alpha=-1.0)
    with pytest.raises(ValueError, match=r"desirable_weight must be a finite number >= 0"):
        get_loss("kto")(example_inputs(KTOLogps), desirable_weight=-1.0)
    with pytest.raises(ValueError, match=r"center_rewards_coefficient must be"):
        get_loss("rm")(example_inputs(RewardScores), center_rewards_coefficient=-0.1)


def test_ranking_terms_bad_input():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"relevance has shape \(2, 4\), expected \(2, 3\)"):
        ranknet_loss(s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        ranknet_loss(s, s, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"scores must have shape \[B,K\]"):
        ranknet_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"weighting must be one of None, 'first'"):
        ranknet_loss(s, s, weighting="lambda")
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0"):
        ranknet_loss(s, s, sigma=0.0)


# --------------------------------------------------------------------------- distributed KTO


def test_kto_reference_point_is_averaged_across_processes(monkeypatch):
    """Two simulated processes: z₀ is the mean of the per-process means, then clamped at 0,
    and both get the same value (per-process z₀ would be 1 and 0, then 3 and 5). The
    collective is stubbed to add the other rank's value, as a SUM all-reduce does; the real
    collective call is exercised by the next test."""
    # the module, not the function that the package re-exports under the same name
    kto_module = importlib.import_module("fastpref.losses.kto")

    def run(locals_):
        means = [x.mean() for x in locals_]
        results = []
        for rank, local in enumerate(locals_):
            other = sum(m for r, m in enumerate(means) if r != rank)
            monkeypatch.setattr(kto_module.dist, "is_initialized", lambda: True)
            monkeypatch.setattr(kto_module.dist, "get_world_size", lambda: len(locals_))
            monkeypatch.setattr(
                kto_module.dist, "all_reduce", lambda t, op, other=other: t.add_(other)
            )
            results.append(kto_reference_point(local).item())
        return results

    assert run([torch.tensor([0.0, 2.0]), torch.tensor([-5.0, -5.0])]) == [0.0, 0.0]
    assert run([torch.tensor([3.0, 3.0]), torch.tensor([5.0, 5.0])]) == [4.0, 4.0]


def test_kto_reference_point_through_a_real_process_group(tmp_path):
    """A one-process gloo group runs the real all-reduce path: z₀ is the local mean,
    detached, and the input is left untouched."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1
    )
    try:
        kl = torch.tensor([1.0, 4.0], requires_grad=True)
        z0 = kto_reference_point(kl)
        assert z0.item() == 2.5 and not z0.requires_grad
        assert kl.tolist() == [1.0, 4.0]
    finally:
        torch.distributed.destroy_process_group()


def test_kto_reference_point_without_distributed_is_local_mean():
    assert not torch.distributed.is_initialized()
    assert kto_reference_point(torch.tensor([1.0, 4.0])).item() == 2.5
