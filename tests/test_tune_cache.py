"""The autotune cache file: malformed entries, unreadable files, links and concurrent writers."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import stat

import pytest

from engine.training.tune_cache import clean_entry, load_cache, save_entry, session_timed_s

GOOD_SESSION = {"lanes": 2000.0, "one network": {"a": 1000.0}, "timed_s": 0.2}


def test_clean_entry_keeps_finite_positive_speeds():
    raw = {"images_per_s": {"a": 100.0, "nan": float("nan"), "zero": 0, "neg": -5.0, "text": "fast",
                            "flag": True, "inf": float("inf"), "whole": 7}}
    entry = clean_entry(raw, untimed_s=0.3)
    assert entry["images_per_s"] == {"a": 100.0, "whole": 7.0}


def test_clean_entry_timed_s_rules():
    speeds = {"a": 1.0, "b": 2.0, "c": 3.0}
    entry = clean_entry({"images_per_s": speeds, "timed_s": {"a": 0.06, "b": "long"}}, untimed_s=0.3)
    assert entry["timed_s"]["a"] == 0.06
    assert entry["timed_s"]["b"] == 0.0, "a malformed timing counts as none"
    assert entry["timed_s"]["c"] == 0.3, "a speed without a timing was cached before timings were recorded"
    assert clean_entry({"images_per_s": speeds, "timed_s": [0.3]}, 0.3)["timed_s"] == dict.fromkeys(speeds, 0.0)
    assert clean_entry({"images_per_s": speeds}, 0.3)["timed_s"] == dict.fromkeys(speeds, 0.3)


@pytest.mark.parametrize("raw", [None, [], "entry", 3])
def test_clean_entry_of_non_map_is_empty(raw):
    assert clean_entry(raw, 0.3) == {}


def test_clean_entry_drops_malformed_parts():
    raw = {
        "images_per_s": ["a"],
        "compile_s": {"a": "slow", "b": 2.5, "c": -1.0},
        "failed": ["a"],
        "lanes": {
            "channels_last": {
                "good": GOOD_SESSION,
                "bool lanes": {**GOOD_SESSION, "lanes": True},
                "no speeds": {**GOOD_SESSION, "one network": {}},
                "text speed": {**GOOD_SESSION, "one network": {"a": "fast"}},
                "list": [1, 2],
            },
            "nchw": "sessions",
        },
        "updated": 5,
    }
    entry = clean_entry(raw, 0.3)
    assert entry["images_per_s"] == {}
    assert entry["compile_s"] == {"b": 2.5}
    assert entry["failed"] == {}
    assert entry["lanes"] == {"channels_last": {"good": GOOD_SESSION}}
    assert "updated" not in entry


def test_session_timed_s_of_old_session():
    assert session_timed_s(GOOD_SESSION, 0.4) == 0.2
    assert session_timed_s({"lanes": 1.0, "one network": {"a": 1.0}}, 0.4) == 0.4
    assert session_timed_s({**GOOD_SESSION, "timed_s": float("nan")}, 0.4) == 0.0


@pytest.mark.parametrize(
    "content",
    [b'{"k": "\xff"}', b"[" * 100_000, b'{"k": {"images_per_s": ', b""],
    ids=["not utf-8", "deep nesting", "truncated", "empty"],
)
def test_unreadable_cache_gives_no_entries(tmp_path, caplog, content):
    path = tmp_path / "autotune.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert load_cache(path) == {}
    assert "ignoring the unreadable autotune cache" in caplog.text


def test_save_writes_through_a_link(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("{}")
    os.chmod(target, 0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    save_entry(link, "k", {"images_per_s": {"a": 1.0}})
    assert link.is_symlink(), "the link must stay a link"
    assert json.loads(target.read_text()) == {"k": {"images_per_s": {"a": 1.0}}}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640, "an existing file keeps its mode"


def test_new_cache_file_is_not_private(tmp_path):
    path = tmp_path / "sub" / "autotune.json"
    save_entry(path, "k", {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not list(path.parent.glob("*.partial"))


def test_save_leaves_a_directory_alone(tmp_path, caplog):
    folder = tmp_path / "cache"
    folder.mkdir()
    with caplog.at_level(logging.WARNING):
        save_entry(folder, "k", {})
    assert folder.is_dir()
    assert "is not a regular file" in caplog.text


def _write_many(path: str, prefix: str) -> None:
    from pathlib import Path

    for i in range(40):
        save_entry(Path(path), f"{prefix}-{i}", {"images_per_s": {"a": float(i + 1)}})


def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / "autotune.json"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_many, args=(str(path), name)) for name in "ABC"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0, 0]
    assert len(load_cache(path)) == 3 * 40
