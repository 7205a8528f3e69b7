"""Topology-aware loader: plan each step from the shard index, load only this replica's samples."""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from keye_train.data.batch import EncodedSample, PackedBatch
from keye_train.data.ioserver.protocol import DecodeRequest, Skip
from keye_train.data.loader.decode import Decoder, pack_planned
from keye_train.data.loader.encode import SampleEncoder
from keye_train.data.loader.packing import OVERLONG_POLICIES
from keye_train.data.loader.pixels import broadcast_pixels, to_wire, wire_layout
from keye_train.data.loader.skips import WorldSkips
from keye_train.data.plan.cost import CostModel
from keye_train.data.plan.order import GlobalOrder, SampleRef, build_tables
from keye_train.data.plan.steps import PlannedStep, StepPlanner
from keye_train.data.shards.manifest import DataConfig
from keye_train.distributed.parallel_dims import ParallelDims

log = logging.getLogger(__name__)

RemoteDecode = Callable[[Sequence[DecodeRequest]], list[EncodedSample | Skip]]


@dataclass
class StepData:
    """What the trainer gets per step. microbatches are this rank's; on pipeline stages after the first
    they carry everything but pixel_values (empty): labels, positions, cu_seqlens and input_ids."""

    step: int
    global_keys: list[str]  # every sample consumed this step, in global order
    microbatches: list[PackedBatch]
    report: dict[str, Any] = field(default_factory=dict)
    planned: PlannedStep | None = None  # the plan, on the ranks that made it (loading ranks)

    @property
    def global_refs(self) -> list[SampleRef]:
        """The SampleRefs of global_keys (made on demand; on the ranks that planned the step only)."""
        refs = self.__dict__.get("_refs")
        if refs is None:
            refs = self.__dict__["_refs"] = self.planned.global_refs if self.planned is not None else []
        return refs

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (e.g. by a test harness) with its refs but without the plan, which holds the index.
        state = dict(self.__dict__)
        state["_refs"], state["planned"] = self.global_refs, None
        return state


@dataclass(frozen=True)
class Role:
    """Where this rank sits in the loading topology.

    One rank per DP replica loads: pipeline stage 0, tp 0, cp 0. It broadcasts the batch's metadata to
    the whole replica (every stage needs positions and cu_seqlens, the last stage the labels) and the
    pixels only to its stage-0 TP/CP peers, the ranks that feed the ViT router and the embedding.
    """

    loads: bool
    dp_rank: int
    stage0: bool
    src: int  # global rank of this replica's loading rank
    replica_group: Any = None  # pp x cp x tp ranks of the replica (None: alone)
    stage0_group: Any = None  # cp x tp ranks of the replica's stage 0 (None: alone)


def topology_role(dims: ParallelDims) -> Role:
    """This rank's Role. Collective when distributed (every rank creates every replica's groups)."""
    if dims.world_size == 1:
        return Role(loads=True, dp_rank=0, stage0=True, src=0)
    coords = dims.rank_coordinates
    ranks = dims.mesh.mesh  # (pp, dp_replicate, dp_shard, cp, tp) global ranks
    mine = None
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    for a in range(dims.dp_replicate):
        for b in range(dims.dp_shard):
            replica = ranks[:, a, b].flatten().tolist()
            stage0 = ranks[0, a, b].flatten().tolist()
            replica_group = dist.new_group(replica) if len(replica) > 1 else None
            stage0_group = dist.new_group(stage0) if len(stage0) > 1 else None
            if (a, b) == (coords["dp_replicate"], coords["dp_shard"]):
                mine = (replica, replica_group, stage0_group)
    replica, replica_group, stage0_group = mine
    loads = coords["pp"] == 0 and coords["cp"] == 0 and coords["tp"] == 0
    return Role(
        loads=loads,
        dp_rank=dims.dp_rank,
        stage0=coords["pp"] == 0,
        src=replica[0],
        replica_group=replica_group,
        stage0_group=stage0_group,
    )


