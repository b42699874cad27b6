"""Stage runner for ``redi-demo``: tool checks, resumable state, subprocesses with logs and progress.

A stage is done when it ran to the end *and* its outputs pass its check; ``demo_state.json`` in the output
directory records which stages are done and with which settings. A rerun skips done stages whose outputs
are still intact, reruns the others, and reruns everything downstream of a stage that had to run again.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from redi_megatron.errors import UserError
from redi_megatron.outputs import write_atomic

STATE_FILE = "demo_state.json"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StageError(RuntimeError):
    """A stage failed; the message says which, why, and where its log is."""


@dataclass(frozen=True)
class Tool:
    """An upstream command a stage runs: its console script, its module and who provides it."""

    script: str
    module: str
    provides: str

    def missing_reason(self) -> Optional[str]:
        """None when ``python -m <module>`` can run ``main()``; else why not (without importing it)."""
        try:
            spec = importlib.util.find_spec(self.module)
        except ModuleNotFoundError:
            spec = None
        if spec is None or spec.origin is None:
            return f"module {self.module} is not installed"
        with open(spec.origin, encoding="utf-8") as f:
            source = f.read()
        if "def main(" not in source:
            return f"{spec.origin} has no main()"
        if "__main__" not in source:
            return f"{spec.origin} cannot run as `python -m {self.module}` (no __main__ guard)"
        return None


@dataclass
class Stage:
    """One step of the pipeline.

    ``run(ctx)`` does the work (built-in code or ``ctx.command``); ``check(ctx)`` returns the problems
    found in its outputs (empty = good). ``after`` names the stages whose outputs it reads.
    """

    name: str
    title: str
    run: Callable[["Context"], None]
    check: Callable[["Context"], list[str]]
    tools: Sequence[Tool] = ()
    after: Sequence[str] = ()


@dataclass
class Context:
    """What stages share: the output directory, the settings and the command runner."""

    out: str
    cfg: Any
    echo: bool = False  # True: tools' output on the console too (redi-demo --verbose)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Optional[str] = None  # the running stage's log

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def python_env(self, threads: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false", TORCHDYNAMO_DISABLE="1",
                   REDI_DATA_CACHE=self.path("cache", "tokenized"))
        return env

    def command(self, args: Sequence[str], threads: int = 1) -> None:
        """Run ``args`` (a command line) with output to the stage log and, if ``echo``, the console."""
        assert self.log_path is not None, "command() outside a stage"
        env = self.python_env(threads)
        line = shlex.join(args)
        with open(self.path("commands.sh"), "a", encoding="utf-8") as f:
            f.write(f"OMP_NUM_THREADS={threads} {line}\n")
        if self.echo:
            print(f"  $ {line}", flush=True)
        _run_logged(list(args), env, self.log_path, self.echo)


def _run_logged(args: list[str], env: dict[str, str], log_path: str, echo: bool) -> None:
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(args)}\n".encode())
        log.flush()
        # A new session: on Ctrl-C or failure the whole tree we started (torchrun's ranks too) is ended.
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        beat = _Heartbeat(live=sys.stdout.isatty())
        try:
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                log.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                else:
                    beat.feed(chunk)
            rc = proc.wait()
        except BaseException:
            _end_group(proc)
            raise
        finally:
            beat.close()
    if rc != 0:
        raise StageError(f"`{shlex.join(args)}` exited with status {rc}; last lines of {log_path}:\n"
                         + tail(log_path))


class _Heartbeat:
    """The default (quiet) console: the tool's latest output line (its progress bar, its step), as one live
    line redrawn in place on a terminal, or as a line every ``every`` seconds when the output is a file or a
    pipe (a CI log). Everything the tool printed is in the stage log."""

    def __init__(self, every: float = 30.0, live: bool = False) -> None:
        self.every = 0.5 if live else every
        self.live, self.last_print, self.line, self.drawn = live, time.monotonic(), "", False

    def feed(self, chunk: bytes) -> None:
        # tqdm redraws with carriage returns: the newest state is after the last one
        text = _ANSI.sub("", chunk.decode("utf-8", "replace"))  # tqdm's cursor moves
        parts = [p.strip() for p in text.replace("\r", "\n").split("\n")]
        self.line = next((p for p in reversed(parts) if p), self.line)
        now = time.monotonic()
        if self.line and now - self.last_print >= self.every:
            if self.live:
                print(f"\r      .. {self.line[:110]}\x1b[K", end="", flush=True)
                self.drawn = True
            else:
                print(f"      .. {self.line[:110]}", flush=True)
            self.last_print = now

    def close(self) -> None:
        """End the live line (the next message starts on a fresh line)."""
        if self.drawn:
            print("\r\x1b[K", end="", flush=True)
            self.drawn = False


def _end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tail(path: str, lines: int = 25) -> str:
    with open(path, "rb") as f:
        text = f.read()[-20000:].decode("utf-8", "replace")
    # tqdm redraws with carriage returns; keep the last state of each line
    return "\n".join(x.split("\r")[-1] for x in text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------------
def load_state(out: str) -> dict[str, Any]:
    path = os.path.join(out, STATE_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc}); delete it to start over") from None


def save_state(out: str, state: dict[str, Any]) -> None:
    write_atomic(os.path.join(out, STATE_FILE), json.dumps(state, indent=2))


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += config_differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def downstream(stages: Sequence[Stage], names: Sequence[str]) -> list[str]:
    """``names`` and every stage that (transitively) reads their outputs, in pipeline order."""
    hit = set(names)
    for s in stages:
        if any(dep in hit for dep in s.after):
            hit.add(s.name)
    return [s.name for s in stages if s.name in hit]


def missing_tools(stages: Sequence[Stage]) -> dict[str, list[str]]:
    """``{"<script> (<module>): <why>, provided by <who>": [stage names that need it]}``."""
    out: dict[str, list[str]] = {}
    for s in stages:
        for t in s.tools:
            why = t.missing_reason()
            if why:
                out.setdefault(f"{t.script} ({why}; {t.provides})", []).append(s.name)
    return out


@dataclass
class Outcome:
    name: str
    status: str  # "ran" | "skipped"
    seconds: float


def run_stages(stages: Sequence[Stage], ctx: Context, config: dict[str, Any], redo: Sequence[str] = (),
               progress: Callable[[str], None] = print) -> list[Outcome]:
    """Run the stages in order, skipping the ones already done with intact outputs."""
    config = json.loads(json.dumps(config))  # tuples -> lists, as it reads back from the state file
    state = load_state(ctx.out)
    if state and state.get("config") != config:
        diff = "; ".join(config_differences(state.get("config"), config)[:8])
        raise UserError(f"{ctx.out} holds a demo run with other settings ({diff}); use another --out or "
                         "pass --restart to start this directory over")
    done: dict[str, Any] = state.get("stages", {})
    for name in downstream(stages, redo):
        done.pop(name, None)
    state = {"config": config, "stages": done}
    save_state(ctx.out, state)
    os.makedirs(ctx.path("logs"), exist_ok=True)
    invalid: set = set()
    outcomes = []
    for k, stage in enumerate(stages, 1):
        head = f"[{k}/{len(stages)}] {stage.name}: {stage.title}"
        stale = stage.name in invalid or stage.name not in done
        problems = [] if stale else stage.check(ctx)
        if not stale and not problems:
            progress(f"{head} ... done earlier, skipped")
            outcomes.append(Outcome(stage.name, "skipped", done[stage.name].get("seconds", 0.0)))
            continue
        if problems:
            progress(f"{head}: outputs from an earlier run fail their check ({problems[0]}); running it again")
        progress(head)
        ctx.log_path = ctx.path("logs", f"{stage.name}.log")
        start = time.perf_counter()
        stage.run(ctx)
        problems = stage.check(ctx)
        if problems:
            raise StageError(f"stage {stage.name} finished but its outputs are not right:\n  - "
                             + "\n  - ".join(problems) + f"\n(log: {ctx.log_path})")
        seconds = time.perf_counter() - start
        done[stage.name] = {"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        invalid.discard(stage.name)
        for n in downstream(stages, [stage.name]):
            if n != stage.name:  # what read the old outputs must run again
                invalid.add(n)
                done.pop(n, None)
        save_state(ctx.out, state)
        progress(f"    {stage.name} done in {seconds:.0f} s")
        outcomes.append(Outcome(stage.name, "ran", seconds))
    return outcomes
