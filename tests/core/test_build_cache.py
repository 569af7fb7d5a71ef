"""The build cache: a build kept under what it was built from comes back byte for byte, a tampered or half-kept entry
is never handed out, and only the entries used last are kept."""

from __future__ import annotations

import logging
import os
import time

from components.core.build_cache import BuildCache, build_key


def test_a_kept_file_and_folder_come_back_byte_for_byte(tmp_path):
    cache = BuildCache(tmp_path / "cache", keep=4)
    source = tmp_path / "model.onnx"
    source.write_bytes(os.urandom(50_000))
    folder = tmp_path / "model"
    (folder / "data").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "data" / "model.pt2").write_bytes(os.urandom(70_000))

    assert not cache.fetch("file-key", tmp_path / "out.onnx")
    cache.keep("file-key", source)
    cache.keep("folder-key", folder)

    assert cache.fetch("file-key", tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx").read_bytes() == source.read_bytes()
    assert cache.fetch("folder-key", tmp_path / "copy")
    assert (tmp_path / "copy" / "data" / "model.pt2").read_bytes() == (folder / "data" / "model.pt2").read_bytes()
    assert (tmp_path / "copy" / "MLmodel").read_text() == "flavors: {}\n"
    assert sorted(p.name for p in (tmp_path / "copy").rglob("*") if p.is_file()) == ["MLmodel", "model.pt2"]


def test_a_tampered_entry_is_deleted_not_handed_out(tmp_path, caplog):
    cache = BuildCache(tmp_path / "cache", keep=4)
    source = tmp_path / "model.int8.onnx"
    source.write_bytes(b"the real model" * 1000)
    cache.keep("k", source)
    kept = tmp_path / "cache" / "k" / "model.int8.onnx"
    kept.write_bytes(b"the real model" * 999 + b"something else")

    with caplog.at_level(logging.WARNING):
        assert not cache.fetch("k", tmp_path / "out.onnx")
    assert "does not match its recorded sha256" in caplog.text
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "cache" / "k").exists()


def test_only_the_entries_used_last_are_kept(tmp_path):
    cache = BuildCache(tmp_path / "cache", keep=2)
    source = tmp_path / "f.bin"
    for n, key in enumerate(["a", "b"]):
        source.write_bytes(key.encode() * 100)
        cache.keep(key, source)
        os.utime(tmp_path / "cache" / key / "manifest.json", (time.time() - 100 + n, time.time() - 100 + n))
    assert cache.fetch("a", tmp_path / "out")  # "a" is now the one used last, "b" the oldest
    cache.keep("c", source)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a", "c"]
    assert not cache.fetch("b", tmp_path / "out")


def test_a_temporary_entry_left_by_a_stopped_process_is_cleared_and_never_read(tmp_path):
    cache = BuildCache(tmp_path / "cache", keep=4)
    stale = tmp_path / "cache" / ".tmp-k-1234-5678"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert not cache.fetch("k", tmp_path / "out")
    source = tmp_path / "model.onnx"
    source.write_bytes(b"whole")
    cache.keep("other", source)
    assert not stale.exists()


def test_a_cache_that_cannot_be_written_only_logs(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    source = tmp_path / "model.onnx"
    source.write_bytes(b"model")
    with caplog.at_level(logging.WARNING):
        BuildCache(blocker / "variants", keep=2).keep("k", source)
    assert "could not keep model.onnx" in caplog.text and "builds it again" in caplog.text


def test_the_key_changes_with_every_input():
    base = build_key("variant", "int8", "sha-of-model", (64, 112, 112, 3))
    assert base == build_key("variant", "int8", "sha-of-model", (64, 112, 112, 3))
    assert len({base, build_key("variant", "fp16", "sha-of-model", (64, 112, 112, 3)),
                build_key("variant", "int8", "sha-of-other", (64, 112, 112, 3)),
                build_key("variant", "int8", "sha-of-model", (32, 112, 112, 3))}) == 4


def test_an_entry_without_a_readable_manifest_is_deleted_and_built_again(tmp_path, caplog):
    cache = BuildCache(tmp_path / "cache", keep=4)
    source = tmp_path / "model.onnx"
    source.write_bytes(b"model")
    cache.keep("k", source)
    (tmp_path / "cache" / "k" / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert not cache.fetch("k", tmp_path / "out.onnx")
    assert "no readable manifest" in caplog.text and not (tmp_path / "cache" / "k").exists()
    cache.keep("k", source)
    assert cache.fetch("k", tmp_path / "out.onnx") and (tmp_path / "out.onnx").read_bytes() == b"model"
