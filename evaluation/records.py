"""Per-item evaluation records: sharded over Accelerate processes, appended to JSON lines as they finish, resumable.

An evaluator that runs every method on every item (a question, a video, an edit) does three things with this module:

1. ``indices = shard(len(items), accelerator)``: the items this process runs, a contiguous block (as
   ``Accelerator.split_between_processes``), so ``accelerate launch --num_processes N`` splits the work without any
   other change and one process runs them all;
2. ``records.append(key, record)`` after each item: one JSON line, written with a single ``write`` on a file opened
   for appending and flushed to disk, so an interrupt loses at most the item in flight and never leaves a record
   half-written (a torn last line, from a crash mid-write, is ignored when the file is read back);
   ``records.done`` holds the items of an earlier run of the same configuration (``--resume``), which are skipped;
3. ``gather_in_order(mine, accelerator)``: every process's records on the main process, in item order, identical to
   what one process would have produced; the main process alone computes the tables and writes the JSON.

The first line of the file names the run: ``{"run": identity, "fingerprint": sha256(identity)}``, where ``identity``
holds everything the records depend on (model, method configuration, data). Resuming with another identity is a
one-line error naming the first differing key; records are never mixed across configurations.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

FORMAT = "evaluation-records-v1"


class RecordsError(ValueError):
    """The records file cannot be used as asked (another configuration, unreadable header)."""


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``identity`` (sorted keys; non-JSON values by ``str``)."""
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key: old -> new`` for the first (sorted) key whose value differs, for a one-line error."""
    for key in sorted(set(old) | set(new)):
        if json.dumps(old.get(key), sort_keys=True, default=str) != json.dumps(new.get(key), sort_keys=True, default=str):
            return f"{key}: {_short(old.get(key))} -> {_short(new.get(key))}"
    return "(no key differs)"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SAMPLE = 1 << 20  # bytes read at the start, middle and end of a weight file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def model_identity(model_path: str | Path | None) -> dict[str, Any]:
    """What identifies a model in a run's identity. A local directory: ``{"model_fingerprint"}``, a sha256 over its
    files walked recursively (a diffusers pipeline keeps its parts in subfolders): every ``.json`` whole, every weight
    file by name, size and three 1 MiB samples (a 7B checkpoint is fingerprinted without reading it whole). Its path
    is left out, so a copy elsewhere (another machine) resumes the same records. A hub id, or None (an embedded
    default): ``{"model": ...}`` as given."""
    path = Path(model_path) if model_path is not None else None
    if path is None or not path.is_dir():
        return {"model": None if model_path is None else str(model_path)}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        if file.suffix == ".json":
            digest.update(f"{relative}\n".encode() + file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{relative}:{file.stat().st_size}\n".encode())
            digest_weight_samples(digest, file)
    return {"model_fingerprint": digest.hexdigest()}


def digest_weight_samples(digest, file: Path) -> None:
    """Feed ``digest`` three 1 MiB samples of ``file`` (start, middle, end; the whole file when smaller): enough to
    tell a retrained or different checkpoint from a copy, without reading a 7B checkpoint whole."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
            fh.seek(offset)
            digest.update(fh.read(_SAMPLE))


