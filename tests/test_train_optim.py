"""AdamW parameter groups (mmcv custom_keys) and the poly + warmup LR."""

import copy
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from uda.config import load_config
from uda.models import build_segmentor
from uda.train.optim import (
    PolyWarmupLR,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    current_lrs,
    match_custom_key,
    poly_warmup_lr,
)
from references import reference

MIC_CUSTOM_KEYS = {"head": {"lr_mult": 10.0}, "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}


@pytest.fixture(scope="module")
def cfg():
    return load_config("default")


@pytest.fixture(scope="module", params=["teacher", "student"])
def segmentor(request, cfg):
    torch.manual_seed(0)
    return build_segmentor(cfg[request.param]["model"])


def per_param(optimizer):
    """{id(param): (lr, weight_decay)} of an optimizer's groups."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            out[id(p)] = (group["lr"], group["weight_decay"])
    return out


# ------------------------------------------------------------ custom keys
def test_custom_key_order_longest_then_alphabetical():
    assert match_custom_key("backbone.block1.0.norm1.weight", MIC_CUSTOM_KEYS) == "norm"
    # 'head' (4 letters) ties with 'norm' and wins alphabetically; the first
    # match is the only one applied, so the head's BN keeps weight decay.
    assert match_custom_key("decode_head.head.fuse_layer.bn.weight", MIC_CUSTOM_KEYS) == "head"
    assert match_custom_key("decode_head.x.norm.weight", MIC_CUSTOM_KEYS) == "head"
    assert match_custom_key("backbone.pos_block.0.norm.weight", MIC_CUSTOM_KEYS) == "pos_block"
    assert match_custom_key("backbone.blocks.0.attn.q.weight", MIC_CUSTOM_KEYS) is None
    assert match_custom_key("xab", {"ab": {}, "xa": {}}) == "ab"


def test_param_groups_head_lr_x10_and_no_decay_on_norms(segmentor, cfg):
    opt_cfg = cfg["optimizer"]
    optimizer = build_optimizer(segmentor, cfg)
    lr, wd = opt_cfg["lr"], opt_cfg["weight_decay"]
    assigned = per_param(optimizer)
    named = dict(segmentor.named_parameters())
    assert len(assigned) == len(named)
    n_norm = 0
    for name, param in named.items():
        got = assigned[id(param)]
        if name.startswith("decode_head."):
            assert got == pytest.approx((lr * 10, wd)), name  # BN included
        elif "norm" in name:
            assert got == pytest.approx((lr, 0.0)), name
            n_norm += 1
        else:
            assert got == pytest.approx((lr, wd)), name
    assert n_norm > 0
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999)
    assert not optimizer.defaults["fused"]  # CPU parameters


def test_param_groups_match_mmcv_default_constructor(segmentor, cfg):
    runner = reference("mmcv.runner")
    opt_cfg = cfg["optimizer"]
    ref = runner.DefaultOptimizerConstructor(
        dict(type="AdamW", lr=opt_cfg["lr"], betas=(0.9, 0.999), weight_decay=opt_cfg["weight_decay"]),
        dict(custom_keys=MIC_CUSTOM_KEYS),
    )(segmentor)
    ours = build_optimizer(segmentor, cfg)
    ref_map = {
        id(g["params"][0]): (
            g.get("lr", ref.defaults["lr"]),
            g.get("weight_decay", ref.defaults["weight_decay"]),
        )
        for g in ref.param_groups
    }
    ours_map = per_param(ours)
    assert ref_map.keys() == ours_map.keys()
    for key, (lr, wd) in ref_map.items():
        assert ours_map[key] == pytest.approx((lr, wd), rel=1e-12)


def test_frozen_and_wrapped_parameters():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model[0].weight.requires_grad_(False)
    groups = build_param_groups(model, {"lr": 1.0, "weight_decay": 0.5})
    names = sorted(n for g in groups for n in g["names"])
    assert names == ["0.bias", "1.bias", "1.weight"]  # by name, not type
    assert all(g["weight_decay"] == 0.5 for g in groups)
    with pytest.raises(ValueError, match="no trainable"):
        build_param_groups(nn.Sequential(), {"lr": 1.0})


def test_build_optimizer_rejects_bad_config(segmentor, cfg):
    bad = copy.deepcopy(cfg["optimizer"])
    bad["type"] = "SGD"
    with pytest.raises(ValueError, match="AdamW"):
        build_optimizer(segmentor, bad)
    bad = copy.deepcopy(cfg["optimizer"])
    bad["lr"] = "fast"
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(segmentor, bad)


# ------------------------------------------------------------ LR schedule
def mmcv_formula(base, i, max_iters=40000, warmup_iters=1500, ratio=1e-6):
    regular = base * (1 - i / max_iters)
    if i < warmup_iters:
        return regular * (1 - (1 - i / warmup_iters) * (1 - ratio))
    return regular


def two_group_optimizer(lr=6e-5):
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    return torch.optim.AdamW(
        [
            {"params": model[0].parameters()},
            {"params": model[1].parameters(), "lr": lr * 10},
        ],
        lr=lr,
    )


@pytest.mark.parametrize("iteration", [0, 1, 750, 1499, 1500, 1501, 20000, 39999, 40000])
def test_poly_warmup_values_match_the_mmcv_formula(iteration):
    got = poly_warmup_lr(6e-5, iteration, 40000, 1.0, 0.0, "linear", 1500, 1e-6)
    assert got == pytest.approx(mmcv_formula(6e-5, iteration), rel=1e-12, abs=1e-20)
    sched = PolyWarmupLR(two_group_optimizer(), 40000)
    assert sched.lr_at(iteration) == pytest.approx(
        [mmcv_formula(6e-5, iteration), mmcv_formula(6e-4, iteration)], rel=1e-12, abs=1e-20
    )


def test_scheduler_steps_per_iteration_and_keeps_multipliers():
    optimizer = two_group_optimizer()
    sched = PolyWarmupLR(optimizer, max_iters=100, warmup_iters=10, warmup_ratio=1e-6)
    for i in range(100):
        lrs = [g["lr"] for g in optimizer.param_groups]  # used by step i
        assert lrs == pytest.approx(
            [mmcv_formula(6e-5, i, 100, 10), mmcv_formula(6e-4, i, 100, 10)], rel=1e-9
        )
        assert lrs[1] == pytest.approx(10 * lrs[0])
        optimizer.step()
        sched.step()
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_scheduler_matches_mmcv_poly_hook():
    lr_updater = reference("mmcv.runner.hooks.lr_updater")
    ours_opt, ref_opt = two_group_optimizer(), two_group_optimizer()
    sched = PolyWarmupLR(ours_opt, max_iters=50, warmup_iters=7, warmup_ratio=1e-6)
    hook = lr_updater.PolyLrUpdaterHook(
        power=1.0, min_lr=0.0, by_epoch=False, warmup="linear", warmup_iters=7, warmup_ratio=1e-6
    )
    runner = SimpleNamespace(optimizer=ref_opt, iter=0, max_iters=50)
    hook.before_run(runner)
    for i in range(50):
        runner.iter = i
        hook.before_train_iter(runner)
        assert [g["lr"] for g in ours_opt.param_groups] == pytest.approx(
            [g["lr"] for g in ref_opt.param_groups], rel=1e-12, abs=1e-20
        )
        ours_opt.step()
        sched.step()


def tiny_model():
    """Names that hit the 'head' and 'norm' keys: three groups."""
    return nn.Sequential(
        OrderedDict(backbone=nn.Linear(3, 3), norm=nn.LayerNorm(3), decode_head=nn.Linear(3, 2))
    )


def test_resume_from_saved_states_continues_the_schedule(tmp_path, cfg):
    torch.manual_seed(0)
    model = tiny_model()

    def make(m):
        opt = build_optimizer(m, cfg)
        return opt, build_lr_scheduler(opt, cfg)

    opt, sched = make(model)
    data = torch.randn(8, 3)

    def train(m, o, s, steps):
        lrs = []
        for _ in range(steps):
            lrs.append([g["lr"] for g in o.param_groups])
            o.zero_grad()
            m(data).square().mean().backward()
            o.step()
            s.step()
        return lrs

    reference = copy.deepcopy(model)
    ref_opt, ref_sched = make(reference)
    full = train(reference, ref_opt, ref_sched, 40)

    train(model, opt, sched, 25)
    path = tmp_path / "state.pth"
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path
    )
    state = torch.load(path, weights_only=True)
    resumed = tiny_model()
    resumed.load_state_dict(state["model"])
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    rest = train(resumed, opt2, sched2, 15)
    assert len(rest[0]) == 3  # default, head and norm groups
    assert rest == full[25:]
    for a, b in zip(resumed.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_build_lr_scheduler_from_preset_and_errors(cfg):
    optimizer = two_group_optimizer()
    sched = build_lr_scheduler(optimizer, cfg)
    # Taken from the preset rather than hard-coded: the default's length is tuned
    # for wall time and changes; what matters is that the scheduler follows it.
    assert (sched.max_iters, sched.warmup_iters) == (
        cfg["runner"]["max_iters"],
        cfg["lr_config"]["warmup_iters"],
    )
    assert sched.warmup_ratio == 1e-6 and sched.warmup == "linear"
    assert current_lrs(optimizer)["0"] == pytest.approx(6e-5 * 1e-6)
    with pytest.raises(ValueError, match="warmup"):
        PolyWarmupLR(two_group_optimizer(), 10, warmup="cosine")
    with pytest.raises(ValueError, match="max_iters"):
        PolyWarmupLR(two_group_optimizer(), 0)
    bad = copy.deepcopy(cfg)
    bad["lr_config"]["policy"] = "step"
    with pytest.raises(ValueError, match="poly"):
        build_lr_scheduler(two_group_optimizer(), bad)
