"""What the terminal shows, and where everything else goes.

`finetune run` shows what a person needs on one screen (`TerminalReport`): what is trained on what, one live
progress bar, one line per evaluation, and a short summary whose last lines say where the model and the
MLflow run are. Everything else (the libraries' logging, Python warnings, and the prints and progress bars
that bypass logging) goes to the run's log file while `capture` is active, and to the terminal as well with
--verbose. Our own warnings always reach the terminal, however they were issued: `warn` here, `logging` records
of `finetune.*` at WARNING and above, Python warnings raised from finetune's own code, and any line printed with
the `warning: ` prefix (how the training library tells what it did to a folder: a damaged checkpoint removed, an
interrupted save recovered, checkpoints set aside) even though the stream it was printed to goes to the log.
Only the main process of a multi-process run writes to the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, TextIO

from finetune.config.recipe import Recipe, flatten, recipe_to_yaml
from finetune.errors import FinetuneError
from finetune.models.pretrained import PACKAGED_CHECKPOINTS
from finetune.training.report import Progress, RunEnd, RunReport, RunStart

LOG_FILE = "run.log"
WARNING_PREFIX = "warning: "
"""What finetune prints before a line a person must see; such a line reaches the terminal from captured output too."""
PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The libraries a run uses, whose own handlers write straight to stderr: for the run their records go to the
# root logger (the log file) instead. transformers and datasets have switches for it, used in `_route_logging`.
LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "accelerate", "torch", "mlflow", "alembic",
                   "sqlalchemy", "huey", "urllib3", "filelock", "fsspec", "py.warnings")
# The levels MLflow gives these when it configures logging itself: below WARNING they log database migrations.
QUIET_LOGGERS = {"alembic": logging.WARNING, "sqlalchemy.engine": logging.WARNING, "huey": logging.WARNING}


def quiet_model_loading() -> None:
    """For commands that load a model and then print their own lines (predict, evaluate, serve): no loading bars.

    transformers draws "Loading weights" and MLflow "Downloading artifacts" as progress bars on stderr for a model
    that loads in well under a second; they bury the command's answer or the server's first lines.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _Terminal:
    """Where a person's lines go while output is captured. `out`/`err` are None in a process that must not print."""

    def __init__(self, out: TextIO | None, err: TextIO | None, log: TextIO):
        self.out, self.err, self.log = out, err, log
        self.bar: Any = None  # the live tqdm bar, cleared while a line is written above it
        self.lock = threading.RLock()

    def write(self, stream: TextIO | None, text: str) -> None:
        if stream is None:
            return
        with self.lock:
            if self.bar is not None:
                self.bar.clear()
            stream.write(text)
            stream.flush()
            if self.bar is not None:
                self.bar.refresh()

    def write_log(self, text: str) -> None:
        with self.lock:
            self.log.write(ANSI.sub("", text))


_terminal: _Terminal | None = None


def say(text: str) -> None:
    """A line for the person: the terminal's stdout (above the live bar) and the log; plain print when not captured."""
    terminal = _terminal
    if terminal is None:
        print(text, flush=True)
        return
    terminal.write(terminal.out, text + "\n")
    terminal.write_log(text + "\n")


def warn(text: str) -> None:
    """A warning for the person: `warning: TEXT` on the terminal's stderr, and in the log."""
    terminal = _terminal
    if terminal is None:
        print(f"warning: {text}", file=sys.stderr, flush=True)
        return
    terminal.write(terminal.err, f"warning: {text}\n")
    terminal.write_log(f"warning: {text}\n")


