"""A run's results directory: written as each task finishes, safe to interrupt and resume.

    OUTPUT/config.yaml        the fully resolved config
    OUTPUT/environment.json   packages, device, git commit, command
    OUTPUT/results.json       status, planned tasks, one record per finished task, summary
    OUTPUT/state.pt           (continual runs) model/optimizer/RNG after the last finished task
    OUTPUT/profile/           (run.profile) written by the engine's profiler, engine/profiling.py
    OUTPUT/tensorboard/       (run.track) written by results/tracking.py as tasks finish

Every file is replaced atomically, so an interrupted run leaves only finished tasks on disk.
With several processes only rank 0 writes; the others keep an unwritten copy of its results.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from dusa_cli.config.loader import dump_config, flatten
from dusa_cli.config.schema import ExperimentConfig
from dusa_cli.errors import DusaError, listed
from dusa_cli.stopping import shielded
from dusa_cli.writing import check_writable, write_atomic, write_json_atomic, write_text_atomic

RESULTS_FORMAT = "dusa-results/1"
RESULTS_FILE = "results.json"


def task_id(corruption: str, severity: int) -> str:
    return f"{corruption}/{severity}"


def stopped_run_outcome(root: Path) -> str:
    """What a run that a stop ended kept in `root`, from what is on disk (the stop has written
    results.json): the end of its one-line message."""
    results_path = root / RESULTS_FILE
    if results_path.is_file():
        try:
            results = read_results(results_path)
        except DusaError:
            return f"see {results_path}"
        if results["tasks"]:
            done, planned = len(results["tasks"]), len(results["planned_tasks"])
            return f"{done} of {planned} tasks finished and are saved in {root} (continue with --resume)"
    elif not (root / "config.yaml").is_file():
        return "no task had started; nothing was written"
    return "no task had finished (run it again with --resume)"


class ResultsStore:
    def __init__(self, root: Path, results: dict[str, Any], writable: bool = True):
        self.root = root
        self.results = results
        self.writable = writable

    @staticmethod
    def check(root: Path, config: ExperimentConfig, resume: bool) -> None:
        """Refuse now what `open` would refuse, before any model loads; writes nothing."""
        check_writable(root, directory=True)
        if (root / RESULTS_FILE).is_file() or (root / "config.yaml").is_file():
            if not resume:
                raise DusaError(_held_run(root, dump_config(config)))
            _check_same_config(root, dump_config(config))
            if (root / RESULTS_FILE).is_file():
                try:
                    read_results(root / RESULTS_FILE)
                except DusaError as error:
                    raise DusaError(f"cannot resume: {error}; move it away to run every task afresh") from None
        elif root.exists():
            leftovers = _unfinished_writes(root) if resume else []
            if any(entry not in leftovers for entry in root.iterdir()):
                raise DusaError(f"output directory {root} is not empty and holds no dusa run")

    @classmethod
    def open(
        cls, root: Path, config: ExperimentConfig, environment: dict[str, Any], resume: bool
    ) -> ResultsStore:
        cls.check(root, config, resume)
        if resume:  # the user says the directory is this run's: no other process is writing it
            for leftover in _unfinished_writes(root):
                leftover.unlink(missing_ok=True)
        results_path = root / RESULTS_FILE
        if resume and results_path.is_file():
            store = cls(root, read_results(results_path))
            store.results["status"] = "running"
            recorded = _recorded_environment(root)
            _check_same_inputs(root, recorded, environment)
            if config.run.setting != "continual":  # a continual run refuses another count (loop._restore)
                _say_other_process_count(recorded, environment)
            _record_resume(root, recorded, environment)
            return store
        # A new run, or one stopped before its first results were written: it starts afresh.
        plan = [
            {"corruption": c, "severity": s}
            for c in config.data.corruptions
            for s in config.data.severities
        ]
        results = {
            "format": RESULTS_FORMAT,
            "status": "running",
            "task": config.task,
            "method": config.method.name,
            "model": config.model.name,
            "setting": config.run.setting,
            "seed": config.run.seed,
            "data": str(config.data.root),
            "planned_tasks": plan,
            "tasks": [],
        }
        store = cls(root, results)
        write_text_atomic(root / "config.yaml", dump_config(config))
        write_json_atomic(root / "environment.json", environment)
        store._save()
        return store

    def finished(self) -> set[str]:
        return {task_id(t["corruption"], t["severity"]) for t in self.results["tasks"]}

    def record_task(self, record: dict[str, Any]) -> None:
        self.results["tasks"].append(record)
        self._save()

    def adopt_records(self, records: list[dict[str, Any]]) -> None:
        """Take the task records saved with the continual state (a superset of results.json's
        when the run stopped between the two writes)."""
        if len(records) < len(self.results["tasks"]):
            raise DusaError(f"cannot resume {self.root}: state.pt is older than results.json")
        self.results["tasks"] = list(records)
        self._save()

    @contextmanager
    def running(self) -> Iterator[None]:
        """A run's tasks; a signal that stops them leaves status "stopped", an error "failed"."""
        try:
            yield
        except BaseException as ending:
            if self.writable and self.results["status"] == "running":
                self.results["status"] = "stopped" if isinstance(ending, KeyboardInterrupt) else "failed"
                with suppress(OSError, DusaError), shielded():  # the original error is the one to report
                    self._save()
            raise

    def complete(self, summary: dict[str, Any]) -> None:
        """Status "complete" once it is on disk: a stop in the middle of this save leaves the
        run "running" in memory, which running() then saves as "stopped"."""
        completed = self.results | {"summary": summary, "status": "complete"}
        self._save(completed)
        self.results = completed

    @property
    def state_path(self) -> Path:
        return self.root / "state.pt"

    def save_state(self, state: dict[str, Any]) -> None:
        import torch  # here, not at the top: `dusa report` reads results without torch

        if self.writable:
            write_atomic(self.state_path, lambda stream: torch.save(state, stream))

    def load_state(self) -> dict[str, Any]:
        import torch

        cannot = f"cannot resume the continual run in {self.root}: state.pt"
        if not self.state_path.is_file():
            raise DusaError(f"{cannot} is missing")
        try:  # mmap: every process of a multi-process resume reads the file without its own copy in RAM
            state = torch.load(self.state_path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as error:  # any decoder failure: the file is not what a run saved
            raise DusaError(f"{cannot} is unreadable ({type(error).__name__}: {error})") from error
        if not isinstance(state, dict) or not {"adapter", "rng", "records"} <= state.keys():
            raise DusaError(f"{cannot} is not a saved run state (a dict of adapter, rng and records)")
        return state

    def _save(self, results: dict[str, Any] | None = None) -> None:
        if self.writable:
            write_json_atomic(self.root / RESULTS_FILE, self.results if results is None else results)


# What a resumed run may change: where it is written and how it is run, not what it computes.
RESUMABLE_CHANGES = {"run.output", "data.num_workers", "run.track", "run.profile"}
# The files a run writes atomically (dusa_cli/writing.py): a killed write leaves `.NAME.xxxx` behind.
ATOMIC_FILES = ("config.yaml", "environment.json", RESULTS_FILE, "state.pt")


def _unfinished_writes(root: Path) -> list[Path]:
    """Temporary files of writes that a SIGKILL (or power loss) stopped: never part of the run."""
    if not root.is_dir():
        return []
    return [leftover for name in ATOMIC_FILES for leftover in root.glob(f".{name}.*")]


def read_results(file: Path) -> dict[str, Any]:
    """A results.json as a run writes it; a one-line DusaError for anything else."""
    try:
        results = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DusaError(f"unreadable results file {file}: {error}") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT or not isinstance(results.get("tasks"), list):
        raise DusaError(f"{file}: not a dusa results file ({RESULTS_FORMAT})")
    for field in ("planned_tasks", "tasks"):
        records = results.get(field)
        problem = next(filter(None, map(_record_problem, records)), None) if isinstance(records, list) else "not a list"
        if problem:
            raise DusaError(f"{file}: damaged {field} ({problem})")
    return results


# A task record's scores: numbers (or null) where it has them; report and summaries compute with them.
SCORES = ("top1", "top5", "top20", "error", "miou", "pixel_accuracy", "mean_loss")


def _record_problem(record: Any) -> str | None:
    """What makes a task record unusable by `report` and `--resume`, or None."""
    if not isinstance(record, dict):
        return f"a record is a {type(record).__name__}, not a mapping"
    if not isinstance(record.get("corruption"), str) or type(record.get("severity")) is not int:
        return f"a record without its corruption and severity: {json.dumps(record)[:80]}"
    wrong = [key for key in SCORES if key in record and record[key] is not None and type(record[key]) not in (int, float)]
    return f"{record['corruption']}/{record['severity']}: {wrong[0]} is {json.dumps(record[wrong[0]])}" if wrong else None


def _held_run(root: Path, config_text: str) -> str:
    """Why a new run may not start in `root`, which holds a run: the same config's, stopped or
    complete (said as such: the same command run again), or another's."""
    try:
        changed = _config_changes(root, config_text)
    except DusaError:  # no config.yaml, or an unreadable one: not known to be this run
        return f"{root} holds another run; choose another --output"
    if changed:  # `--resume` alone continues that run with its own config.yaml
        return f"{root} holds a run whose config differs in {_listed_changes(changed)}; choose another --output (or continue that run: --resume -o {root}, without -c)"
    if _all_finished(root):
        return f"{root} holds a complete run of this config: nothing is left to run (choose another --output to run it again)"
    return f"{root} holds a stopped run of this config; pass --resume to continue it"


def _all_finished(root: Path) -> bool:
    """Whether the run in `root` has a record for each of its planned tasks."""
    try:
        results = read_results(root / RESULTS_FILE)
    except DusaError:  # missing (stopped before its first results) or damaged
        return False
    finished = {task_id(t["corruption"], t["severity"]) for t in results["tasks"]}
    return {task_id(t["corruption"], t["severity"]) for t in results["planned_tasks"]} <= finished


def _check_same_config(root: Path, config_text: str) -> None:
    """A resumed run must compute what the first session computed; the error names what differs."""
    if not (root / "config.yaml").is_file():
        raise DusaError(f"cannot resume {root}: its config.yaml is missing")
    try:
        changed = _config_changes(root, config_text)
    except DusaError as error:
        raise DusaError(f"cannot resume: {error}; move the folder away to run every task afresh") from None
    if changed:
        raise DusaError(f"cannot resume {root}: this run's config differs from its config.yaml in {_listed_changes(changed)}")


def _listed_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    """`optim.lr (0.001 → 0.01) and 2 more`: the first three differing keys, the weightiest first."""
    keys = sorted(changed, key=_weight)
    return listed([f"{key} ({changed[key][0]!r} → {changed[key][1]!r})" for key in keys], limit=3)


def _config_changes(root: Path, config_text: str) -> dict[str, tuple[Any, Any]]:
    """The keys (other than RESUMABLE_CHANGES) in which `config_text` differs from the run's
    config.yaml, with their values there and in `config_text`; empty: the same run."""
    saved = read_run_config(root / "config.yaml")
    current = flatten(yaml.safe_load(config_text))
    keys = (saved.keys() | current.keys()) - RESUMABLE_CHANGES
    return {key: (saved.get(key), current.get(key)) for key in keys if saved.get(key) != current.get(key)}


def _weight(key: str) -> tuple[bool, bool, str]:
    """The order in which differing keys are named: the task, then what runs (method.name,
    model.name, optim.name), then the rest by name. Those come first where a long list is cut."""
    return key != "task", not key.endswith(".name"), key


def read_run_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml, flattened (`optim.lr`: value); a one-line DusaError if it cannot be read."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise DusaError(f"{path} is unreadable ({getattr(error, 'problem', None) or type(error).__name__})") from None
    if not isinstance(config, dict):
        raise DusaError(f"{path} is unreadable (not a mapping of sections)")
    return flatten(config)


def _recorded_environment(root: Path) -> dict[str, Any]:
    """environment.json as the earlier sessions left it (empty if it is missing or unreadable)."""
    try:
        recorded = json.loads((root / "environment.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


DATA_MANIFEST = "data.root/manifest.json"  # results/environment.input_files' key for the data


def _check_same_inputs(root: Path, recorded: dict[str, Any], environment: dict[str, Any]) -> None:
    """The files a resumed run reads must be those its first session read (the config names the
    same paths, _check_same_config, but their content may have changed): other weights would put
    two models' scores in one results.json. Rebuilt data is said, not refused: prepare-data adds
    corruptions to a folder and rewrites its manifest, leaving the finished tasks' images."""
    before, now = recorded.get("inputs"), environment.get("inputs", {})
    if not isinstance(before, dict):  # missing, damaged, or written before inputs were recorded
        warnings.warn(
            f"--resume: {root / 'environment.json'} records no inputs (missing or unreadable): the weights and "
            "data are not checked against those of the first session", stacklevel=3,
        )
        return
    changed = sorted(key for key in before.keys() & now.keys() if before[key] != now[key])
    for key in changed:
        what = f"{key} ({now[key]['path']})"
        if key == DATA_MANIFEST:
            warnings.warn(f"--resume: {what} changed since the run began (data rebuilt or extended); its finished tasks read the earlier files", stacklevel=3)
        else:
            raise DusaError(
                f"cannot resume {root}: {what} is not what its first session read ({_difference(before[key], now[key])}); "
                "restore it, or run afresh in another --output"
            )


def _difference(before: dict[str, Any], now: dict[str, Any]) -> str:
    """The first difference between two input records: a file's hash, a file in a folder, or a
    large folder's listing."""
    if "listing_sha256" in before or "listing_sha256" in now:
        return "its file names or sizes differ"
    if "files" not in before or "files" not in now:
        return "its sha256 differs"
    old, new = before["files"], now["files"]
    name = next(name for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name))
    state = "is new" if name not in old else "is gone" if name not in new else "differs"
    return f"its file {name} {state}"


def _say_other_process_count(recorded: dict[str, Any], environment: dict[str, Any]) -> None:
    sessions = [recorded, *recorded.get("resumed", [])]
    earlier, now = sessions[-1].get("world_size"), environment.get("world_size")
    if earlier is not None and now is not None and earlier != now:
        warnings.warn(
            f"--resume with {now} process(es) after {earlier}: BatchNorm layers on test-batch statistics "
            "normalise each process's share of a batch, so such a model's next tasks are not computed "
            "as its earlier ones (README, multi-GPU)",
            stacklevel=3,
        )


def _record_resume(root: Path, recorded: dict[str, Any], environment: dict[str, Any]) -> None:
    """environment.json keeps the first session's record and appends each resume's (code,
    machine and process count may change between sessions)."""
    recorded.setdefault("resumed", []).append(environment)
    write_json_atomic(root / "environment.json", recorded)
