"""`loop eval` and `loop run` on N processes (``torchrun`` / ``accelerate launch``).

``loop eval``: every process loads the model and the questions, answers its shard, and rank 0
records and prints the gathered evaluation (``core.distributed``).

``loop run``: rank 0 drives the loop exactly as a single process would: it alone holds the
database, trains, decides and writes reports and adapters. The other processes only serve its
evaluations: before each one rank 0 sends what to evaluate (benchmark, prompt and decoding
settings, adapter folder, question ids), then every process answers its shard and rank 0 gets
the gathered result. Questions that are not benchmark records (a strategy's own, such as
context distillation's training questions) travel whole: their fields and their image (a path
or the decoded picture), so every process answers the same questions. While rank 0 trains, the others wait (on the CPU). Adapter folders must
be readable by every process (one box, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from core import distributed

log = logging.getLogger(__name__)

RUN_WAIT_S = 7 * 24 * 3600
"""How long a serving process waits for rank 0's next evaluation (rank 0 may train for hours;
a dead rank 0 is noticed by the launcher, which stops the others)."""
KEEP_ADAPTERS = 2
"""Adapters a serving process keeps loaded (the champion's and the latest candidate's)."""


def run_parallel(args) -> int:
    """Run a command under the launcher: join the process group, run, leave it."""
    w = distributed.setup(RUN_WAIT_S if args.command == "run" else distributed.DEFAULT_TIMEOUT_S)
    try:
        if args.command == "run" and not w.is_main:
            return serve()
        return int(args.func(args) or 0)
    finally:
        if args.command == "run" and w.is_main:
            with contextlib.suppress(Exception):  # the serving processes stop, if still there
                distributed.broadcast(None)
        distributed.teardown()


def announce(bench, benchmark: str, config, adapter_path: str | None,
             examples: list[dict]) -> None:
    """On rank 0 of `loop run`, before each evaluation: tell the serving processes what to
    evaluate, so that they join it (``core.distributed.evaluate``). Nothing in one process."""
    if not distributed.active():
        return
    distributed.broadcast({
        "setup": {"sources": bench.sources, "profile": bench.profile,
                  "batch_size": bench.batch_size, "prefix_cache": bench.prefix_cache},
        "benchmark": benchmark, "config": config.to_dict(), "adapter": adapter_path,
        **questions_message(examples, bench.examples.get(benchmark, []))})


def questions_message(examples: list[dict], records: list[dict]) -> dict:
    """What tells another process which questions to answer: ``{"ids": [...]}`` when they all
    are ``records`` (every process loaded them), else ``{"examples": [...]}`` with each
    question's fields and its image value (a path, bytes or a picture: no loader functions)."""
    known = {id(e) for e in records}
    if all(id(e) in known for e in examples):
        return {"ids": [e["id"] for e in examples]}
    return {"examples": [{**{k: v for k, v in e.items() if not k.startswith("_")},
                          "_image_value": _image_value(e)} for e in examples]}


def received_examples(shipped: list[dict]) -> list[dict]:
    """The examples of a ``questions_message``, each with its image loader again."""
    return [{**{k: v for k, v in e.items() if k != "_image_value"},
             "_image": lambda v=e["_image_value"]: v} for e in shipped]


def _image_value(example: dict):
    loader = example.get("_image")
    try:
        return loader() if loader is not None else None
    except Exception:  # noqa: BLE001 - an unreadable image is a missing one, on every process
        return None


def serve() -> int:
    """On ranks > 0 of `loop run`: answer rank 0's evaluations until it says stop."""
    from core.evaluate import EvalConfig

    server = _Server()
    while (msg := distributed.broadcast()) is not None:
        try:
            vlm, examples = server.prepare(msg)
        except Exception as exc:  # noqa: BLE001 - rank 0 reports it and decides
            log.warning("process %d cannot take part in this evaluation: %s",
                        distributed.world().rank, exc)
            distributed.join_failed(f"{type(exc).__name__}: {exc}")
            continue
        try:
            distributed.evaluate(vlm, examples, EvalConfig(**msg["config"]),
                                 batch_size=msg["setup"]["batch_size"], progress=False,
                                 prefix_cache=msg["setup"]["prefix_cache"])
        except Exception as exc:  # noqa: BLE001 - already sent to rank 0, which decides
            log.warning("process %d: its shard failed: %s", distributed.world().rank, exc)
    return 0


class _Server:
    """A serving process's model, questions and loaded adapters."""

    def __init__(self):
        self.vlm = None
        self.by_id: dict[str, dict[str, dict]] = {}
        self.loaded: list[tuple[str, str]] = []  # (name, stamp), least recently used first

    def prepare(self, msg: dict):
        if self.vlm is None:
            self._load(msg["setup"])
        self._activate(msg["adapter"])
        if "examples" in msg:
            return self.vlm, received_examples(msg["examples"])
        records = self.by_id[msg["benchmark"]]
        missing = [i for i in msg["ids"] if i not in records]
        if missing:
            raise ValueError(f"{len(missing)} of the questions rank 0 sent are not in this "
                             f"process's {msg['benchmark']} data (e.g. {missing[0]!r}): give "
                             "every process the same data")
        return self.vlm, [records[i] for i in msg["ids"]]

    def _load(self, setup: dict) -> None:
        from dataclasses import replace

        from core.data import load_benchmark
        from core.model import load_vlm
        from strategies.base import BENCHMARKS

        sources, profile = setup["sources"], setup["profile"]
        options = profile.load_options()
        options = replace(options, device=distributed.device_for(options.device))
        self.vlm = load_vlm(sources.model, options=options)
        for b in BENCHMARKS:
            self.by_id[b] = {e["id"]: e for e in load_benchmark(b, sources.data)}

    def _activate(self, path: str | None) -> None:
        from loop.modelbench import adapter_name

        if path is None:
            self.vlm.set_adapter(None)
            return
        if not Path(path).is_dir():
            raise FileNotFoundError(f"adapter folder {path} is not visible to this process: "
                                    "run every process on one box or on a shared filesystem")
        name, stamp = adapter_name(path), _stamp(Path(path))
        if (name, stamp) not in self.loaded:
            if name in self.vlm.adapters:  # retrained in place since it was loaded
                self._unload(name)
            while len(self.loaded) >= KEEP_ADAPTERS:
                self._unload(self.loaded[0][0])
            self.vlm.load_adapter(path, name)
        else:
            self.loaded.remove((name, stamp))
        self.loaded.append((name, stamp))
        self.vlm.set_adapter(name)

    def _unload(self, name: str) -> None:
        self.vlm.set_adapter(None)
        self.vlm.delete_adapter(name)
        self.loaded = [x for x in self.loaded if x[0] != name]


def _stamp(folder: Path) -> str:
    """Changes when the adapter's files are rewritten."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return ";".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)
