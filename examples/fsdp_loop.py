"""Critical sharpness of a GPT-2 sharded with FSDP2 (``fully_shard``), in a hand-written loop.

    torchrun --nproc_per_node 2 examples/fsdp_loop.py         # two CPU ranks over gloo
    torchrun --nproc_per_node 8 examples/fsdp_loop.py         # eight GPUs over NCCL

Each GPT-2 block is a shard group of its own, then the whole model. Every rank draws the same
global batch and trains on its rows of it; it also measures its rows of the fixed probe, and
the meter sums over ranks, so every rank gets the numbers one process would. On a sharded model
the meter measures critical sharpness only (forward passes and one backward); rank 0 writes the
rows to runs/fsdp/sharpness.jsonl.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import sharpmeter as sm
from sharpmeter.harness.data import BYTE_VOCAB, lm_dataset
from sharpmeter.harness.gpt import build_gpt
from sharpmeter.measure.distributed import local_shard
from sharpmeter.measure.loss import move_to
from sharpmeter.measure.sinks import JsonlSink, run_metadata

MAX_GRAD_NORM = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description="FSDP2 loop with sharpmeter")
    parser.add_argument("--size", default="medium", help="a named size of sharpmeter.harness.gpt")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--output", default="runs/fsdp")
    args = parser.parse_args()

    device = start_process_group()
    data = lm_dataset(block_size=64)
    torch.manual_seed(0)  # the same initial weights on every rank, before they are sharded
    model = build_gpt(args.size, vocab_size=BYTE_VOCAB, block_size=64).to(device)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)

    sampler = torch.Generator().manual_seed(0)  # draws identically on every rank
    probe = batch_of(data, torch.randint(len(data), (16,), generator=sampler), device)
    meter = sm.SharpnessMeter(
        model,
        local_shard(probe),
        measures=("critical",),
        schedule=sm.Schedule(every=args.every),
        max_grad_norm=MAX_GRAD_NORM,  # the update measured is clipped as the loop clips
    )
    sink = None
    if dist.get_rank() == 0:
        # max_steps: the planned length, so analysis can tell a run killed midway.
        metadata = run_metadata(
            model, run="fsdp", world_size=dist.get_world_size(), max_steps=args.steps
        )
        sink = JsonlSink(f"{args.output}/sharpness.jsonl", metadata)

    for step in range(1, args.steps + 1):
        indices = torch.randint(len(data), (args.batch_size,), generator=sampler)
        model(**local_shard(batch_of(data, indices, device))).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        if meter.is_due(step):
            row = meter.measure(step, optimizer=optimizer)
            if sink is not None:
                sink.write(row)
                lambda_c = row["critical_sharpness"]
                print(f"step {step}: loss {row['loss']:.3f}, lambda_c {lambda_c:.4g}")
    if sink is not None:
        sink.mark_finished()  # the loop ran to its end: the metadata says so
        sink.close()
    dist.destroy_process_group()


def start_process_group() -> torch.device:
    """NCCL with one GPU per rank where there are GPUs, gloo on the CPU otherwise."""
    if torch.cuda.is_available():
        dist.init_process_group("nccl")
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def batch_of(data, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return move_to(torch.utils.data.default_collate([data[i] for i in indices]), device)


if __name__ == "__main__":
    main()
