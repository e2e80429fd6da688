import os
import threading
import time
from pathlib import Path

import pytest

from difftool.exporters.cache import ArtifactCache, cache_key

BASE = {"weights": "abc", "precision": "fp32", "opset": 18, "torch": "2.13", "onnxruntime": "1.32", "profile": [1, 2]}


def builder(calls: list, payload: bytes = b"artifact", delay: float = 0.0):
    def build(folder: Path) -> dict:
        calls.append(folder)
        time.sleep(delay)
        (folder / "model.bin").write_bytes(payload)
        return {"validation": {"max_relative_error": 0.0}}

    return build


@pytest.mark.parametrize("component", sorted(BASE))
def test_every_key_component_changes_the_key(component: str) -> None:
    changed = {**BASE, component: "something else"}
    assert cache_key(changed) != cache_key(BASE)


def test_reuse_then_rebuild_on_key_change_removing_the_superseded(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path), []
    first = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    again = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    assert len(calls) == 1 and first.path == again.path
    assert again.manifest["components"] == BASE and "model.bin" in again.files
    upgraded = cache.get_or_build("onnx", "unet", {**BASE, "onnxruntime": "1.33"}, builder(calls))
    assert len(calls) == 2 and upgraded.path != first.path
    assert not first.path.exists()  # superseded entry removed


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "edit_manifest", "unrecorded_file_swap"])
def test_damaged_entry_is_rebuilt_not_loaded(tmp_path: Path, damage: str) -> None:
    cache, calls = ArtifactCache(tmp_path), []
    entry = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    model = entry.file("model.bin")
    if damage == "truncate":
        model.write_bytes(model.read_bytes()[:3])
    elif damage == "delete_manifest":
        entry.file("manifest.json").unlink()
    elif damage == "edit_manifest":
        entry.file("manifest.json").write_text("{not json")
    else:
        model.write_bytes(b"someone else's engine")
    assert [ok for _, ok in cache.entries()] == [False]
    rebuilt = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    assert len(calls) == 2 and rebuilt.file("model.bin").read_bytes() == b"artifact"
    assert [ok for _, ok in cache.entries()] == [True]


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls: list = []
    results: list = []

    def worker() -> None:
        results.append(ArtifactCache(tmp_path).get_or_build("onnx", "unet", BASE, builder(calls, delay=0.3)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({r.path for r in results}) == 1 and all(r.file("model.bin").read_bytes() == b"artifact" for r in results)


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(folder: Path) -> dict:
        (folder / "model.bin").write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        ArtifactCache(tmp_path).get_or_build("onnx", "unet", BASE, broken)
    assert ArtifactCache(tmp_path).entries() == []
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.is_dir()]


def test_unchanged_entries_are_not_hashed_again_in_one_process(tmp_path: Path, monkeypatch) -> None:
    from difftool.exporters import cache as cache_module

    cache, calls = ArtifactCache(tmp_path), []
    entry = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    hashed: list = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    cache.get_or_build("onnx", "unet", BASE, builder(calls))
    assert hashed == [] and len(calls) == 1  # a folder job's next image: no re-hashing of gigabytes
    # A same-size replacement (a new file renamed over it) is noticed and rebuilt, not loaded.
    swap = tmp_path / "swap.bin"
    swap.write_bytes(b"ARTIFACT")
    os.replace(swap, entry.file("model.bin"))
    rebuilt = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    assert len(calls) == 2 and rebuilt.file("model.bin").read_bytes() == b"artifact"
    hashed.clear()
    assert [ok for _, ok in cache.entries()] == [True] and hashed  # `cache verify` always hashes


def test_recent_keeps_the_last_few_by_key() -> None:
    from difftool.exporters.cache import Recent

    made: list = []
    recent = Recent(2)

    def make(key: str):
        return lambda: made.append(key) or object()

    a = recent.get("a", make("a"))
    assert recent.get("a", make("a")) is a
    recent.get("b", make("b"))
    recent.get("a", make("a"))  # a is now the most recent
    recent.get("c", make("c"))  # evicts b
    assert recent.get("a", make("a")) is a and made == ["a", "b", "c"]
    recent.get("b", make("b"))
    assert made == ["a", "b", "c", "b"]