class _LogStream(io.TextIOBase):
    """Stands in for sys.stdout and sys.stderr while captured: what libraries print reaches the log file as a terminal
    would end up showing it (a progress bar redrawn with carriage returns keeps only its last state, without colour
    codes) and, with `echo`, the terminal's stderr as it comes."""

    def __init__(self, terminal: _Terminal, echo: bool):
        super().__init__()
        self.terminal, self.echo, self.pending = terminal, echo, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:  # output written to the descriptor itself (C code, subprocesses) lands in the log too
        return self.terminal.log.fileno()

    def write(self, text: str) -> int:
        if self.echo:
            self.terminal.write(self.terminal.err, text)
        with self.terminal.lock:
            for part in re.split(r"(\r\n|\r|\n)", text):
                if part in ("\n", "\r\n"):
                    if not self.echo and self.pending.startswith(WARNING_PREFIX):
                        # A warning printed (not logged) by finetune: the person must see it, not only the log.
                        self.terminal.write(self.terminal.err, self.pending + "\n")
                    self.terminal.write_log(self.pending + "\n")
                    self.pending = ""
                elif part == "\r":
                    self.pending = ""  # the line is being redrawn: only its last state is kept
                else:
                    self.pending += part
        return len(text)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.pending.strip():
            self.terminal.write_log(self.pending + "\n")
        self.pending = ""
        super().close()


class _LogFileHandler(logging.Handler):
    def __init__(self, terminal: _Terminal):
        super().__init__(logging.INFO)
        self.terminal = terminal
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.terminal.write_log(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class _TerminalHandler(logging.Handler):
    """Our own warnings as `warning: ...`; with --verbose, every library record too."""

    def __init__(self, terminal: _Terminal, verbose: bool):
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.terminal, self.verbose = terminal, verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.name.split(".")[0] == "finetune" or _our_python_warning(record) is not None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            ours = _our_python_warning(record)
            if ours is not None:
                text = f"warning: {ours}"
            elif record.name.split(".")[0] == "finetune" and record.levelno >= logging.WARNING:
                text = f"{record.levelname.lower()}: {record.getMessage()}"
            else:
                text = f"[{record.name}] {record.levelname}: {record.getMessage()}"
            self.terminal.write(self.terminal.err, text + "\n")
        except Exception:
            self.handleError(record)


_PYTHON_WARNING = re.compile(r"(?P<path>.+?):\d+: (?P<category>\w+): (?P<message>.*)")


def _our_python_warning(record: logging.LogRecord) -> str | None:
    """`Category: message` of a Python warning raised from finetune's own code (captured by `logging.captureWarnings`
    as a `py.warnings` record), else None: the libraries' warnings stay in the log."""
    if record.name != "py.warnings":
        return None
    found = _PYTHON_WARNING.match(str(record.getMessage()).split("\n", 1)[0])
    if found is None or not os.path.abspath(found["path"]).startswith(PACKAGE_DIR + os.sep):
        return None
    return f"{found['category']}: {found['message']}"


@contextlib.contextmanager
def _route_logging(terminal: _Terminal, verbose: bool) -> Iterator[None]:
    """Send the libraries' logging and Python warnings through the root logger to the log file (and the terminal
    with `verbose`) for the block, then put every logger back as it was."""
    set_env = "mlflow" not in sys.modules and "MLFLOW_CONFIGURE_LOGGING" not in os.environ
    if set_env:  # MLflow's own switch: it then adds no stderr handler of its own when imported
        os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    import datasets.utils.logging
    import transformers.utils.logging

    loggers = [logging.getLogger(name) for name in (*LIBRARY_LOGGERS, *QUIET_LOGGERS)]
    saved = [(lg, lg.handlers[:], lg.propagate, lg.level) for lg in loggers]
    root = logging.getLogger()
    root_level = root.level
    handlers = [_LogFileHandler(terminal), _TerminalHandler(terminal, verbose)]
    capturing_already = getattr(logging, "_warnings_showwarning", None) is not None
    try:
        transformers.utils.logging.disable_default_handler()
        transformers.utils.logging.enable_propagation()
        datasets.utils.logging.enable_propagation()
        for lg in loggers:
            lg.handlers = []  # datasets, huggingface_hub and an already imported MLflow add stderr handlers
            lg.propagate = True
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        yield
    finally:
        if not capturing_already:
            logging.captureWarnings(False)
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(root_level)
        for lg, lg_handlers, propagate, level in saved:
            lg.handlers, lg.propagate = lg_handlers, propagate
            lg.setLevel(level)
        if set_env:
            os.environ.pop("MLFLOW_CONFIGURE_LOGGING", None)


@contextlib.contextmanager
def capture(log_path: Path | None, verbose: bool = False, main: bool = True) -> Iterator[_Terminal | None]:
    """For the block: the terminal shows only what `say`, `warn`, `TerminalReport` and our own warnings write; library
    output goes to `log_path` (appended; None: discarded), and to the terminal too with `verbose`. `main` is False in
    the other processes of a multi-process run: they write nothing to the terminal.

    A log that cannot be opened leaves the output as it is, so the run's own checks (a writable output_dir) speak.
    """
    global _terminal
    try:
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path or os.devnull, "a", encoding="utf-8", buffering=1)
    except OSError:
        log = None
    if log is None:
        yield None
        return
    out, err = sys.stdout, sys.stderr
    terminal = _Terminal(out if main else None, err if main else None, log)
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} finetune {' '.join(sys.argv[1:])} (pid {os.getpid()})\n")
    stream = _LogStream(terminal, echo=verbose and main)
    previous, _terminal = _terminal, terminal
    try:
        with _route_logging(terminal, verbose and main), contextlib.redirect_stdout(stream), \
                contextlib.redirect_stderr(stream):
            try:
                yield terminal
            except BaseException as e:
                # The terminal gets the error from the command line (or the traceback); the log keeps it too.
                detail = f"error: {e}\n" if isinstance(e, FinetuneError) else "".join(traceback.format_exception(e))
                terminal.write_log(detail)
                raise
    finally:
        if terminal.bar is not None:
            terminal.bar.close()
        stream.close()
        _terminal = previous
        log.close()


