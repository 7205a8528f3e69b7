"""Heterogeneous ViT: the whole step's images and frames spread over all ranks, embeddings routed to stage 0.

Each step every rank knows the visual items (images and video frames) of the global batch and which ranks
consume each one: the pipeline-stage-0 ranks of the DP replica whose rows hold its placeholders (TP peers
each need the full embeddings). Those consumers also hold the item's pixels (the topology-aware loader
delivers pixels to stage 0 only). A pluggable cost model and assignment place every item on exactly one
rank of the world, which encodes it (ViT + projector); an encoding rank that is not a consumer first
receives the pixels from one of them (`all_to_all_single`), then the embeddings go to their consumers the
same way, and in backward the gradients take the reverse route. No item is encoded twice, so TP,
CP and PP peers never duplicate ViT work. The items, the cost model and the assignment are
`vision_plan.py`'s; this module moves pixels, embeddings and gradients by that plan.

Gradient convention (the one FSDP units use here too): the loss is divided by the GLOBAL number of target
tokens, so each rank's ViT gradient is its share of the one global gradient and the world reduction is a
plain sum (`reduce_visual_grads`). Consumers of the same item that are TP peers receive identical full
gradients for it (the decoder input is replicated over tp), so the copies' gradients are averaged; CP peers
each splice (and return the gradient of) only the rows inside their sequence slice, so theirs are summed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.vision_plan import (
    AssignFn,
    CostFn,
    PatchCost,
    VisualItem,
    VisualWorkReport,
    frame_pixels,
    greedy_longest_first,
    stage0_consumers,
    visual_items,
)


@dataclass(frozen=True)
class RoutedVisuals:
    """One routing round's result on this rank."""

    embeds: Tensor  # this replica's visual rows in placeholder order (possibly empty, still routed)
    report: VisualWorkReport
    encoded_patches: int  # patches of real items this rank encoded
    global_patches: int  # patches of the whole global batch (all replicas)


def route_replica_visuals(
    router: VisualRouter, dims: ParallelDims, *, grid_thw: Tensor, pixel_values: Tensor | None
) -> RoutedVisuals:
    """The heterogeneous ViT for one round of every DP replica's rows (a microbatch, or a pipeline step).

    grid_thw: this replica's items (every rank of the replica passes the same); pixel_values: their
    patches on the ranks that hold them (the replica's pipeline stage 0; None elsewhere). The replicas'
    grids are all-gathered over dp, so every rank plans the same items of the global batch; each item is
    encoded once in the world and its rows delivered to every stage-0 rank of its replica (TP peers'
    identical gradients averaged, CP peers' slices summed).
    """
    from keye_train.distributed.collectives import gather_objects

    grids = [grid_thw.tolist()]
    if dims.dp > 1:
        grids = gather_objects(dims, grids[0], over="dp")  # dp group rank order == dp_rank
    consumers = stage0_consumers(dims)
    items: list[VisualItem] = []
    first_item = 0
    for replica, grid in enumerate(grids):
        if replica == dims.dp_rank:
            first_item = len(items)
        grid_t = torch.tensor(grid, dtype=torch.long).reshape(-1, 3)
        items += visual_items(grid_t, consumers=consumers[replica], grad_copies=dims.tp)
    frames = frame_pixels(pixel_values, grid_thw) if pixel_values is not None else []
    embeds, report = router(items, pixels=lambda i: frames[i - first_item])
    return RoutedVisuals(
        embeds=embeds,
        report=report,
        encoded_patches=router.encoded_patches,
        global_patches=sum(item.num_patches for item in items),
    )


class _RouteRows(torch.autograd.Function):
    """all_to_all_single of rows with variable split sizes; backward sends the gradients back.

    Written by hand because torch.distributed's functional all-to-all is not differentiable on every
    backend/version we run (gloo); the reverse route is simply the same call with the splits swapped.
    """

    @staticmethod
    def forward(ctx, send, anchor, send_splits, recv_splits, grad_weight, group):
        ctx.splits = (send_splits, recv_splits)
        ctx.group = group
        ctx.save_for_backward(grad_weight)
        out = send.new_empty(sum(recv_splits), send.shape[1])
        dist.all_to_all_single(
            out, send.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        (grad_weight,) = ctx.saved_tensors
        grad_send = grad_out.new_empty(sum(send_splits), grad_out.shape[1])
        # Every rank takes part, also one whose own rows need no gradient: peers are waiting on it.
        dist.all_to_all_single(
            grad_send,
            grad_out.contiguous(),
            output_split_sizes=send_splits,
            input_split_sizes=recv_splits,
            group=ctx.group,
        )
        grad_send = grad_send * grad_weight[:, None] if ctx.needs_input_grad[0] else None
        return grad_send, None, None, None, None, None


@dataclass(frozen=True)
class VisualEncoder:
    """What the router runs on an item: `fn(pixels, grid)` packs items (grid one (1, h, w) row each) into
    `rows(item)` output rows per item of `width` columns. The default is the ViT + projector (LLM tokens);
    stage 0 routes one pooled embedding per image instead."""

    fn: Callable[[Tensor, Tensor], Tensor]
    rows: Callable[[VisualItem], int]
    width: int


def projector_encoder(model: nn.Module) -> VisualEncoder:
    """ViT + projector: an item's h*w patches become h*w / merge^2 LLM-width rows."""
    merge = model.cfg.projector.merge_size
    return VisualEncoder(
        fn=model.encode_visual,
        rows=lambda item: item.num_patches // merge**2,
        width=model.cfg.language.hidden_size,
    )


def _uses_fsdp(modules: Sequence[nn.Module]) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for module in modules for m in module.modules())