class TopologyAwareLoader:
    """Plans each global step over the index (no decoding), loads only this DP replica's samples.

    The state (state_dict) is the global order's position plus the samples carried into the next
    step; it is the same on every rank and does not depend on DP size, workers or prefetch, so a resume
    under another layout consumes the same samples in the same order.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        *,
        dims: ParallelDims,
        tokenizer: Any,
        max_seq_len: int,
        microbatches: int,
        cost_model: CostModel | None = None,
        io: Any = None,
        prefetch: int = 2,
        workers: int = 0,
        plan_method: str = "lpt",
        fill: float = 0.95,
        image_cfg: Any = None,
        video_cfg: Any = None,
        shares: dict[str, float] | None = None,
        overlong: str = "skip",
        remote_decode: RemoteDecode | None = None,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"loader.prefetch={prefetch} must be >= 0")
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong={overlong!r} must be one of {OVERLONG_POLICIES}")
        self.dims, self.max_seq_len, self.prefetch, self.overlong = dims, max_seq_len, prefetch, overlong
        self.skips = WorldSkips(
            [s.name for s in data_cfg.sources],
            max_skip_rate=data_cfg.max_skip_rate,
            min_samples=data_cfg.min_samples_for_skip_rate,
        )
        self.role = topology_role(dims)
        self.opened_shards = 0  # distinct shards this rank's planned steps read (non-loading ranks: 0)
        self.encoder = SampleEncoder(tokenizer, image_cfg=image_cfg, video_cfg=video_cfg)
        self._pixel_stats = (tuple(self.encoder.image_cfg.mean), tuple(self.encoder.image_cfg.std))
        self._state: dict[str, Any] = {"step": 0, "order": {}, "deferred": []}
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.planner: StepPlanner | None = None
        self._io: _IODecode | None = None
        if not self.role.loads:
            return  # these ranks receive everything; they never read an index or a shard
        tables = build_tables(
            data_cfg,
            image_cfg=self.encoder.image_cfg,
            video_cfg=self.encoder.video_cfg,
            cost_model=cost_model or CostModel(),
        )
        order = GlobalOrder(data_cfg, tables=tables, shares=shares)
        self.planner = StepPlanner(
            order,
            dp=dims.dp,
            microbatches=microbatches,
            max_seq_len=max_seq_len,
            fill=fill,
            method=plan_method,
        )
        self._state = self.planner.state_dict()
        if io is not None and getattr(io, "addresses", None) and remote_decode is None:
            remote_decode = self._io = _IODecode(io, self.encoder)
        self.decoder = Decoder(self.encoder, workers=workers, remote=remote_decode)
        self.ids = tokenizer.ids

    # -- loading (loading ranks only) ---------------------------------------------------------------
    def _load(self, planned: PlannedStep) -> tuple[list[PackedBatch], dict[str, Any]]:
        order = self.planner.order
        if self.role.dp_rank == 0:  # every replica plans the same skips; one counts them for the world
            for ref, reason in planned.skipped:
                self.skips.local.skip(ref.source, ref.key, reason, enforce=False)
        groups = planned.rank_items(self.role.dp_rank)
        requests = []
        for ref in (r for g in groups for r in g):
            shard, entry, source = order.entry(ref)
            requests.append(
                DecodeRequest(source=ref.source, kind=source.kind, key=ref.key, shard=shard, entry=entry)
            )
        self.opened_shards += len({r.shard for r in requests})
        results = iter(self.decoder(requests))
        decoded = [[next(results) for _ in g] for g in groups]
        batches, stats = pack_planned(
            decoded,
            predicted=[[r.tokens for r in g] for g in groups],
            max_seq_len=self.max_seq_len,
            pad_token_id=self.ids.endoftext,
            overlong=self.overlong,
            vision_start=self.ids.vision_start,
            vision_end=self.ids.vision_end,
            counter=self.skips.local,
        )
        report = planned.report()
        report.update(stats)
        return batches, report

    def _produce_one(self) -> tuple[PlannedStep, list[PackedBatch], dict[str, Any], list[int]]:
        planned = self.planner.next_step()
        batches, report = self._load(planned)
        return planned, batches, report, self.skips.delta()

    def _producer(self) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self._produce_one()
            except BaseException as exc:  # handed to the trainer's thread, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def _next_loaded(self) -> tuple[PlannedStep, list[PackedBatch], dict[str, Any], list[int]]:
        if self.prefetch == 0:
            return self._produce_one()
        if self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._producer, name="keye-loader", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._halt()
            raise RuntimeError(f"the data loader's background thread failed: {item}") from item
        return item

    # -- the trainer's interface --------------------------------------------------------------------
    @property
    def counter(self):
        """The world's skip counts (the same on every rank after each step)."""
        return self.skips.total

    def next_step(self) -> StepData:
        """Collective over the world: the next step's batches for this rank.

        The metadata (keys, positions, labels) is broadcast to the replica as one pickled
        object; pixels go to the stage-0 TP/CP peers as tensors, uint8 when that is exact.
        """
        meta: dict[str, Any] | None = None
        own: list[torch.Tensor] = []  # the loading rank's pixels per microbatch
        wires: list[torch.Tensor] | None = None
        delta, planned = None, None
        mean, std = self._pixel_stats
        if self.role.loads:
            planned, batches, report, delta = self._next_loaded()
            own = [b.pixel_values for b in batches]
            if self.role.stage0_group is not None:
                wires = [to_wire(p, mean=mean, std=std) for p in own]
            meta = {
                "step": planned.step,
                "keys": planned.global_keys,
                "report": report,
                "state": planned.state_after,
                "pixels": wire_layout(wires) if wires is not None else None,
                "batches": [replace(b, pixel_values=torch.empty(0, 3, 14, 14)) for b in batches],
            }
        if self.role.replica_group is not None:
            box = [meta]
            dist.broadcast_object_list(box, src=self.role.src, group=self.role.replica_group)
            meta = box[0]
        batches = meta["batches"]
        if self.role.stage0:
            if self.role.stage0_group is not None:
                own = broadcast_pixels(
                    wires,
                    layout=meta["pixels"],
                    src=self.role.src,
                    group=self.role.stage0_group,
                    mean=mean,
                    std=std,
                )
            batches = [replace(b, pixel_values=p) for b, p in zip(batches, own)]
        # Skip counts of every replica (planning and decoding), summed over the world: the ceiling holds
        # for the whole run and, through the state, across resumes.
        self.skips.merge(delta, distributed=self.dims.world_size > 1)
        self._state = meta["state"]
        return StepData(
            step=meta["step"],
            global_keys=meta["keys"],
            microbatches=batches,
            report=meta["report"],
            planned=planned,
        )

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last step next_step returned (not what prefetch planned since),
        and the world's skip counts up to it."""
        return copy.deepcopy({**self._state, "skips": self.skips.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._halt()
        state = copy.deepcopy(dict(state))
        self.skips.load_state_dict(state.pop("skips", {}))
        self._state = state
        if self.planner is not None:
            self.planner.load_state_dict(self._state)

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def close(self) -> None:
        self._halt()
        if self.role.loads:
            self.decoder.close()
            if self._io is not None:
                self._io.close()


class _IODecode:
    """Decode on the I/O servers (keye_train.data.ioserver.config) over one long-lived client.

    The client (ZeroMQ sockets) is made on first use, in the thread that decodes, and closed with the
    loader. A config without addresses decodes locally through the same function.
    """

    def __init__(self, io: Any, encoder: SampleEncoder) -> None:
        self.io, self.encoder, self.client = io, encoder, None

    def __call__(self, requests: Sequence[DecodeRequest]) -> list[EncodedSample | Skip]:
        from keye_train.data.ioserver.config import IOClient, decode_many

        if self.client is None and self.io.addresses:
            self.client = IOClient.from_config(self.io, encoder=self.encoder)
        return list(decode_many(requests, config=self.io, encoder=self.encoder, client=self.client))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
