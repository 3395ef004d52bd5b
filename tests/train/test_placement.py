"""scaling.placement_strategy reaches Ray Train, and the process group is bound to the node's interface."""

from __future__ import annotations

import pytest

from samtone_ray.core.config import ConfigError, load_config


def test_the_placement_strategy_is_validated_and_defaults_to_pack():
    assert load_config(None, []).scaling.placement_strategy == "PACK"
    for strategy in ("PACK", "SPREAD", "STRICT_SPREAD"):
        assert load_config(None, [f"scaling.placement_strategy={strategy}"]).scaling.placement_strategy == strategy
    with pytest.raises(ConfigError, match="scaling.placement_strategy must be one of PACK, SPREAD, STRICT_SPREAD"):
        load_config(None, ["scaling.placement_strategy=spread"])
    from samtone_ray.core.config import ScalingConfig

    with pytest.raises(ConfigError, match="scaling.placement_strategy"):
        ScalingConfig(placement_strategy="STRICT_PACK")


def test_the_trainer_gets_the_strategy_and_binds_its_collectives(tmp_path):
    from samtone_ray.train.collectives import NodeInterfaceTorchConfig
    from samtone_ray.train.trainer import build_trainer

    cfg = load_config(None, ["scaling.placement_strategy=STRICT_SPREAD"])
    trainer = build_trainer(cfg, pairs_ref=None, eval_ref=None, output_dir=tmp_path, storage_path=tmp_path, name="n")
    assert trainer.scaling_config.placement_strategy == "STRICT_SPREAD"
    assert isinstance(trainer.backend_config, NodeInterfaceTorchConfig)
    assert trainer.backend_config.backend == "gloo"


def test_every_worker_binds_before_the_process_group_is_created(monkeypatch):
    from ray.train.torch.config import _TorchBackend

    from samtone_ray.train.collectives import NodeInterfaceTorchConfig, bind_to_node_interface

    calls = []

    class Group:
        def execute(self, fn, *args, **kwargs):
            calls.append(fn)

    monkeypatch.setattr(_TorchBackend, "on_start", lambda self, group, config: calls.append("process group"))
    config = NodeInterfaceTorchConfig(backend="gloo")
    config.backend_cls().on_start(Group(), config)
    assert calls == [bind_to_node_interface, "process group"]
