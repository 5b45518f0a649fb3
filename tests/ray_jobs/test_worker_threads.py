"""How many torch threads a Ray training worker runs (pipelines.train.worker_threads)."""

from types import SimpleNamespace

import pytest

from idml.config import load_config
from pipelines.train import RayOptions, worker_threads


def plan(options: RayOptions, *overrides: str):
    return SimpleNamespace(cfg=load_config(overrides=list(overrides)), options=options)


@pytest.fixture
def nodes(monkeypatch):
    import ray

    def set_nodes(*cpus):
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": float(c)}} for c in cpus]
                            + [{"Alive": False, "Resources": {"CPU": 64.0}}])  # a dead node never counts
    return set_nodes


def test_a_lone_worker_uses_its_whole_node_while_reserving_one_cpu(nodes):
    nodes(2)
    threads, why = worker_threads(plan(RayOptions()))
    assert threads == 2 and "2 CPUs" in why


def test_workers_share_the_smallest_node(nodes):
    nodes(16, 8)
    assert worker_threads(plan(RayOptions(num_workers=4, cpus_per_worker=2)))[0] == 4  # 2 per node, 8 CPUs
    assert worker_threads(plan(RayOptions(num_workers=64)))[0] == 1


def test_explicit_threads_and_gpu_workers_keep_control(nodes):
    nodes(16)
    assert worker_threads(plan(RayOptions(threads=3)))[0] == 3
    assert worker_threads(plan(RayOptions(threads=3), "train.threads=5")) == (5, "train.threads")
    assert worker_threads(plan(RayOptions(use_gpu=True, cpus_per_worker=4)))[0] == 4
    nodes()  # an autoscaling cluster with no CPU node up yet
    assert worker_threads(plan(RayOptions(cpus_per_worker=2)))[0] == 2


def test_threads_must_not_be_negative():
    from idml.errors import InputError

    with pytest.raises(InputError, match="threads must be >= 0"):
        RayOptions(threads=-1).validate()
