"""``ArrowDataLoader``: packed multimodal micro-batches from prepared Arrow shards, resumable exactly.

    loader = ArrowDataLoader(cfg.data.path, cfg.data, tokenizer, seq_len=512, micro_batch_size=4,
                             dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, seed=cfg.data.seed)
    batch = loader.next_batch()            # PackedBatch, once per micro-step
    state = loader.state_dict()            # small JSON-able dict -> the checkpoint (per rank)
    loader.load_state_dict(state)          # in a fresh process: the next batches are the same

Each DP rank runs ``torch.utils.data.DataLoader`` with ``data.num_workers`` workers (0: in the
trainer's process) over ``_SlotIterable``; worker w of rank r is slot ``w * dp_size + r``
(``order.py``) and produces that slot's batches (``SlotStream``). The DataLoader returns batches
round-robin from its workers, so consumed batch k came from worker ``k % W``.

**Batches across processes.** A worker collates each batch straight into one shared-memory block
(``batch.BatchBlock``: every tensor, media included, at an aligned offset) taken from a small pool
it reuses once the trainer has dropped the batch; a block's file descriptor crosses once, later
batches in it only name it (``shared_blocks.py``). The trainer's side rebuilds the ``PackedBatch``
as views of the block, without copying. Without workers, batches are collated into private buffers.
Media read as is from the shards are not in the block at all: it names their file and offset, and
the trainer's process views them in its own mapping of the shard (``batch.mapped_file``; zero-copy);
with ``pin_memory`` they are copied into the block instead, which is then pinned as a whole.

**Resume with prefetching.** Workers run ahead of the trainer, so their own positions are not the
run's. Every batch therefore travels with its worker's state *after* that batch; the loader keeps,
per worker, the state of the last batch the trainer actually took, plus which worker is next.
``state_dict()`` returns exactly that. On load, worker w restarts from its saved state; because
the DataLoader always asks physical worker 0 first, physical worker i plays logical worker
``(i + next_worker) % W``. Prefetched but unconsumed batches are simply produced again.

**Signals.** Workers ignore SIGTERM and SIGINT (``_ignore_stop_signals``): SLURM signals every
process of a job step and a terminal's Ctrl-C reaches the whole foreground group, but whether to
stop (and save first) is the trainer's decision, and a worker that died of the signal would take
the run down with it ("DataLoader worker ... killed by signal") before any save. Only a SIGTERM
from the trainer's own process (torch's last-resort ``terminate()``) still ends a worker.

A resume needs the same dp_size, worker count (0 and 1 are the same), seed, sequence length,
micro-batch size, look-ahead, datasets and weights (and ``data.multiscale`` with its schedule length,
when set): these fix the data order, and ``load_state_dict`` names the one that differs.

**Scale buckets** (``data.multiscale``, ``multiscale.py``): each worker's stream is then a
``ScaledSlotStream``, which brings the images and videos of its k-th micro-batch to the bucket of
k; k follows from the worker's batch count, which the state already holds, so resume stays exact.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from xoron_dist.data.batch import BatchBlock, PackedBatch, allocate_local
from xoron_dist.data.blend import BlendEntry, resolve_blend
from xoron_dist.data.multiscale import ScaledSlotStream, ScaleSchedule
from xoron_dist.data.order import slot_index, slot_position
from xoron_dist.data.packing import GENERATION_TOKEN, TokenLayout
from xoron_dist.data.schema import media_of
from xoron_dist.data.shards import ArrowDataset, PreparedData
from xoron_dist.data.shared_blocks import BlockRegistry, SharedBlockPool
from xoron_dist.data.stream import SlotStream
from xoron_dist.utils.typed_config import to_dict

STATE_FORMAT = "xoron-arrow-loader-v1"
DEFAULT_LOOKAHEAD = 16


class LoaderStateError(ValueError):
    """A saved loader state does not belong to this loader's data order."""


