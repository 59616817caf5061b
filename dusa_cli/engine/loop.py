"""The hand-written online adaptation loop over (corruption, severity) tasks."""

from __future__ import annotations

import math
import signal
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from dusa_cli.collectives import agree, broadcast_from_main, gather_to_main
from dusa_cli.config.loader import input_paths
from dusa_cli.config.schema import DataConfig, ExperimentConfig
from dusa_cli.data.files import PREPARE_HINT, require_tasks, usable_cores
from dusa_cli.draws import task_key
from dusa_cli.engine.adapter import OnlineAdapter
from dusa_cli.engine.classification import CLASSIFICATION
from dusa_cli.engine.distributed import ShardedBatches, World, collate_shard, process_group
from dusa_cli.engine.profiling import step_profiler
from dusa_cli.engine.runtime import resolve_device, rng_state, seed_everything, set_rng_state
from dusa_cli.engine.segmentation import SEGMENTATION
from dusa_cli.engine.tasks import NoProgress, Progress, TaskKind
from dusa_cli.errors import ConfigError, DusaError, listed
from dusa_cli.methods import get_method
from dusa_cli.results.environment import collect_environment
from dusa_cli.results.store import RESULTS_FILE, ResultsStore, task_id
from dusa_cli.results.tracking import check_trackers, open_trackers


def task_loader(dataset: Dataset, data: DataConfig, world: World, seed: int) -> DataLoader:
    """The single-process batches in the single-process (seeded) order, cut into this process's
    shards: the whole batches in a single process."""
    generator = torch.Generator().manual_seed(seed)
    order = RandomSampler(dataset, generator=generator) if data.shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatches(BatchSampler(order, data.batch_size, drop_last=False), world),
        collate_fn=collate_shard,
        num_workers=data.num_workers,
        pin_memory=world.device.type == "cuda",
        generator=generator,
        worker_init_fn=_restore_sigterm_handler,
    )


def _restore_sigterm_handler(_worker_id: int) -> None:
    """A forked DataLoader worker takes back the run's SIGTERM handler (dusa_cli.stopping), which
    torch replaced by one that kills it. A scheduler signals every process: the run, stopping as
    at Ctrl-C, would fail on its killed workers before it could report the stop."""
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)


def _to_cpu(state: Any) -> Any:
    """A detached CPU copy, so snapshots neither alias live tensors nor hold GPU memory."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(value) for value in state)
    return state


def run_experiment(
    config: ExperimentConfig, *, resume: bool = False, progress: Progress | None = None
) -> ResultsStore:
    """One process, or one of several under torchrun / `--gpus` (rank 0 alone writes and shows
    progress). Returns the run's results store (an unwritten copy on ranks other than 0)."""
    split = config.run.split_devices
    with process_group(split[0] if split else config.run.device) as world, warnings.catch_warnings():
        # torch warns of too many data workers twice per loader, made and iterated; the run, once.
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        cores = usable_cores()
        if world.is_main and config.data.num_workers > cores:
            warnings.warn(f"data.num_workers={config.data.num_workers} is more than the {cores} CPU cores this process may use", stacklevel=2)
        shown = progress if progress is not None and world.is_main else NoProgress()
        return _run(config, world, resume, shown)


TASKS: dict[str, TaskKind] = {"cls": CLASSIFICATION, "seg": SEGMENTATION}


