"""Streaming, sharded, atomic checkpoint writing.

Everything goes into a hidden temporary folder beside the target and is renamed into place only
when complete, so an interrupted or failed run (exception, SIGINT, even SIGKILL) leaves the target
absent or untouched. Tensors are written as they arrive: each shard's data goes to a scratch file
and is joined to its header when the shard closes, so memory holds one tensor at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import time
import uuid

from lctool.errors import LctoolError
from lctool.io import manifest as manifest_mod
from lctool.io.reader import INDEX_FILE, MANIFEST_FILE, SINGLE_FILE, Checkpoint
from lctool.io.safetensors_format import encode_header, safetensors_dtype

TMP_MARK = ".lctool-tmp-"
DEFAULT_MAX_SHARD = 5 * 1000**3  # transformers' default "5GB"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        value = text
    else:
        units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
        clean = text.strip().upper()
        value = None
        for unit, scale in units.items():
            if clean.endswith(unit):
                with contextlib.suppress(ValueError):
                    value = int(float(clean[: -len(unit)]) * scale)
                break
        else:
            with contextlib.suppress(ValueError):
                value = int(clean)
        if value is None:
            raise LctoolError(f"cannot read size {text!r} (e.g. 5GB, 500MB)")
    if value <= 0:
        raise LctoolError(f"size must be positive, got {text!r}")
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(target: str) -> None:
    """Remove temp folders left beside `target` by runs that died (their pid no longer exists)."""
    parent, name = os.path.split(os.path.abspath(target))
    prefix = f".{name}{TMP_MARK}"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(parent):
            if not entry.startswith(prefix):
                continue
            pid_text = entry[len(prefix) :].split("-", 1)[0]
            if pid_text.isdigit() and not _pid_alive(int(pid_text)):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _uint8():
    import torch

    return torch.uint8


# Shards smaller than this are assembled in memory and written once; larger ones stream to disk.
STREAM_AFTER_BYTES = 16 * 1024 * 1024
# Room reserved for a streamed shard's header: twice what the tensors seen so far predict for a full
# shard, within these bounds. A header that outgrows it costs one extra copy of the shard, never an error.
MIN_HEADER_RESERVE, MAX_HEADER_RESERVE = 4096, 8 * 1024 * 1024


def _fsync_wanted() -> bool:
    # Renaming only complete folders already protects against killed processes; fsync adds safety
    # against power loss at a large cost in write throughput, so it is opt-in.
    return os.environ.get("LCTOOL_FSYNC", "") not in ("", "0")


class _Shard:
    """One shard in progress.

    Its data is held in memory until it passes STREAM_AFTER_BYTES; then it goes straight into the
    final file after a reserved, space-padded header region (the safetensors format allows trailing
    whitespace in the header), so a large shard is written exactly once.
    """

    def __init__(self, folder: str, number: int, max_bytes: int):
        self.path = os.path.join(folder, f".shard-{number:05d}.safetensors")
        self.max_bytes = max_bytes
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self.size = 0
        self.pending: list[memoryview] = []
        self.file = None
        self.reserved = 0

    def add(self, name: str, tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = safetensors_dtype(tensor.dtype)
        if dtype is None:
            raise LctoolError(f"cannot store tensor {name} of dtype {tensor.dtype} in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        raw = memoryview(tensor.reshape(-1).view(_uint8()).numpy()) if nbytes else memoryview(b"")
        self.entries.append((name, dtype, tuple(tensor.shape), self.size, self.size + nbytes))
        self.size += nbytes
        if self.file is not None:
            self.file.write(raw)
            return
        self.pending.append(raw)
        if self.size >= STREAM_AFTER_BYTES:
            self._start_streaming()

    def _start_streaming(self) -> None:
        header_so_far = len(encode_header(self.entries, {"format": "pt"}))
        predicted = header_so_far * max(1.0, self.max_bytes / max(self.size, 1))
        reserve = int(min(MAX_HEADER_RESERVE, max(MIN_HEADER_RESERVE, 2 * predicted)))
        self.reserved = reserve + (-reserve % 8)
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed in finish()
        self.file.seek(self.reserved)
        for raw in self.pending:
            self.file.write(raw)
        self.pending = []

    def finish(self, metadata: dict) -> None:
        header = encode_header(self.entries, metadata)
        if self.file is None:
            with open(self.path, "wb") as out:
                out.write(header)
                for raw in self.pending:
                    out.write(raw)
                if _fsync_wanted():
                    os.fsync(out.fileno())
            self.pending = []
            return
        if len(header) <= self.reserved:
            self.file.seek(0)
            self.file.write(encode_header(self.entries, metadata, total_length=self.reserved))
            if _fsync_wanted():
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            return
        self.file.close()
        self._rewrite_with_header(header)

    def _rewrite_with_header(self, header: bytes) -> None:
        """The header outgrew its reserve: write header + data into a new file (one copy)."""
        moved = self.path + ".grown"
        with open(self.path, "rb") as data, open(moved, "wb") as out:
            out.write(header)
            data.seek(self.reserved)
            shutil.copyfileobj(data, out, 16 * 1024 * 1024)
            if _fsync_wanted():
                os.fsync(out.fileno())
        os.replace(moved, self.path)


class CheckpointWriter:
    """Write a checkpoint to `target` atomically.

    with CheckpointWriter(out, operation="extend", parameters=opts, inputs=[ckpt], force=False) as w:
        w.write_config(config)
        for name, tensor in ...: w.add_tensor(name, tensor)
        w.carry_files(ckpt)
    """

    def __init__(
        self,
        target: str,
        *,
        operation: str,
        parameters: dict | None = None,
        inputs: list[Checkpoint] | None = None,
        seed: int | None = None,
        force: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD,
        require_config: bool = True,
    ):
        self.target = os.path.abspath(target)
        self.operation = operation
        self.parameters = dict(parameters or {})
        self.inputs = list(inputs or [])
        self.seed = seed
        self.force = force
        self.max_shard_size = parse_size(max_shard_size)
        self.require_config = require_config
        self.results: dict = {}
        self.tmp: str | None = None
        self._shards: list[_Shard] = []
        self._names: set[str] = set()
        self._started = time.time()
        self._lock_fd: int | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        self._refuse_bad_target()
        self._lock()
        try:
            # Again under the lock: a writer that finished between the first check and the lock has
            # made the target since, and without --force this run must not replace it.
            self._refuse_bad_target()
            clean_stale_temps(self.target)
            parent, name = os.path.split(self.target)
            self.tmp = os.path.join(parent, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.makedirs(self.tmp)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self.tmp and os.path.exists(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._unlock()

    def _refuse_bad_target(self) -> None:
        parent = os.path.dirname(self.target)
        if not os.path.isdir(parent):
            raise LctoolError(f"output folder's parent {parent} does not exist")
        for checkpoint in self.inputs:
            source = os.path.realpath(checkpoint.path)
            if os.path.realpath(self.target) == source or source.startswith(os.path.realpath(self.target) + os.sep):
                raise LctoolError(f"output {self.target} would overwrite the input {checkpoint.path}")
        if os.path.lexists(self.target) and not self.force:
            raise LctoolError(f"{self.target} already exists (pass --force to replace it)")
        if os.path.lexists(self.target) and not os.path.isdir(self.target):
            raise LctoolError(f"{self.target} exists and is not a folder")

    def _lock(self) -> None:
        parent, name = os.path.split(self.target)
        fd = os.open(os.path.join(parent, f".{name}.lctool-lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LctoolError(f"another lctool process is writing {self.target}") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- content -----------------------------------------------------------------------------------
    def path(self, relative: str) -> str:
        """Where to put an extra file inside the output (e.g. a modeling file)."""
        assert self.tmp, "writer used outside its with-block"
        full = os.path.join(self.tmp, relative)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def add_tensor(self, name: str, tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        shard = self._shards[-1] if self._shards else None
        if shard is None or (shard.size and shard.size + nbytes > self.max_shard_size):
            shard = _Shard(self.tmp, len(self._shards) + 1, self.max_shard_size)
            self._shards.append(shard)
        shard.add(name, tensor)

    def write_json(self, relative: str, obj: object) -> None:
        with open(self.path(relative), "w", encoding="utf-8") as f:
            f.write(manifest_mod.dumps(obj))

    def write_config(self, config: dict) -> None:
        """config.json exactly as transformers formats it (indent 2, sorted keys)."""
        with open(self.path("config.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def copy_file(self, source: str, relative: str | None = None, link: bool = False) -> None:
        """Copy (or hard-link, where allowed) a file into the output."""
        destination = self.path(relative or os.path.basename(source))
        if link:
            with contextlib.suppress(OSError):
                os.link(source, destination)
                return
        shutil.copyfile(source, destination)

    def carry_files(self, checkpoint: Checkpoint, skip: tuple[str, ...] = ()) -> None:
        """Carry the tokenizer and generation config over from an input."""
        for file in checkpoint.carried_files():
            if file not in skip and not os.path.exists(os.path.join(self.tmp, file)):
                self.copy_file(os.path.join(checkpoint.path, file), file)

    def link_weights(self, checkpoint: Checkpoint) -> None:
        """Reuse an input's weight files unchanged: hard links where possible, else copies."""
        for file in checkpoint.shard_files:
            self.copy_file(checkpoint.shard_path(file), file, link=True)
        index = os.path.join(checkpoint.path, INDEX_FILE)
        if os.path.exists(index):
            self.copy_file(index, INDEX_FILE)
        self._names.update(checkpoint.tensor_names())

    # ---- commit ------------------------------------------------------------------------------------
    def _finish_shards(self) -> None:
        metadata = {"format": "pt"}
        total = len(self._shards)
        weight_map: dict[str, str] = {}
        total_size = 0
        for number, shard in enumerate(self._shards, start=1):
            shard.finish(metadata)
            final = SINGLE_FILE if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"
            os.replace(shard.path, os.path.join(self.tmp, final))
            weight_map.update({entry[0]: final for entry in shard.entries})
            total_size += shard.size
        if total > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            self.write_json(INDEX_FILE, index)

    def _commit(self) -> None:
        if self.require_config and not os.path.exists(os.path.join(self.tmp, "config.json")):
            raise RuntimeError("checkpoint written without config.json")
        self._finish_shards()
        manifest = manifest_mod.build_manifest(
            self.operation,
            self.parameters,
            [manifest_mod.describe_input(c) for c in self.inputs],
            self._started,
            seed=self.seed,
            results=self.results,
        )
        self.write_json(MANIFEST_FILE, manifest)
        if _fsync_wanted():
            _fsync_dir(self.tmp)
        self._move_into_place()

    def _move_into_place(self) -> None:
        if not os.path.lexists(self.target):
            os.rename(self.tmp, self.target)
        elif _exchange(self.tmp, self.target):
            # tmp now holds the old target; __exit__ removes it.
            pass
        else:
            aside = self.tmp + "-old"
            os.rename(self.target, aside)
            os.rename(self.tmp, self.target)
            os.rename(aside, self.tmp)
        if _fsync_wanted():
            _fsync_dir(os.path.dirname(self.target))


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