def _as_is(item: Any) -> Any:
    return item


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGINT is ignored; SIGTERM too, unless the trainer's process sent it.

    torch and multiprocessing end a worker that did not stop by itself with ``terminate()``
    (SIGTERM from the trainer's process): a trainer that crashed with its loader alive does so at
    exit and then waits for the worker, so a plain SIG_IGN would hang it there. SIGTERM is therefore
    blocked and taken by a thread that reads who sent it (``sigwaitinfo``): the trainer's process
    ends the worker, anyone else's (SLURM, a ``kill`` of the process group) is dropped.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler the trainer installed before forking us
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no way to tell the sender; SIGTERM keeps its default
        return
    # Before any other thread exists, so that every thread of the worker inherits the block.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(os.getppid(),), name="sigterm", daemon=True).start()


@contextlib.contextmanager
def _sigterm_blocked_for_forks() -> Iterator[None]:
    """SIGTERM blocked in this thread while it forks the loader workers, so that every thread a worker
    starts before its ``worker_init_fn`` inherits the block that ``_ignore_stop_signals`` relies on.
    (After the trainer set torch's thread count, a forked worker has one thread more by then, without
    the block; a SIGTERM to the process group killed the worker through it.) A SIGTERM that arrives
    meanwhile waits and reaches the trainer when the block is lifted."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _take_sigterm(trainer_pid: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer_pid:
        pass  # not the trainer's: dropped
    # The trainer's: die of it, as torch expects of a worker it terminates.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)


class _SlotIterable(IterableDataset):
    """Endless ``(logical worker, state after the batch, BatchBlock)`` of one DataLoader worker."""

    def __init__(self, datasets: list[ArrowDataset], entries: list[BlendEntry], layout: TokenLayout, *,
                 seed: int, dp_rank: int, dp_size: int, workers: int, micro_batch_size: int, lookahead: int,
                 pad_id: int, states: list[dict[str, Any] | None], first_worker: int, pin_memory: bool,
                 scales: ScaleSchedule | None = None) -> None:
        super().__init__()
        self.datasets, self.entries, self.layout = datasets, entries, layout
        self.seed, self.dp_rank, self.dp_size, self.workers = seed, dp_rank, dp_size, workers
        self.micro_batch_size, self.lookahead, self.pad_id = micro_batch_size, lookahead, pad_id
        self.states, self.first_worker, self.pin_memory = states, first_worker, pin_memory
        self.scales = scales

    def stream(self, worker: int) -> SlotStream:
        kwargs: dict[str, Any] = dict(seed=self.seed, slot=slot_index(self.dp_rank, worker, self.dp_size),
                                      num_slots=self.dp_size * self.workers, micro_batch_size=self.micro_batch_size,
                                      lookahead=self.lookahead, pad_id=self.pad_id,
                                      map_media=not self.pin_memory)
        if self.scales is None:
            stream = SlotStream(self.datasets, self.entries, self.layout, **kwargs)
        else:  # one scale bucket per micro-batch (multiscale.py)
            stream = ScaledSlotStream(self.datasets, self.entries, self.layout, **kwargs, schedule=self.scales,
                                      worker=worker, workers=self.workers)
        if self.states[worker] is not None:
            stream.load_state_dict(self.states[worker])
        return stream

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any], BatchBlock]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first_worker) % self.workers
        stream = self.stream(worker)
        if info is None:  # in the trainer's process: private buffers, nothing to ship
            while True:
                block = stream.next_block(allocate_local)
                yield worker, stream.state_dict(), block
        pool = SharedBlockPool(resend=self.pin_memory)  # reused shared-memory blocks (shared_blocks.py)
        while True:
            block = stream.next_block(pool.allocate)
            yield worker, stream.state_dict(), pool.ship(block)


class ArrowDataLoader:
    """Packed, blended, DP-split micro-batches of prepared Arrow data (see the module docstring).

    ``kinds``/``mix``: a stage's restriction (None: all datasets, in proportion to rows).
    ``kinds_field``/``mix_field``/``seq_len_field`` are the config fields that errors name.
    ``lookahead``: documents in the packing window. ``pin_memory``: page-locked batches (for CUDA).
    ``total_batches``: the stage's micro-batches per rank, the length of a progressive or curriculum
    ``data.multiscale`` schedule whose ``schedule_batches`` is 0.
    """

    def __init__(
        self,
        manifest_dir: str | Path,
        data_cfg,
        tokenizer,
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        kinds: Sequence[str] | None = None,
        mix: Mapping[str, float] | None = None,
        lookahead: int = DEFAULT_LOOKAHEAD,
        check_tokenizer: bool = True,
        pin_memory: bool = False,
        kinds_field: str = "stages.kinds",
        mix_field: str = "data.mix",
        seq_len_field: str = "train.seq_len",
        total_batches: int | None = None,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size = {dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if manifest_dir is None:
            raise ValueError("data.path is not set: the Arrow loader needs the prepared dataset folder")
        self.root = Path(manifest_dir)
        self.data = PreparedData(self.root, verify_checksums=data_cfg.verify_checksums)
        if check_tokenizer:
            self.data.check_tokenizer(tokenizer)
        self.entries = resolve_blend(self.data.manifest.datasets, kinds=kinds, mix=mix, kinds_field=kinds_field,
                                     mix_field=mix_field, where=str(self.root))
        self.layout = TokenLayout.from_config(data_cfg, tokenizer.special_ids, seq_len)
        self.layout.check_fits([entry.kind for entry in self.entries], seq_len_field=seq_len_field)
        self._check_special_ids(tokenizer.special_ids)
        datasets = [self.data.datasets[entry.name] for entry in self.entries]
        for dataset in datasets:  # size (and sha256) once here, before workers fork
            dataset.verify()
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.num_workers = data_cfg.num_workers
        self.workers = max(1, self.num_workers)  # logical workers: 0 workers read like 1
        self.lookahead, self.pad_id, self.pin_memory = lookahead, tokenizer.pad_id, pin_memory
        self._datasets = datasets
        multiscale = getattr(data_cfg, "multiscale", None)
        self.multiscale = multiscale
        self.scales = None if multiscale is None else ScaleSchedule(multiscale, total_batches)
        self._states: list[dict[str, Any] | None] = [None] * self.workers
        self._next_worker = 0
        self._consumed = 0
        self._iterator: Iterator | None = None
        self._blocks = BlockRegistry()

    def _check_special_ids(self, special_ids: Mapping[str, int]) -> None:
        needed = {"endoftext", "pad"}
        for entry in self.entries:
            medium = media_of(entry.kind)
            if medium:
                needed |= {f"{medium}_start", f"{medium}_end", f"{medium}_pad", GENERATION_TOKEN[medium]}
        missing = sorted(needed - set(special_ids))
        if missing:
            raise ValueError(f"the tokenizer lacks the special tokens {missing} that the data needs")

    # ------------------------------------------------------------------ iteration

    def _start(self) -> None:
        iterable = _SlotIterable(
            self._datasets, self.entries, self.layout, seed=self.seed, dp_rank=self.dp_rank, dp_size=self.dp_size,
            workers=self.workers, micro_batch_size=self.micro_batch_size, lookahead=self.lookahead,
            pad_id=self.pad_id, states=copy.deepcopy(self._states), first_worker=self._next_worker,
            pin_memory=self.pin_memory, scales=self.scales,
        )
        # collate_fn: items are already batches; the default walks every list of the state (~2 us a sample)
        loader = DataLoader(iterable, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=2 if self.num_workers > 0 else None, collate_fn=_as_is,
                            worker_init_fn=_ignore_stop_signals)
        with _sigterm_blocked_for_forks():
            self._iterator = iter(loader)
        self._blocks = BlockRegistry()  # the new workers' pool blocks, as they arrive

    def next_batch(self) -> PackedBatch:
        """This rank's next micro-batch."""
        if self._iterator is None:
            self._start()
        worker, state, block = next(self._iterator)
        if worker != self._next_worker:
            raise RuntimeError(f"DataLoader returned worker {worker}'s batch, expected worker {self._next_worker}'s")
        self._states[worker] = state
        self._next_worker = (worker + 1) % self.workers
        self._consumed += 1
        return self._blocks.receive(worker, block).to_batch()

    def __iter__(self) -> Iterator[PackedBatch]:
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """Stop the worker processes (the next ``next_batch`` starts them again)."""
        self._iterator = None
        self._blocks = BlockRegistry()

    # ------------------------------------------------------------------ state

    def _order_key(self) -> dict[str, Any]:
        key = {
            "dp_size": self.dp_size, "workers": self.workers, "seed": self.seed, "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size, "lookahead": self.lookahead,
            "datasets": {e.name: {"rows": e.rows, "weight": e.weight} for e in self.entries},
        }
        if self.scales is not None:  # only then: states saved without buckets keep loading as before
            key["multiscale"] = {**to_dict(self.multiscale), "schedule": self.scales.total}
        return key

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned by ``next_batch`` (JSON-serialisable, small)."""
        return {"format": STATE_FORMAT, "dp_rank": self.dp_rank, **self._order_key(),
                "next_worker": self._next_worker, "consumed": self._consumed,
                "slots": copy.deepcopy(self._states)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (of this rank, this data order); restarts the workers."""
        if state.get("format") != STATE_FORMAT:
            raise LoaderStateError(f"loader state format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if state["dp_rank"] != self.dp_rank:
            raise LoaderStateError(f"the loader state belongs to dp rank {state['dp_rank']}, this is {self.dp_rank}")
        order = self._order_key()
        order.setdefault("multiscale", None)  # a state saved with scale buckets does not load without them
        for key, ours in order.items():
            if state.get(key) != ours:
                raise LoaderStateError(
                    f"the saved data order was made with {key} = {state.get(key)!r}, this run has {ours!r}; "
                    "an exact resume needs the same value (or start the stage's data afresh)"
                )
        self.close()
        self._states = copy.deepcopy(list(state["slots"]))
        self._next_worker = int(state["next_worker"])
        self._consumed = int(state["consumed"])

    # ------------------------------------------------------------------ logging

    def epochs(self) -> dict[str, int]:
        """Per dataset, the furthest epoch any of this rank's workers has reached (consumed batches)."""
        reached = {entry.name: 0 for entry in self.entries}
        for worker, state in enumerate(self._states):
            if state is None:
                continue
            slot = slot_index(self.dp_rank, worker, self.dp_size)
            for entry, cursor in zip(self.entries, state["cursors"], strict=True):
                epoch = slot_position(cursor, slot, self.dp_size * self.workers) // entry.rows
                reached[entry.name] = max(reached[entry.name], epoch)
        return reached

    def skipped(self) -> dict[str, dict[str, int]]:
        """Per dataset, samples skipped by this rank's workers so far, by reason."""
        out = {entry.name: {"too_long": 0, "malformed": 0} for entry in self.entries}
        for state in self._states:
            if state is None:
                continue
            for reason, counts in state["skipped"].items():
                for entry, count in zip(self.entries, counts, strict=True):
                    out[entry.name][reason] += count
        return out

    def describe(self) -> str:
        epochs, skipped = self.epochs(), self.skipped()
        parts = []
        for entry in self.entries:
            dropped = sum(skipped[entry.name].values())
            parts.append(f"{entry.name} ({entry.kind}, {entry.rows} rows, weight {entry.weight:.3f}, "
                         f"epoch {epochs[entry.name]}{f', {dropped} skipped' if dropped else ''})")
        return (f"arrow {self.root}: {'; '.join(parts)}; seq_len {self.seq_len}, micro-batch {self.micro_batch_size}, "
                f"dp rank {self.dp_rank}/{self.dp_size}, {self.num_workers} workers, {self._consumed} batches consumed"
                + ("" if self.scales is None else f"; scale buckets {self.multiscale.strategy}, next "
                   f"{self.scales.bucket(self._consumed)}, largest {self.scales.largest()}"))
