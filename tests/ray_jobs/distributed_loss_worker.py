"""Runs in each of the 2 processes that test_train_distributed_loss.py spawns (torch.distributed
with gloo, as Ray Train sets it up on CPU). A module of its own: spawned processes import the
function by name, which a test module loaded by pytest's importlib mode cannot offer."""

from __future__ import annotations

import os

import torch

from idml.losses import build_loss
from idml.training.objective import IntrospectiveObjective

DIM = 16


class TinyModel(torch.nn.Module):
    """images (N, 3, 4, 4) -> (mu, sigma), like IDMLModel but instant."""

    def __init__(self):
        super().__init__()
        self.semantic = torch.nn.Linear(48, DIM)
        self.uncertainty = torch.nn.Linear(48, DIM)

    def forward(self, images):
        x = images.flatten(1)
        return torch.nn.functional.normalize(self.semantic(x), dim=1), 0.1 * self.uncertainty(x)


def batch(seed: int = 0, n: int = 16, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 4, 4, generator=g)
    labels = torch.arange(classes).repeat_interleave(n // classes)
    mu = torch.nn.functional.normalize(torch.randn(n, DIM, generator=g), dim=1)
    sigma = 0.3 * torch.randn(n, DIM, generator=g)
    return images, labels, mu, sigma


def objective(name: str, seed: int) -> IntrospectiveObjective:
    torch.manual_seed(seed)
    criterion = build_loss(name, num_classes=4, embedding_dim=DIM, introspective=True, uncertainty_weight=0.1)
    return IntrospectiveObjective(TinyModel(), criterion, mixup=False)


def run(rank: int, world: int, port: int, out_dir: str, pair_losses: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    # Rank r holds every other row: each worker sees all classes, as class-balanced batches do.
    images, labels, mu, sigma = batch()
    mine = torch.arange(rank, len(labels), world)

    for name in pair_losses:
        criterion = build_loss(name, num_classes=4, embedding_dim=DIM, introspective=True, uncertainty_weight=0.1)
        assert criterion.gather_across_workers()
        m, s = mu[mine].clone().requires_grad_(), sigma[mine].clone().requires_grad_()
        loss = criterion(m, s, labels[mine])
        loss.backward()
        results[f"{name}/loss"] = loss.detach()
        results[f"{name}/grad_mu"], results[f"{name}/grad_sigma"] = m.grad, s.grad

        # The same through DDP around the whole objective: the all-reduced parameter gradients
        # are those of one process on the concatenated batch.
        obj = objective(name, seed=0)
        obj.criterion.gather_across_workers()
        ddp = torch.nn.parallel.DistributedDataParallel(obj)
        loss, _ = ddp(images[mine], labels[mine])
        loss.backward()
        results[f"{name}/param_grads"] = {k: p.grad.clone() for k, p in obj.named_parameters()}

    # Proxies: different initial values per rank, different data per rank, a few AdamW steps.
    obj = objective("proxy_anchor", seed=100 + rank)
    assert not obj.criterion.gather_across_workers()  # proxies are synchronised by DDP instead
    initial = obj.criterion.loss.proxies.detach().clone()
    ddp = torch.nn.parallel.DistributedDataParallel(obj)
    optimizer = torch.optim.AdamW(obj.parameters(), lr=0.05)
    for step in range(3):
        images, labels, _, _ = batch(seed=10 * step + rank)
        loss, _ = ddp(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    results["proxies"] = obj.criterion.loss.proxies.detach().clone()
    results["proxies_initial"] = initial
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
