"""`parallel.pipeline`'s config, apart from the pipeline itself: every run reads and validates it, but only
a run with pp > 1 needs torch.distributed.pipelining (whose import pulls in dynamo, ~0.8 s per process),
so distributed/pipeline.py is imported only when a pipeline is built."""

from __future__ import annotations

from dataclasses import dataclass

# schedule name -> stage placement over pp ranks (round-robin loop, or V-shaped for ZBV); the torch
# schedule classes are in distributed/pipeline.py (SCHEDULES).
SCHEDULE_PLACEMENT = {"1f1b": "loop", "interleaved_1f1b": "loop", "zero_bubble": "loop", "zbv": "v"}


@dataclass
class PipelineConfig:
    """`parallel.pipeline`: schedule, microbatch count and stages per pp rank (virtual stages)."""

    schedule: str = "1f1b"
    microbatches: int = 1
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULE_PLACEMENT:
            known = sorted(SCHEDULE_PLACEMENT)
            raise ValueError(f"parallel.pipeline.schedule={self.schedule!r} is unknown; use one of {known}")
        if self.microbatches < 1:
            raise ValueError(f"parallel.pipeline.microbatches={self.microbatches} must be >= 1")
        if self.virtual_stages < 1:
            raise ValueError(f"parallel.pipeline.virtual_stages={self.virtual_stages} must be >= 1")
        if self.schedule == "1f1b" and self.virtual_stages != 1:
            raise ValueError(
                f"parallel.pipeline.virtual_stages={self.virtual_stages} needs an interleaved schedule; "
                f"schedule '1f1b' runs one stage per rank"
            )
        if self.schedule == "zbv" and self.virtual_stages != 2:
            raise ValueError(
                f"parallel.pipeline.virtual_stages={self.virtual_stages}: schedule 'zbv' needs exactly 2"
            )

    def validate(self, *, pp: int, num_layers: int) -> None:
        """Checks that need the pp degree and the decoder depth."""
        stages = pp * self.virtual_stages
        if stages > num_layers:
            raise ValueError(
                f"pp*parallel.pipeline.virtual_stages={pp}*{self.virtual_stages}={stages} stages exceed the "
                f"{num_layers} decoder layers: every stage needs at least one layer"
            )
        if self.microbatches < pp:
            raise ValueError(
                f"parallel.pipeline.microbatches={self.microbatches} < pp={pp}: the pipeline would never "
                f"fill; use at least pp microbatches"
            )
        rounds = max(1, self.microbatches // pp)
        if self.schedule != "1f1b" and self.microbatches % rounds:
            raise ValueError(
                f"parallel.pipeline.microbatches={self.microbatches} must be a multiple of "
                f"microbatches // pp = {rounds} for schedule {self.schedule!r}"
            )
