"""Losses under DDP with 2 workers (torch.distributed gloo, as Ray Train sets it up on CPU):
pair-based losses see every worker's embeddings and match the single-process loss on the
concatenated batch; class proxies stay identical on every worker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import ray_jobs.distributed_loss_worker as worker
from ray_jobs.ray_helpers import free_port

from idml.losses import build_loss

PAIR_LOSSES = ["multi_similarity", "contrastive", "triplet", "fastap"]
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker.run, args=(WORLD, free_port(), str(out), PAIR_LOSSES), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_gathered_pair_loss_equals_single_process_loss(ranks, name):
    images, labels, mu, sigma = worker.batch()
    criterion = build_loss(name, num_classes=4, embedding_dim=worker.DIM, introspective=True, uncertainty_weight=0.1)
    m, s = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
    single = criterion(m, s, labels)
    single.backward()
    assert single.item() > 0
    for rank, result in enumerate(ranks):
        mine = torch.arange(rank, len(labels), WORLD)
        # each worker computes world_size x the loss of the whole batch ...
        torch.testing.assert_close(result[f"{name}/loss"], WORLD * single.detach(), rtol=1e-5, atol=1e-6)
        # ... with gradients into its own embeddings only, which DDP's averaging turns into
        # exactly the single-process gradient
        torch.testing.assert_close(result[f"{name}/grad_mu"] / WORLD, m.grad[mine], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result[f"{name}/grad_sigma"] / WORLD, s.grad[mine], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_ddp_parameter_gradients_equal_single_process_on_concatenated_batch(ranks, name):
    images, labels, _, _ = worker.batch()
    obj = worker.objective(name, seed=0)
    loss, _ = obj(images, labels)
    loss.backward()
    for result in ranks:
        for key, param in obj.named_parameters():
            torch.testing.assert_close(result[f"{name}/param_grads"][key], param.grad, rtol=1e-4, atol=1e-6)


def test_proxies_stay_identical_across_workers(ranks):
    assert not torch.equal(ranks[0]["proxies_initial"], ranks[1]["proxies_initial"])  # seeded apart
    assert torch.equal(ranks[0]["proxies"], ranks[1]["proxies"])  # DDP broadcast + all-reduce
    assert not torch.allclose(ranks[0]["proxies"], ranks[0]["proxies_initial"])  # and they trained