def read_records(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict]]:
    """``(header, {key: record})`` of a records file; a torn (unparsable) last line is skipped, any other one is an
    error. A missing or empty file gives ``(None, {})``."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None, {}
    lines = path.read_bytes().split(b"\n")
    header, records = None, {}
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # the last line, cut by an interrupt: that item runs again
                break
            raise RecordsError(f"{path}: line {number + 1} is not JSON; the file is not an evaluation records file "
                               "(move it away or pass another path)") from None
        if header is None:
            if entry.get("format") != FORMAT or "fingerprint" not in entry:
                raise RecordsError(f"{path} is not an evaluation records file (no {FORMAT} header); move it away or "
                                   "pass another path")
            header = entry
            continue
        records[str(entry["key"])] = entry["record"]
    return header, records


def check_resume(path: Path, identity: dict[str, Any]) -> None:
    """Raise :class:`RecordsError` (one line) if ``path`` holds records of another identity; writes nothing. For an
    evaluator that checks ``--resume`` before loading its model."""
    header, _ = read_records(Path(path))
    if header is not None and header["fingerprint"] != fingerprint(identity):
        raise RecordsError(f"--resume: {path} holds records of another configuration "
                           f"({first_difference(header.get('run', {}), identity)}); pass the same settings, or drop "
                           "--resume to start afresh")


class RunRecords:
    """The JSON-lines records of one evaluation run (see the module docstring).

    Args:
        path: the ``.jsonl`` file.
        identity: what the records depend on (model, methods and their configuration, data, seed, ...).
        resume: keep the records of an earlier run with the same identity (``done``) and append; without it the
            file starts afresh.
        main_process: only the main process creates or truncates the file and writes its header; the others must
            construct this after it (``accelerator.wait_for_everyone()``) and only append.
    """

    def __init__(self, path: Path, identity: dict[str, Any], *, resume: bool, main_process: bool = True) -> None:
        self.path = Path(path)
        self.identity = identity
        self.fingerprint = fingerprint(identity)
        self.done: dict[str, dict] = {}
        header, records = read_records(self.path) if resume else (None, {})
        if header is not None:
            check_resume(self.path, identity)
            self.done = records
            if main_process:  # a torn last line (an interrupt mid-write) goes, so the next record starts a line
                data = self.path.read_bytes()
                if not data.endswith(b"\n"):
                    with open(self.path, "r+b") as f:
                        f.truncate(data.rfind(b"\n") + 1)
        elif main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                self._write_line(f, {"format": FORMAT, "fingerprint": self.fingerprint, "run": identity})

    @staticmethod
    def _write_line(f, entry: dict[str, Any]) -> None:
        f.write((json.dumps(entry, default=str) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())

    def append(self, key: str | int, record: dict[str, Any]) -> None:
        """Record item ``key`` (one line, one ``write`` in append mode, flushed and synced)."""
        line = (json.dumps({"key": str(key), "record": record}, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.done[str(key)] = record


def add_records_arguments(parser, *, each: str, default: str, same: str) -> None:
    """``--records PATH`` and ``--resume``, as every evaluator takes them.

    each: what is written when ("one JSON line per question as it finishes"); default: where the records go when ``--records``
    is not given (the script fills it in after parsing); same: what a resumed run must share with the recorded one.
    """
    parser.add_argument("--records", type=Path, default=None,
                        help=f"per-item records: {each} (default: {default})")
    parser.add_argument("--resume", action="store_true", help=f"skip what --records already holds for the same {same}")


def open_run_records(path: Path, identity: dict[str, Any], state, *, resume: bool) -> RunRecords:
    """The run's records on every process of ``state`` (``PartialState``): the main process starts the file (or, with
    ``resume``, checks and keeps it) before the others open it to append. Raises :class:`RecordsError`."""
    records = RunRecords(path, identity, resume=resume) if state.is_main_process else None
    state.wait_for_everyone()
    return records if records is not None else RunRecords(path, identity, resume=True, main_process=False)


def shard(num_items: int, process_index: int = 0, num_processes: int = 1) -> range:
    """The items of process ``process_index`` of ``num_processes``: a contiguous block, the first ``num_items %
    num_processes`` processes one item more (the split of ``Accelerator.split_between_processes``)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process {process_index} of {num_processes}")
    base, extra = divmod(num_items, num_processes)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


def process_state(device: str | None = None):
    """Accelerate's ``PartialState``: this process's rank among those ``accelerate launch`` / ``torchrun`` started
    (one process otherwise). On the CPU (``device`` "cpu", or None without CUDA) the processes talk over gloo:
    accelerate enables that only when told the run is on the CPU, which ``accelerate launch --cpu`` does for a
    single process only, so a multi-process CPU run is ``accelerate launch --multi_gpu --num_processes N`` (its
    torchrun path) or ``torchrun --nproc_per_node N`` on a machine without GPUs, or with ``--device cpu``."""
    import torch
    from accelerate import PartialState

    on_cpu = device.startswith("cpu") if device else not torch.cuda.is_available()
    return PartialState(cpu=on_cpu)


def gather_in_order(mine: Iterable[tuple[int, dict]], accelerator=None, *, to_all: bool = False) -> list[dict] | None:
    """Every process's ``(item index, record)`` pairs as one list in item order, on the main process (None on the
    others), or on every process with ``to_all`` (a later phase that depends on all items). Without an accelerator
    (or with one process): the records of this process, in order."""
    pairs = list(mine)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)  # every process receives every process's pairs
        if not (to_all or accelerator.is_main_process):
            return None
    return [record for _, record in sorted(pairs, key=lambda pair: pair[0])]


__all__ = ["FORMAT", "RecordsError", "RunRecords", "check_resume", "digest_weight_samples", "fingerprint",
           "gather_in_order", "model_identity", "open_run_records", "process_state", "read_records", "shard"]