def _run(config: ExperimentConfig, world: World, resume: bool, progress: Progress) -> ResultsStore:
    device, seed = world.device, config.run.seed
    kind = TASKS[config.task]
    if world.size > 1 and not kind.multi_process:
        raise ConfigError(
            f"task {config.task} runs in one process; split its prior over GPUs with --gpus instead of torchrun"
        )
    split = config.run.split_devices
    devices = [resolve_device(spec) for spec in split] if split else [device]
    continual = config.run.setting == "continual"
    tasks = [(c, s) for c in config.data.corruptions for s in config.data.severities]

    def setup() -> tuple[OnlineAdapter, list[Dataset]]:
        seed_everything(seed)  # the same on every process, so the replicas start identical
        model = kind.create_model(config.model)
        method = get_method(config.method.name)(model, config.method).place(devices)
        if config.run.channels_last:
            method.use_channels_last()
        method.compile(config.run.compile, config.run.compile_mode)
        adapter = OnlineAdapter(method, config.optim, config.run.precision, device, config.run.channels_last)
        # Open every task first: a broken test set (no images, labels the model cannot predict) fails
        # before any compute is spent (missing ones failed in check_inputs, before the model was built).
        datasets = [kind.open_dataset(config.data, c, s, model.num_classes) for c, s in tasks]
        return adapter, datasets

    # The output and the inputs (on every node) are checked before minutes of model loading; the
    # output is opened after it.
    agree(lambda: ResultsStore.check(config.run.output, config, resume) if world.is_main else None)
    agree(lambda: check_inputs(config))
    if resume and world.is_main and not (config.run.output / RESULTS_FILE).is_file():  # a mistyped -o?
        warnings.warn(f"--resume: nothing to resume in {config.run.output} (no {RESULTS_FILE}); the run starts from its first task", stacklevel=2)
    adapter, datasets = agree(setup)
    if world.is_main and config.data.num_ex is not None:
        _say_whole_tasks(config.data.num_ex, {task_id(c, s): len(d) for (c, s), d in zip(tasks, datasets)})
    initial = None if continual else _to_cpu(adapter.state_dict())  # what each reset restores
    if not world.is_main:  # its own random stream from here; rank 0 goes on with the single-process one
        seed_everything(world.process_seed(seed))
    tracked = config.run.track if world.is_main else []  # rank 0 tracks, as it writes the results
    check_trackers(tracked)  # a missing package fails before the results directory is written
    store = _open_store(config, world, resume)
    # results.json says how the run ended (complete, stopped or failed); the trackers close however it ends.
    with store.running(), ExitStack() as opened:
        done = store.finished()
        if continual and done and len(done) < len(tasks):  # a finished run needs no state back
            agree(lambda: _restore(store, adapter, world))
            done = store.finished()
        # run.profile: the first task this process runs (rank 0 alone with several processes).
        profiling = config.run.profile and world.is_main
        plan = [task_id(corruption, severity) for corruption, severity in tasks]
        if resume and world.is_main and done >= set(plan):
            warnings.warn(f"--resume: every task of the run in {config.run.output} is finished; nothing is left to run", stacklevel=2)
        trackers = [opened.enter_context(closing(t)) for t in open_trackers(tracked, config.run.output, store.results["tasks"], plan)]
        for index, ((corruption, severity), dataset) in enumerate(zip(tasks, datasets)):
            name = task_id(corruption, severity)
            if name in done:
                continue
            if not continual:  # fully TTA: every task starts from the source model (§1.7)
                adapter.load_state_dict(initial)
                seed_everything(world.process_seed(seed))
            # Reset runs shuffle every task with the run's seed, as the official code re-seeds (§1.7);
            # DUSA's noise and classes come from per-image streams keyed by the task (draws.py), where
            # the official code's one global stream gives each task the same draws.
            loader = task_loader(dataset, config.data, world, seed if not continual else seed + index)
            progress.start_task(name, len(dataset))
            with profiled(adapter, devices, config.run.output / "profile") if profiling else nullcontext():
                record = kind.run(adapter, loader, config.data, devices, progress, task_key(seed, name))
            profiling = False
            progress.end_task(record[kind.score])
            record = {"corruption": corruption, "severity": severity} | record
            if record.get("mean_loss") is not None and not math.isfinite(record["mean_loss"]):
                warnings.warn(f"{name}: the loss became {record['mean_loss']} (the model diverged; a lower optim.lr?)", stacklevel=2)
            if continual:  # state first, carrying the records, so a kill between the writes loses nothing
                records = store.results["tasks"] + [record]
                rng = gather_to_main(rng_state())  # one stream per process
                store.save_state({"adapter": adapter.state_dict(), "rng": rng, "records": records})
            store.record_task(record)
            for tracker in trackers:
                tracker.log_task(store.results["tasks"], plan)
        store.complete(kind.summarize(store.results["tasks"]))
    return store


def _say_whole_tasks(num_ex: int, sizes: dict[str, int]) -> None:
    """A data.num_ex above a task's size runs the whole task: said once, not taken silently for
    the number of images each task scored."""
    short = [f"{name} ({size} images)" for name, size in sizes.items() if size < num_ex]
    if short:
        whole = "the whole task runs" if len(short) == 1 else "each of them runs whole"
        warnings.warn(f"data.num_ex={num_ex} is more than the images of {listed(short, 3)}: {whole}", stacklevel=3)


def check_inputs(config: ExperimentConfig) -> None:
    """Every path the run reads exists, or one error names all that do not: a new preset's
    weights, prior and data are found missing at once, not one per attempt. So are the tasks
    that the data root lacks (a dataset built with some corruptions only)."""
    missing = {key: path for key, path in input_paths(config).items() if not path.exists()}
    if missing:
        hint = f" ({PREPARE_HINT})" if "data.root" in missing else ""
        raise DusaError(f"not found: {', '.join(f'{key} {path}' for key, path in missing.items())}{hint}")
    kind, data = TASKS[config.task], config.data
    require_tasks(data.root, data.corruptions, data.severities, kind.find_data, kind.data_layout)


@contextmanager
def profiled(adapter: OnlineAdapter, devices: list[torch.device], directory: Path) -> Iterator[None]:
    """Step a profiler with the adapter's micro-batches while the block runs (run.profile)."""
    adapter.profiler = step_profiler(devices, directory)
    try:
        with adapter.profiler:
            yield
    finally:
        adapter.profiler = None


def _open_store(config: ExperimentConfig, world: World, resume: bool) -> ResultsStore:
    """Rank 0 owns the results directory; the others keep an unwritten copy of its results."""

    def open_on_main() -> ResultsStore | None:
        if not world.is_main:
            return None
        environment = collect_environment(world.device, config) | {"world_size": world.size}
        return ResultsStore.open(config.run.output, config, environment, resume)

    store = agree(open_on_main)
    results = broadcast_from_main(store.results if store else None)
    return store or ResultsStore(config.run.output, results, writable=False)


def _restore(store: ResultsStore, adapter: OnlineAdapter, world: World) -> None:
    """A continual run's state after its last finished task (every process reads state.pt)."""
    saved = store.load_state()
    # A list by rank; one bare state in files written before multi-process runs.
    streams = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if len(streams) != world.size:
        raise DusaError(
            f"cannot resume {store.root} with {world.size} process(es): it ran with {len(streams)}, "
            "and each process keeps its own random stream"
        )
    store.adopt_records(saved["records"])
    adapter.load_state_dict(saved["adapter"])
    set_rng_state(streams[world.rank])
