"""finetune.files: the bounded reader every YAML/JSON document goes through, and the writer that never follows links."""

from __future__ import annotations

import os

import pytest

from finetune.files import (
    RefusedDocument, RefusedWrite, load_json, load_yaml, open_existing, open_new, parse_scalar, read_json, read_yaml,
    refuse_link, spreadsheet_safe, write_atomic,
)

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def test_yaml_alias_bombs_deep_nesting_and_self_reference_are_refused_quickly():
    with pytest.raises(RefusedDocument, match="expands to more than"):
        load_yaml(BOMB)
    with pytest.raises(RefusedDocument, match="nests deeper than 64"):
        load_yaml("[" * 5000 + "]" * 5000)
    with pytest.raises(RefusedDocument, match="refers to a node that contains it"):
        load_yaml("a: &a [1, *a]")
    with pytest.raises(RefusedDocument, match="not valid YAML"):
        load_yaml("a: [1, 2")
    with pytest.raises(RefusedDocument, match="characters; at most 10"):
        load_yaml("a: " + "x" * 20, max_bytes=10)
    assert load_yaml("a: [1, 2]\nb: {c: true}") == {"a": [1, 2], "b": {"c": True}}


def test_yaml_never_builds_objects():
    with pytest.raises(RefusedDocument, match="not valid YAML"):
        load_yaml("!!python/object/apply:os.system ['echo hi']")


def test_json_is_bounded_in_size_and_depth(tmp_path):
    with pytest.raises(RefusedDocument, match="nests deeper than 64"):
        load_json("[" * 100 + "]" * 100)
    with pytest.raises(RefusedDocument, match="nests deeper"):
        load_json("[" * 200_000 + "]" * 200_000, max_bytes=10**6)
    big = tmp_path / "big.json"
    big.write_text('{"a": "' + "x" * 2000 + '"}')
    with pytest.raises(RefusedDocument, match="bytes; at most 1000"):
        read_json(big, max_bytes=1000)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(RefusedDocument, match="not a regular file"):
        read_json(tmp_path / "dir.json")
    (tmp_path / "latin.yaml").write_bytes(b"a: caf\xe9\n")
    with pytest.raises(RefusedDocument, match="not UTF-8"):
        read_yaml(tmp_path / "latin.yaml")


def test_command_line_values_are_scalars_never_yaml():
    assert [parse_scalar(v) for v in ("3", "0.5", "true", "False", "null", "macro")] == [3, 0.5, True, False, None, "macro"]
    assert parse_scalar("*a") == "*a" and parse_scalar("[1, 2]") == "[1, 2]" and parse_scalar("nan") == "nan"
    assert parse_scalar("!!python/object:os.system") == "!!python/object:os.system"


def test_writes_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        open_new(link)
    with pytest.raises(RefusedWrite, match="symbolic link"):
        open_existing(link, "ab")
    with pytest.raises(RefusedWrite, match="symbolic link"):
        refuse_link(link)
    write_atomic(link, "new")  # replaces the link itself
    assert victim.read_text() == "keep me" and not link.is_symlink() and link.read_text() == "new"
    with pytest.raises(FileExistsError):
        write_atomic(link, "again", replace=False)


def test_new_files_get_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with open_new(tmp_path / "a.txt") as f:
            f.write("x")
        write_atomic(tmp_path / "b.txt", "y")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct(0o640)
    assert oct((tmp_path / "b.txt").stat().st_mode & 0o777) == oct(0o640)


def test_spreadsheet_formulas_are_defused():
    assert [spreadsheet_safe(v) for v in ("=HYPERLINK(1)", "+1", "-2+3", "@SUM(A1)", "\t=1", "ok", -3, 2.5)] == \
        ["'=HYPERLINK(1)", "'+1", "'-2+3", "'@SUM(A1)", "'\t=1", "ok", -3, 2.5]