def terminal_stream() -> TextIO:
    """Where our own progress bar draws: the terminal's stderr while output is captured (sys.stderr then goes to
    the log), else sys.stderr."""
    terminal = _terminal
    if terminal is not None and terminal.err is not None:
        return terminal.err
    return sys.stderr


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """The command's one progress bar (tqdm) on the terminal, kept below the lines `say` writes meanwhile."""
    from tqdm.auto import tqdm

    stream = terminal_stream()
    bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
               mininterval=0.1 if stream.isatty() else 30)
    if _terminal is not None:
        _terminal.bar = bar
    return bar


def close_bar(bar: Any) -> None:
    """Close a `progress_bar`: its last state stays on the terminal, and later lines are no longer kept below it."""
    if _terminal is not None and _terminal.bar is bar:
        _terminal.bar = None
    bar.close()


@contextlib.contextmanager
def command_output(kind: str, verbose: bool) -> Iterator[Path]:
    """For a command that writes an output folder (evaluate, label-issues): our lines on the terminal, library
    output (load reports, datasets' and transformers' bars, MLflow's lines) to a log, shown too with `verbose`.

    The folder is published whole at the end (`finetune.files.publish_files`), so the log is written in a
    temporary file first; `publish_log` moves it into the folder. After a failure it stays where it is, and the
    terminal says where."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f"finetune-{kind}-", suffix=".log")
    os.close(fd)
    path = Path(name)
    quiet_model_loading()
    try:
        with capture(path, verbose) as terminal:
            try:
                yield path
            except (FinetuneError, KeyboardInterrupt):
                raise
            except BaseException:
                if terminal is not None:
                    terminal.write(terminal.err, f"library output and the traceback: {path}\n")
                raise
    except (FinetuneError, KeyboardInterrupt):
        path.unlink(missing_ok=True)  # the error line says it all; the log would only repeat it
        raise


def publish_log(log: Path, folder: Path, name: str) -> Path | None:
    """Move a `command_output` log into the command's output folder as `name` (recorded as finetune's file)."""
    from finetune.files import RefusedWrite, publish_files, staging_folder

    if not log.is_file() or not folder.is_dir():
        return None
    stage = staging_folder(folder)
    try:
        os.replace(log, stage / name)
        publish_files(stage, folder, "log", "the output folder")
    except (OSError, RefusedWrite):
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        return None
    return folder / name


def show_recipe(recipe: Recipe, path: str, verbose: bool) -> None:
    """The resolved recipe: always in the log, on the terminal with --verbose."""
    text = f"# resolved recipe ({path})\n{recipe_to_yaml(recipe)}"
    if verbose:
        say(text)
    elif _terminal is not None:
        _terminal.write_log(text + "\n")


def recipe_line(path: str, overrides: list[str], recipe: Recipe) -> str:
    """`recipe: PATH (name, task, metric)`, with each override as the value it was parsed to."""
    values = flatten(recipe.model_dump(mode="json"))
    shown = [f"{key}: {values.get(key, '?')}" for key in (o.partition("=")[0].strip() for o in overrides)]
    return (f"recipe: {path} ({recipe.name}: {recipe.task.type}, best model chosen on {recipe.task.metric_for_best})"
            + (f"; overrides: {', '.join(shown)}" if shown else ""))


def _names(items: list[str], most: int = 6) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def data_line(recipe: Recipe, data: Any) -> str:
    """Where the data comes from and how many examples each split has."""
    d = recipe.data
    if d.files:
        source = ", ".join(str(f) for files in d.files.values() for f in ([files] if isinstance(files, str) else files))
    else:
        source = f"the hub data set {d.dataset}" + (f" ({d.dataset_config})" if d.dataset_config else "")
    carved = "" if str(data.raw_eval.split) == d.eval_split else f" (carved: {d.validation_size:.0%} of train)"
    sizes = f"train {len(data.raw_train)}, eval {len(data.raw_eval)}{carved}" + (
        f", test {len(data.raw_test)}" if data.raw_test is not None else "")
    labels = f"; labels ({len(data.label_names)}): {_names(list(data.label_names), 8)}" if data.label_names else ""
    return f"data: {sizes} from {source}{labels}"


def checkpoint_line(start: RunStart) -> str:
    """The checkpoint, what it is, and where it was found."""
    c = start.checkpoint
    where = {
        "local": f"the folder {c.path}",
        "mirror": f"$FINETUNE_MODEL_MIRROR ({c.path})",
        "package": f"the installed package {PACKAGED_CHECKPOINTS.get(c.name, ('?',))[0].replace('_', '-')}",
        "hub": f"the Hugging Face hub ({c.path})",
    }.get(c.source, str(c.path))
    return f"checkpoint: {c.name} ({start.family}, {start.parameters / 1e6:.1f}M parameters) from {where}"


class _Bar(Progress):
    """One live tqdm bar on the terminal's stderr: steps, elapsed time, ETA, the loss and samples/s."""

    def __init__(self, total: int, initial: int):
        from tqdm.auto import tqdm

        terminal = _terminal
        stream = terminal.err if terminal is not None else sys.stderr
        tty = stream is not None and stream.isatty()
        # Redirected to a file or a pipe, a bar redrawn 10 times a second is noise: there, every 30 s.
        self.bar = tqdm(total=total, initial=initial, file=stream, disable=stream is None, desc="training",
                        mininterval=0.1 if tty else 30, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar:20}| step {n_fmt}/{total_fmt}, "
                                   "{elapsed} elapsed, ETA {remaining}{postfix}")
        self.terminal = terminal
        if terminal is not None and stream is not None:
            terminal.bar = self.bar

    def update(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def show(self, loss: float, samples_per_second: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, {samples_per_second:.1f} samples/s", refresh=False)

    def close(self) -> None:
        if self.terminal is not None:
            self.terminal.bar = None
        self.bar.close()


class TerminalReport(RunReport):
    """`finetune run`'s terminal: the run's header, the live bar, one line per evaluation, the summary."""

    def __init__(self, log_path: Path | None = None):
        self.log_path = log_path
        self.bar: _Bar | None = None

    def data_ready(self, recipe: Recipe, data: Any) -> None:
        say(data_line(recipe, data))

    def training_starts(self, start: RunStart) -> None:
        say(checkpoint_line(start))
        if start.tokenizer_fit is not None:
            say(start.tokenizer_fit.line())
            if start.tokenizer_fit.warning():
                warn(start.tokenizer_fit.warning())
        new = start.new_weights
        if new.head:
            labels = f" for {start.num_labels} labels" if start.num_labels else ""
            say(f"head: new {_names(new.head)}{labels}, initialised at random: expected, fine-tuning trains it")
        if new.encoder:
            warn(f"{len(new.encoder)} encoder weights are not in the checkpoint and start at random "
                 f"({_names(new.encoder, 3)}): is model.checkpoint the pretrained encoder you meant?")
        if new.mismatched:
            warn(f"{len(new.mismatched)} weights of the checkpoint have another shape here and start at random: "
                 f"{_names(new.mismatched, 3)}")
        for note in start.notes:
            say(note)
        processes = f"{start.processes} process{'es' if start.processes > 1 else ''}"
        resumed = f"; resumed at step {start.resumed_at} (MLflow run {start.run_id})" if start.resumed_at is not None else ""
        say(f"device: {start.device}; precision: {start.precision}")
        say(f"training {start.total_steps} steps ({start.steps_per_epoch}/epoch) on {start.train_examples} examples "
            f"with {processes}, evaluating on {start.eval_examples}; "
            f"tokenised data {'from cache' if start.cache_hit else 'built'}{resumed}")
        if self.log_path is not None:
            say(f"log: {self.log_path} (library output and the resolved recipe; --verbose shows them here)")

    def progress(self, total: int, initial: int) -> Progress:
        self.bar = _Bar(total, initial)
        return self.bar

    def evaluated(self, step: int, metric: str, metrics: dict[str, float], best: float | None,
                  best_step: int | None) -> None:
        bar = self.bar
        if bar is not None and bar.bar.total is not None and step >= bar.bar.total:
            # The last evaluation: the bar is drawn one last time above it, not again below it (closing twice,
            # as training does next, is harmless).
            bar.close()
        say(f"step {step}: eval {metric} {metrics[metric]:.4f}, loss {metrics['loss']:.4f} "
            f"(best {best:.4f} at step {best_step})")

    def finished(self, end: RunEnd) -> None:
        for line in metric_lines(end):
            say(line)
        for text in end.warnings + ([end.tracking_problem] if end.tracking_problem else []):
            warn(text)
        for line in where_lines(end, self.log_path):
            say(line)


def metric_lines(end: RunEnd) -> list[str]:
    """The summary's table: the best evaluation's metrics, and the test scores beside them."""
    with_test = bool(end.test_metrics)
    lines = ["", f"best eval ({end.metric}) at step {end.best_step} of {end.steps}"
                 + (", and the test split:" if with_test else ":")]
    width = max(len(name) for name in [*end.best_metrics, "metric"]) + 2
    if with_test:
        lines.append(f"  {'metric':<{width}}{'eval':>8}{'test':>9}")
    for name, value in end.best_metrics.items():
        test = end.test_metrics.get(name)
        lines.append(f"  {name:<{width}}{value:>8.4f}" + (f"{test:>9.4f}" if test is not None else ""))
    return lines


def where_lines(end: RunEnd, log_path: Path | None) -> list[str]:
    """The summary's last lines: the registry's decision, the time, and where the log, model and MLflow run are."""
    lines = []
    if end.champion:
        lines.append(f"registered: {end.champion['name']} version {end.champion['version']} ({end.champion['decision']})")
    memory = f", peak memory {end.peak_memory_mb / 1024:.1f} GiB" if end.peak_memory_mb else ""
    lines.append(f"time: {_duration(end.train_seconds)} of training, {end.samples_per_second:.1f} samples/s{memory}")
    if log_path is not None:
        lines.append(f"log: {log_path}")
    lines.append(f"model: {end.best_dir}" if end.serves else
                 f"checkpoint: {end.best_dir} (fine-tune it: model.checkpoint: {end.best_dir})")
    lines.append(f"MLflow: {end.mlflow}")
    return lines
