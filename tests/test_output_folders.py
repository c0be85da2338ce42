"""Output folders in states finetune did not leave them in (issue 33, class 7): links where finetune writes, a
user's folders with finetune-like names, forged markers; nothing followed, nothing of the user's deleted, no crash
half-way."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from finetune.cli import main as cli
from finetune.errors import CheckpointError, RecipeError
from finetune.models.checksums import mark_staging
from finetune.models.modeling import ModelInfo, build_model, recover_model_dir, save_model_dir
from finetune.models.pretrained import resolve_checkpoint
from finetune.tasks import get_task
from finetune.training import outputs
from finetune.training import state as training_state


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoints):
    from finetune.config.recipe import ModelSection

    checkpoint = str(tiny_checkpoints["bert"])
    torch.manual_seed(0)
    return build_model(resolve_checkpoint(checkpoint), ModelSection(checkpoint=checkpoint),
                       get_task("classification"), ["negative", "positive"])


@pytest.fixture(scope="module")
def saved_model(model_and_tokenizer, tmp_path_factory) -> Path:
    model, tokenizer = model_and_tokenizer
    return _save(model_and_tokenizer, tmp_path_factory.mktemp("outputs") / "best")


def _save(model_and_tokenizer, target: Path) -> Path:
    model, tokenizer = model_and_tokenizer
    info = ModelInfo(task="classification", label_names=["negative", "positive"], text_pair=False, max_length=64)
    return save_model_dir(target, model, tokenizer, info, "name: tiny\n")


def _claim(out: Path) -> Path:
    """An output folder of finetune's whose run has ended (a marker saying running, by this live process, is
    refused by clean)."""
    outputs.claim(out, "r", "h")
    outputs.update_marker(out, state="failed")
    return out


def _users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine")
    return path


# --- best/ and its staging names ---------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["best", ".best-new", ".best-old", "checkpoints", "checkpoints/step-4",
                                  ".finetune-run.json"])
def test_a_link_where_a_run_writes_is_refused_before_the_run_and_not_followed(tmp_path, link):
    out = tmp_path / "out"
    _claim(out)
    elsewhere = _users_folder(tmp_path / "elsewhere")
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    if (out / link).exists():
        (out / link).unlink()
    (out / link).symlink_to(elsewhere)
    with pytest.raises(RecipeError, match=rf"output_dir: .*{link.split('/')[-1]}.* is a symbolic link"):
        outputs.check_output_dir(out, overwrite=True)  # --overwrite does not make a link writable either
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]


def test_saving_best_through_a_link_is_refused_and_the_target_untouched(model_and_tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = _users_folder(tmp_path / "elsewhere")
    (out / "best").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="best is a symbolic link"):
        _save(model_and_tokenizer, out / "best")
    with pytest.raises(CheckpointError, match="best is a symbolic link"):
        recover_model_dir(out / "best")  # a rerun's recovery names it instead of crashing
    assert sorted(p.name for p in elsewhere.iterdir()) == ["notes.txt"]
    assert (out / "best").is_symlink() and sorted(p.name for p in out.iterdir()) == ["best"]


@pytest.mark.parametrize("name", [".best-new", ".best-old"])
def test_a_users_folder_with_a_staging_name_is_never_deleted(model_and_tokenizer, saved_model, tmp_path, name):
    out = tmp_path / "out"
    shutil.copytree(saved_model, out / "best")
    theirs = _users_folder(out / name)
    with pytest.raises(CheckpointError, match=rf"{name} is in the way of saving best/ and finetune did not make it"):
        _save(model_and_tokenizer, out / "best")
    done = recover_model_dir(out / "best")
    assert any(f"left {theirs} alone" in d for d in done)
    assert (theirs / "notes.txt").read_text() == "mine" and (out / "best" / "finetune.json").is_file()


def test_other_dot_best_folders_are_left_alone_by_saves_recovery_and_clean(model_and_tokenizer, saved_model, tmp_path):
    out = tmp_path / "out"
    _claim(out)
    shutil.copytree(saved_model, out / "best")
    backup = shutil.copytree(saved_model, out / ".best-backup")  # the user's copy of an earlier model
    k = _users_folder(out / ".best-k2j3h4x1")
    _save(model_and_tokenizer, out / "best")  # a save replaces best/ and leaves both alone
    assert recover_model_dir(out / "best") == []
    assert cli(["clean", str(out)]) == 0
    assert (backup / "finetune.json").is_file() and (k / "notes.txt").read_text() == "mine"
    assert not (out / "best").exists()


def test_a_save_leaves_no_marker_in_best_and_cleans_only_its_own_staging(model_and_tokenizer, saved_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(saved_model, out / "best")
    leftover = out / ".best-new"
    leftover.mkdir()
    mark_staging(leftover, "best")  # a save of finetune's killed mid-write
    _save(model_and_tokenizer, out / "best")
    assert sorted(p.name for p in out.iterdir()) == ["best"]
    assert not any(p.name.startswith(".finetune-staging") for p in (out / "best").iterdir())


# --- finetune clean ----------------------------------------------------------------------------------------


def _checkpoint(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in training_state.REQUIRED_FILES:
        (path / name).write_text("{}")
    return path


def test_clean_does_not_trust_a_forged_marker_with_the_users_files(saved_model, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    shutil.copytree(saved_model, theirs / "best")
    (theirs / "best" / "my-notes.txt").write_text("mine")  # a model folder the user keeps notes in
    _users_folder(theirs / "checkpoints" / "step-3")  # and a folder of theirs with a checkpoint's name
    (theirs / outputs.MARKER_FILE).write_text('{"created_by": "finetune"}')  # copied or forged
    capsys.readouterr()
    assert cli(["clean", str(theirs)]) == 0
    err = capsys.readouterr().err
    assert "left" in err and "my-notes.txt" in err and "notes.txt" in err
    assert (theirs / "best" / "my-notes.txt").read_text() == "mine" and (theirs / "best" / "model.safetensors").is_file()
    assert (theirs / "checkpoints" / "step-3" / "notes.txt").read_text() == "mine"


def test_clean_never_follows_symlinked_children_and_does_not_stop_half_way(saved_model, tmp_path, capsys):
    out = tmp_path / "out"
    _claim(out)
    other_run = tmp_path / "other-run"  # another output folder of finetune's, reached only through links
    _claim(other_run)
    shutil.copytree(saved_model, other_run / "best")
    _checkpoint(other_run / "checkpoints" / "step-2")
    (out / "best").symlink_to(other_run / "best")
    (out / "checkpoints").symlink_to(other_run / "checkpoints")
    (out / "trial-link").symlink_to(other_run)  # a link to a folder with a marker is no sweep trial
    sweep_root = tmp_path / "runs"
    sweep_root.mkdir()
    (sweep_root / "linked").symlink_to(other_run)
    _checkpoint(out / "unrelated" / "checkpoints" / "step-1")  # a plain folder of the user's inside
    capsys.readouterr()
    assert cli(["clean", str(out)]) == 0
    assert cli(["clean", str(sweep_root)]) == 2  # nothing of finetune's there: links are not followed
    err = capsys.readouterr().err
    assert "symbolic link" in err
    assert (other_run / "best" / "model.safetensors").is_file()
    assert (other_run / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert (out / "best").is_symlink() and (out / "checkpoints").is_symlink() and (out / "trial-link").is_symlink()
    assert (out / "unrelated" / "checkpoints" / "step-1").is_dir()


def test_clean_checks_everything_first_and_reports_what_it_could_not_delete(saved_model, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "out"
    _claim(out)
    shutil.copytree(saved_model, out / "best")
    for step in (2, 4):
        _checkpoint(out / "checkpoints" / f"step-{step}")
    real_delete = outputs._delete

    def stubborn(path: Path) -> None:
        if path.name == "step-2":
            raise PermissionError(13, "Permission denied", str(path))
        real_delete(path)

    monkeypatch.setattr(outputs, "_delete", stubborn)
    done = outputs.clean(out)
    assert [p.name for p, _ in done[-1].removed] == ["step-4", "best"]
    assert [(p.name, why) for p, why in done[-1].skipped] == [("step-2", "not deleted: Permission denied")]
    assert (out / "checkpoints" / "step-2").is_dir() and not (out / "best").exists()


def test_resume_and_finish_never_follow_a_linked_checkpoint(tmp_path):
    out = tmp_path / "out"
    _claim(out)
    elsewhere = _checkpoint(tmp_path / "elsewhere" / "step-9")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-9").symlink_to(elsewhere)
    said: list[str] = []
    assert training_state.find_resumable(out, "h", True, said.append) is None
    training_state.mark_finished(out)
    assert (elsewhere / "trainer_state.json").is_file() and (out / "checkpoints" / "step-9").is_symlink()
    os.unlink(out / "checkpoints" / training_state.FINISHED_FILE)
    (out / "checkpoints" / training_state.FINISHED_FILE).symlink_to(tmp_path / "elsewhere" / "victim.txt")
    (tmp_path / "elsewhere" / "victim.txt").write_text("mine")
    training_state.mark_finished(out)
    assert (tmp_path / "elsewhere" / "victim.txt").read_text() == "mine"
