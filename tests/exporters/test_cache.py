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


# --- issue 30, item 2: superseding never by name alone, never what another process holds ------------

ENGINE = {"onnx": "export-1", "model": "weights-a", "gpu": "RTX 4090 24564 MiB", "compute_capability": "8.9",
          "precision": "fp16", "profiles": [[1, 64, 128]], "refittable": False,
          "tensorrt": "10.16", "format": 4}  # fmt: skip


def test_engines_of_other_gpus_precisions_and_profiles_survive_a_build(tmp_path: Path) -> None:
    """Engine names carry none of these key parts: removing every `{name}-*` killed cuda:0's engine
    when cuda:1's was built, fp16's when bf16's was, one image-size range's when another's was."""
    cache, calls = ArtifactCache(tmp_path), []
    variants = [
        ENGINE,
        {**ENGINE, "gpu": "RTX A2000 12282 MiB", "compute_capability": "8.6"},  # --device cuda:1
        {**ENGINE, "precision": "bf16"},
        {**ENGINE, "profiles": [[1, 128, 256]]},
        {**ENGINE, "model": "weights-b", "onnx": "export-9"},  # another model sharing the name (unnamed)
    ]
    entries = [cache.get_or_build("tensorrt", "unet-abc-fp32", v, builder(calls)) for v in variants]
    assert len(calls) == 5 and all(e.path.is_dir() for e in entries)
    # the same model on the same GPU, exported again by newer tools: that one (and only it) is replaced
    upgraded = cache.get_or_build("tensorrt", "unet-abc-fp32", {**ENGINE, "onnx": "export-2", "tensorrt": "10.17"},
                                  builder(calls))  # fmt: skip
    assert not entries[0].path.exists() and upgraded.path.is_dir()
    assert all(e.path.is_dir() for e in entries[1:])


def test_an_older_format_missing_a_component_is_not_guessed_at(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path), []
    old = cache.get_or_build("tensorrt", "unet-abc-fp32", {k: v for k, v in ENGINE.items() if k != "gpu"},
                             builder(calls))  # fmt: skip
    cache.get_or_build("tensorrt", "unet-abc-fp32", {**ENGINE, "format": 5}, builder(calls))
    assert old.path.is_dir()  # it cannot be told which GPU it was for: kept, not deleted


def test_an_entry_another_process_uses_is_never_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    cache, calls = ArtifactCache(tmp_path), []
    first = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    script = (
        "import sys; from pathlib import Path; from difftool.exporters.cache import ArtifactCache\n"
        f"BASE = {BASE!r}\n"
        "entry = ArtifactCache(Path(sys.argv[1])).get_or_build('onnx', 'unet', BASE, lambda f: {})\n"
        "print(entry.path, flush=True); sys.stdin.read()\n"  # holds the entry until its stdin closes
    )
    user = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert user.stdout.readline().strip() == str(first.path)  # the other process loaded it (no rebuild)
        cache.get_or_build("onnx", "unet", {**BASE, "onnxruntime": "1.33"}, builder(calls))
        assert first.path.is_dir() and first.file("model.bin").read_bytes() == b"artifact"
    finally:
        user.stdin.close()
        user.wait(timeout=60)
    cache.get_or_build("onnx", "unet", {**BASE, "onnxruntime": "1.34"}, builder(calls))
    assert not first.path.exists()  # released: now it is superseded like any other


def test_clear_neither_follows_nor_counts_a_symlinked_entry(tmp_path: Path) -> None:
    """Issue 29 item 20: `cache clear` reported removing a symlinked entry it never removed."""
    cache = ArtifactCache(tmp_path / "cache")
    real = cache.get_or_build("onnx", "unet", BASE, builder([]))
    elsewhere = tmp_path / "elsewhere"  # an entry copied out of the cache, then linked back in
    import shutil

    shutil.copytree(real.path, elsewhere)
    (real.path.parent / "linked-entry").symlink_to(elsewhere)
    assert cache.clear() == 1
    assert not real.path.exists() and (elsewhere / "model.bin").exists()


def test_an_unwritable_cache_names_difftool_cache(tmp_path: Path) -> None:
    """Issue 29 item 20: it was reported as 'cannot be exported, use --backend torch'."""
    from difftool.core.errors import OutputError

    (tmp_path / "onnx").write_text("a file where the cache's folder should be")
    with pytest.raises(OutputError, match="artifact cache cannot be written.*DIFFTOOL_CACHE"):
        ArtifactCache(tmp_path).get_or_build("onnx", "unet", BASE, builder([]))


def test_a_new_process_checks_the_build_time_stats_not_every_byte_and_sees_a_forged_mtime(
    tmp_path: Path, monkeypatch
) -> None:
    """Hashed once at build (issue 30, item 10): a 15 GB engine is not hashed again by every process."""
    from difftool.core.runtime import current
    from difftool.exporters import cache as cache_module

    cache, calls = ArtifactCache(tmp_path), []
    entry = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    assert set(entry.manifest["stats"]) == set(entry.manifest["files"]) == {"model.bin"}
    hashed: list = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    current().cache("artifact-hashes", dict).clear()  # what another process starts with
    assert cache.get_or_build("onnx", "unet", BASE, builder(calls)).path == entry.path
    assert hashed == [] and len(calls) == 1
    # Edited in place, same size, its mtime set back: the change time still tells.
    model = entry.file("model.bin")
    before = model.stat()
    model.write_bytes(b"ARTIFACT")
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))
    current().cache("artifact-hashes", dict).clear()
    rebuilt = cache.get_or_build("onnx", "unet", BASE, builder(calls))
    assert len(calls) == 2 and rebuilt.file("model.bin").read_bytes() == b"artifact" and hashed
