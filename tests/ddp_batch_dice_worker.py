"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): batch soft Dice
pooled across processes against one process holding the whole batch."""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from biasseg.losses import SoftDiceLoss


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 6, 6, generator=generator)
    labels = torch.randint(0, 3, (4, 1, 6, 6, 6), generator=generator)
    loss = SoftDiceLoss(batch_dice=True, pool_across_processes=True)
    full = logits.clone().requires_grad_()
    expected = loss(full, labels)
    expected.backward()
    shard = slice(rank * 4 // world, (rank + 1) * 4 // world)
    local = logits[shard].clone().requires_grad_()
    value = loss(local, labels[shard])
    value.backward()
    # DDP averages gradients over processes: local gradient / world = the whole-batch gradient
    result = {
        "loss_difference": abs(float(value) - float(expected)),
        "gradient_difference": float((local.grad / world - full.grad[shard]).abs().max()),
        "unpooled_loss_difference": abs(float(SoftDiceLoss(batch_dice=True)(logits[shard], labels[shard])) - float(expected)),
    }
    Path(os.environ["RESULT_DIR"], f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
