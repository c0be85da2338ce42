"""Issue 33, class 11: a warning a person must see reaches the terminal while a run's output goes to run.log,
however finetune issued it; the libraries' own output and warnings stay in the log."""

from __future__ import annotations

import logging
import sys
import warnings

from finetune.cli import console
from finetune.training import state


def _captured(tmp_path, capsys, action) -> tuple[str, str]:
    log = tmp_path / "run.log"
    with console.capture(log):
        action()
    return capsys.readouterr().err, log.read_text()


def test_a_damaged_checkpoint_removed_is_told_on_the_terminal(tmp_path, capsys):
    damaged = tmp_path / "out" / "checkpoints" / "step-4"
    damaged.mkdir(parents=True)
    (damaged / "trainer_state.json").write_text("{}")
    err, log = _captured(tmp_path, capsys, lambda: state.find_resumable(tmp_path / "out", "hash", force=False))
    assert "warning: checkpoint" in err and "is damaged" in err and "warning: checkpoint" in log
    assert not damaged.exists()


def test_printed_and_python_warnings_of_finetune_reach_the_terminal_library_ones_stay_in_the_log(tmp_path, capsys):
    from finetune.training import outputs

    def act() -> None:
        outputs.warn("recovered best/ from an interrupted save")  # printed with the prefix, to captured stderr
        print("warning: adopted the folder runs/x", file=sys.stdout)  # on stdout too
        print("Generating train split: 100%")  # library noise
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit("the finetune thing", UserWarning, console.__file__, 1)
            warnings.warn_explicit("a library thing", UserWarning, "/elsewhere/site-packages/lib.py", 1)
        logging.getLogger("urllib3").warning("urllib3 says")

    err, log = _captured(tmp_path, capsys, act)
    assert "warning: recovered best/ from an interrupted save" in err
    assert "warning: adopted the folder runs/x" in err
    assert "warning: UserWarning: the finetune thing" in err
    for noise in ("Generating train split", "a library thing", "urllib3 says"):
        assert noise not in err and noise in log
    assert "recovered best/" in log and "adopted the folder" in log


def test_with_verbose_a_warning_is_shown_once(tmp_path, capsys):
    with console.capture(tmp_path / "run.log", verbose=True):
        print("warning: once", file=sys.stderr)
    assert capsys.readouterr().err.count("warning: once") == 1
