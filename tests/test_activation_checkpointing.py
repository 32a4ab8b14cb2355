"""``runner.activation_checkpointing``: the backbone blocks are recomputed
in backward (so their activations are not kept), and a training step gives
the same losses and the same updated weights as without it."""

from __future__ import annotations

import copy

import pytest
import torch

from uda.train.settings import TrainConfigError

# Tiny trainers and their module fixtures (64-px crops).
from test_train_loop import _trainer, batches, cfg, embedded_roots  # noqa: F401 (fixtures)


def _with(cfg, value):  # noqa: F811
    changed = copy.deepcopy(cfg)
    changed["runner"]["activation_checkpointing"] = value
    return changed


def _block_calls(trainer) -> list[int]:
    calls = [0]
    first = (
        trainer.model.backbone.blocks[0]
        if hasattr(trainer.model.backbone, "blocks")
        else trainer.model.backbone.block1[0]
    )
    # A pre-hook: the recomputation may stop once it has what backward needs.
    first.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("role", ["student", "teacher"])  # FAN, MiT
def test_recomputes_blocks_and_trains_the_same(cfg, batches, role):  # noqa: F811
    plain = _trainer(cfg, role=role)
    recomputing = _trainer(_with(cfg, True), role=role)
    assert recomputing.model.backbone.use_checkpoint
    assert not plain.model.backbone.use_checkpoint
    plain_calls, recomputed_calls = _block_calls(plain), _block_calls(recomputing)
    a = plain.train_step(batches[0], 0).log_vars
    b = recomputing.train_step(batches[0], 0).log_vars
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    for (name, x), (_, y) in zip(plain.model.state_dict().items(), recomputing.model.state_dict().items()):
        torch.testing.assert_close(x, y, msg=name)
    # Each training forward of the block runs again in backward.
    assert recomputed_calls[0] > plain_calls[0] > 0


def test_bad_value_is_a_config_error(cfg):  # noqa: F811
    with pytest.raises(TrainConfigError, match="activation_checkpointing"):
        _trainer(_with(cfg, "yes"))