class VisualRouter:
    """Encodes this rank's share of the global batch's visual items and routes embeddings to consumers.

    model: has `visual` (the ViT), `mlp_AR` and `cfg`; `encoder` says what runs on an item (default: the
    ViT + projector). Every rank of `group` must call the router each step with the same items, and must
    later run backward through what it returned (see `Pipeline.step`), even when that is empty. Without a
    process group (one process) it simply encodes every item.

    When the ViT is sharded by FSDP its units all-gather in every rank's forward and reduce-scatter in
    every rank's backward, so a rank that was assigned nothing still encodes a blank 2x2-patch image,
    drops its rows and stays in the graph: the same collectives, unchanged math. When the global batch has
    no visual item at all, no rank runs the ViT (its gradients stay None, as in a single process).
    dtype: the dtype embeddings travel in (every rank must agree, also one that encodes nothing);
    None takes the projector's parameter dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        group: dist.ProcessGroup | None = None,
        cost_fn: CostFn | None = None,
        assign_fn: AssignFn = greedy_longest_first,
        encoder: VisualEncoder | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.group = group
        self.cost_fn = cost_fn or PatchCost(model.cfg.vision.hidden_size)
        self.assign_fn = assign_fn
        self.encoder = encoder or projector_encoder(model)
        param = next(model.mlp_AR.parameters())
        self.device = param.device
        self.dtype = dtype or param.dtype
        self.sharded = _uses_fsdp([model.visual, model.mlp_AR])
        self.encoded_patches = 0  # patches of real items this rank encoded in the last call

    def _world(self) -> tuple[int, int]:
        if not dist.is_initialized():
            return 1, 0
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def plan(self, items: Sequence[VisualItem]) -> tuple[list[int], VisualWorkReport]:
        """The encoding rank of every item and the resulting spread of work."""
        world, _ = self._world()
        costs = [self.cost_fn(item) for item in items]
        owner = self.assign_fn(costs, world)
        if len(owner) != len(items) or any(not 0 <= r < world for r in owner):
            raise ValueError(f"assign_fn returned {owner!r}: need one rank in [0, {world}) per item")
        patches, counts, loads = [0] * world, [0] * world, [0.0] * world
        for item, rank, cost in zip(items, owner, costs):
            patches[rank] += item.num_patches
            counts[rank] += 1
            loads[rank] += cost
        return owner, VisualWorkReport(tuple(patches), tuple(counts), tuple(loads))

    def __call__(
        self, items: Sequence[VisualItem], *, pixels: Callable[[int], Tensor]
    ) -> tuple[Tensor, VisualWorkReport]:
        """Embeddings of the items this rank consumes, in item order, and the step's work report.

        pixels(i) returns item i's patches (h*w, 3, p, p); it is called only on the consumers of item i
        (which must hold them), for the items they encode or send to the rank that encodes them.
        """
        world, me = self._world()
        owner, report = self.plan(items)
        tokens = [self.encoder.rows(item) for item in items]
        mine = [i for i, r in enumerate(owner) if r == me]
        self.encoded_patches = sum(items[i].num_patches for i in mine)
        if not items:
            return torch.empty(0, self.encoder.width, device=self.device, dtype=self.dtype), report
        if world == 1:
            return self._encode(items, mine, pixels), report
        received = self._exchange_pixels(items, owner, pixels)
        encoded = self._encode(items, mine, lambda i: received[i] if i in received else pixels(i))

        # Send buffer grouped by destination rank, items ascending inside each group.
        row_start, offset = {}, 0
        for i in mine:
            row_start[i], offset = offset, offset + tokens[i]
        by_dest: dict[int, list[int]] = defaultdict(list)
        for i in mine:
            for dest in items[i].consumers:
                by_dest[dest].append(i)
        send_index, send_weight, send_splits = [], [], []
        for dest in range(world):
            for i in by_dest[dest]:
                send_index += range(row_start[i], row_start[i] + tokens[i])
                send_weight += [1.0 / items[i].grad_copies] * tokens[i]
            send_splits.append(sum(tokens[i] for i in by_dest[dest]))
        # Receive buffer grouped by source rank; reorder it to item order for the splice.
        by_src: dict[int, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            if me in item.consumers:
                by_src[owner[i]].append(i)
        received = [i for src in range(world) for i in by_src[src]]
        recv_splits = [sum(tokens[i] for i in by_src[src]) for src in range(world)]
        recv_start, offset = {}, 0
        for i in received:
            recv_start[i], offset = offset, offset + tokens[i]
        order = [j for i in sorted(received) for j in range(recv_start[i], recv_start[i] + tokens[i])]

        send = encoded[torch.tensor(send_index, dtype=torch.long, device=encoded.device)]
        # A zero-size leaf that requires grad keeps every rank's output in the autograd graph, so each rank
        # runs the backward all-to-all even when it encodes and consumes nothing.
        anchor = torch.empty(0, device=encoded.device, requires_grad=torch.is_grad_enabled())
        weight = torch.tensor(send_weight, dtype=encoded.dtype, device=encoded.device)
        routed = _RouteRows.apply(send, anchor, send_splits, recv_splits, weight, self.group)
        return routed[torch.tensor(order, dtype=torch.long, device=encoded.device)], report

    def _exchange_pixels(
        self, items: Sequence[VisualItem], owner: list[int], pixels: Callable[[int], Tensor]
    ) -> dict[int, Tensor]:
        """Pixels of the items this rank encodes without being their consumer, each sent by one consumer.

        Every rank computes the same moves from the same items and plan, so all agree on the split sizes
        (and on skipping the collective when nothing moves). Senders alternate among an item's consumers.
        """
        moves = [i for i, item in enumerate(items) if owner[i] not in item.consumers]
        if not moves:
            return {}
        world, me = self._world()
        # One pass over the moves (not one per rank): this runs every step with up to thousands of ranks.
        sends: list[list[int]] = [[] for _ in range(world)]
        recvs: list[list[int]] = [[] for _ in range(world)]
        for i in moves:
            source = items[i].consumers[i % len(items[i].consumers)]
            if source == me:
                sends[owner[i]].append(i)
            if owner[i] == me:
                recvs[source].append(i)
        channels, patch = 3, self.model.cfg.vision.patch_size
        numel = {i: items[i].num_patches * channels * patch * patch for i in moves}
        send = [pixels(i).reshape(-1) for group in sends for i in group]
        # Pixels travel in fp32 on every rank (a rank that sends nothing must still agree on the dtype).
        send_buf = (
            torch.cat(send).to(self.device, torch.float32)
            if send
            else torch.empty(0, device=self.device, dtype=torch.float32)
        )
        recv_sizes = [sum(numel[i] for i in group) for group in recvs]
        recv_buf = send_buf.new_empty(sum(recv_sizes))
        dist.all_to_all_single(
            recv_buf,
            send_buf,
            output_split_sizes=recv_sizes,
            input_split_sizes=[sum(numel[i] for i in group) for group in sends],
            group=self.group,
        )
        order = [i for group in recvs for i in group]
        chunks = recv_buf.split([numel[i] for i in order])
        return {i: c.view(items[i].num_patches, channels, patch, patch) for i, c in zip(order, chunks)}

    def _encode(
        self, items: Sequence[VisualItem], mine: list[int], pixels: Callable[[int], Tensor]
    ) -> Tensor:
        if not mine and not self.sharded:
            return torch.empty(0, self.encoder.width, device=self.device, dtype=self.dtype)
        if mine:
            grid = torch.tensor([(1, *items[i].grid_hw) for i in mine], device=self.device)
            # Encoded in one packed ViT call: attention stays within each frame (segment per item).
            batch = torch.cat([pixels(i).to(self.device) for i in mine])
            return self.encoder.fn(batch, grid).to(self.dtype)
        # FSDP-sharded ViT and nothing assigned: a blank image keeps this rank in every unit's collectives.
        patch = self.model.cfg.vision.patch_size
        blank = torch.zeros(4, 3, patch, patch, device=self.device)
        return self.encoder.fn(blank, torch.tensor([[1, 2, 2]], device=self.device))[:0].to(self.dtype)


@torch.no_grad()
def reduce_visual_grads(
    modules: Sequence[nn.Module], *, group: dist.ProcessGroup | None = None, divide_by: float = 1.0
) -> None:
    """Sum the replicated ViT/projector gradients over the world (then divide by `divide_by`).

    With the loss normalised by the global target count the sum is the full gradient (divide_by=1); a
    caller that scaled its loss by k passes divide_by=k. A parameter keeps grad None when no rank produced
    a gradient for it (e.g. the unused pooling head), so the optimizer skips it as a single process would.
    """
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        return
    # On the parameters' device: NCCL takes no CPU tensor.
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    # One bucket: a collective per parameter would cost far more latency than the extra bytes.
    dist.all_reduce(flat, group=group)
    if divide_by != 1.0:
        flat /= divide_by
    for p, chunk, used in zip(params, flat.split([p.numel() for p in params]), has_grad.tolist()):
        p.grad = chunk.view_as(p).clone() if used else None
