"""The engine registry: versions, the atomic `current` pointer, removal, and its CLI."""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from engines.errors import ArtifactError, RegistryError
from engines.manifest import (
    MANIFEST_NAME,
    Manifest,
    estimate_memory_bytes,
    hash_files,
    list_files,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from engines.registry import CURRENT, EngineRegistry, model_dir
from engines.source import DEFAULT_MODEL_ID

MODEL = "org/tiny-model"


def _fake(root: Path, version: str, payload: bytes = b"weights", model_id: str = MODEL) -> Path:
    """A small artifact that verifies like a real one (the registry never looks inside)."""
    path = model_dir(root, model_id) / version
    (path / "tokenizer").mkdir(parents=True)
    (path / "model.onnx").write_bytes(payload * 100)
    (path / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    write_manifest(path, Manifest(
        model_id=model_id, version=version, content_hash=version * 4, precision="fp32",
        backend="onnxruntime", head="similarity", max_length=16, output_dim=8,
        tokenizer_id="sha256:x", files=hash_files(path, list_files(path)),
        created_at=time.time(), memory_bytes=1234))
    return path


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[EngineRegistry, str, str]:
    _fake(tmp_path, "aaaaaaaaaaaa", b"a")
    _fake(tmp_path, "bbbbbbbbbbbb", b"b")
    return EngineRegistry(tmp_path), "aaaaaaaaaaaa", "bbbbbbbbbbbb"


def test_list_show_and_get_current(two_versions: tuple[EngineRegistry, str, str]) -> None:
    reg, a, b = two_versions
    with pytest.raises(RegistryError, match="no version of org/tiny-model is promoted"):
        reg.get(MODEL)
    assert [(e.version, e.current) for e in reg.list()] == [(a, False), (b, False)]
    assert reg.promote(MODEL, b, smoke=False) == model_dir(reg.root, MODEL) / b
    assert reg.current(MODEL) == b and reg.get(MODEL).name == b
    assert reg.get(MODEL, a).name == a
    assert [(e.version, e.current) for e in reg.list(MODEL)] == [(a, False), (b, True)]
    assert reg.show(MODEL).version == b and reg.show(MODEL, a).version == a
    assert reg.list("org/other") == []
    # In-flight dot entries and damaged versions: never listed as good ones.
    (model_dir(reg.root, MODEL) / ".build-x").mkdir()
    (model_dir(reg.root, MODEL) / "broken").mkdir()
    entries = {e.version: e for e in reg.list()}
    assert set(entries) == {a, b, "broken"}
    assert entries["broken"].manifest is None and "missing" in (entries["broken"].problem or "")


def test_promote_is_atomic_under_a_concurrent_reader(
        two_versions: tuple[EngineRegistry, str, str]) -> None:
    reg, a, b = two_versions
    reg.promote(MODEL, a, smoke=False)
    done = threading.Event()
    promotions = 0
    seen: dict[str, int] = {a: 0, b: 0}
    problems: list[str] = []

    def promote_back_and_forth() -> None:
        nonlocal promotions
        try:
            for i in range(300):
                reg.promote(MODEL, b if i % 2 == 0 else a, smoke=False)
                promotions += 1
        finally:
            done.set()

    def read() -> None:
        reads = 0
        while reads < 1000 or not done.is_set():
            try:
                path = reg.get(MODEL)
                manifest = verify_artifact(path)  # whole and intact, every time
                assert path.name in seen and manifest.version == path.name
                seen[path.name] += 1
            except Exception as exc:  # collected: an assert in a thread would be lost
                problems.append(repr(exc))
            reads += 1

    threads = [threading.Thread(target=promote_back_and_forth), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert promotions == 300
    assert problems == []
    assert sum(seen.values()) >= 1000 and seen[a] > 0 and seen[b] > 0, seen
    assert reg.current(MODEL) == a  # 300 flips end where they began
    leftovers = [p.name for p in model_dir(reg.root, MODEL).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_promote_refuses_missing_corrupt_or_misplaced_versions(
        two_versions: tuple[EngineRegistry, str, str]) -> None:
    reg, a, b = two_versions
    reg.promote(MODEL, a, smoke=False)
    with pytest.raises(RegistryError, match=r"no version 'cccccccccccc'.*versions here"):
        reg.promote(MODEL, "cccccccccccc", smoke=False)
    with pytest.raises(RegistryError, match="not a valid engine version"):
        reg.promote(MODEL, "../elsewhere", smoke=False)
    weights = model_dir(reg.root, MODEL) / b / "model.onnx"
    data = bytearray(weights.read_bytes())
    data[5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: checksum mismatch"):
        reg.promote(MODEL, b, smoke=False)
    # A version directory whose manifest names another version is refused too.
    os.replace(model_dir(reg.root, MODEL) / b, model_dir(reg.root, MODEL) / "renamed")
    shutil.copytree(model_dir(reg.root, MODEL) / a, model_dir(reg.root, MODEL) / "copy")
    with pytest.raises(ArtifactError, match="manifest says org/tiny-model aaaaaaaaaaaa"):
        reg.promote(MODEL, "copy", smoke=False)
    assert reg.current(MODEL) == a


BAD_MODEL_IDS = [".", "..", "", " ", "./", ".hidden", "../up", "..\\up", "a\\..\\..\\b",
                 "a\x00b", "a\nb"]


@pytest.mark.parametrize("model_id", BAD_MODEL_IDS)
def test_model_ids_that_are_not_one_directory_under_the_root_are_refused(
        tmp_path: Path, model_id: str) -> None:
    root = tmp_path / "engines"
    # What "." and ".." would reach: versions in the root itself, and beside it.
    for where in (root, tmp_path):
        _fake(where, "placed", model_id="org/placed")
        os.replace(model_dir(where, "org/placed") / "placed", where / "victim")
        (where / CURRENT).write_text("victim\n")
    reg = EngineRegistry(root)
    calls = {
        "model_dir": lambda: model_dir(root, model_id),
        "current": lambda: reg.current(model_id),
        "get": lambda: reg.get(model_id, "victim"),
        "get current": lambda: reg.get(model_id),
        "promote": lambda: reg.promote(model_id, "victim", smoke=False),
        "remove": lambda: reg.remove(model_id, "victim", force=True),
        "list": lambda: reg.list(model_id),
    }
    for name, call in calls.items():
        with pytest.raises(RegistryError, match="is not a valid model id") as info:
            call()
        assert repr(model_id) in str(info.value), name
    assert (root / "victim" / MANIFEST_NAME).is_file()
    assert (tmp_path / "victim" / MANIFEST_NAME).is_file()


@pytest.mark.parametrize("model_id", [MODEL, "name.v1.5", "a..b", "org/..", "org/.x", "-x"])
def test_unusual_but_contained_model_ids_still_work(tmp_path: Path, model_id: str) -> None:
    assert model_dir(tmp_path, model_id).parent == tmp_path
    _fake(tmp_path, "aaaaaaaaaaaa", model_id=model_id)
    reg = EngineRegistry(tmp_path)
    reg.promote(model_id, "aaaaaaaaaaaa", smoke=False)
    assert reg.get(model_id) == model_dir(tmp_path, model_id) / "aaaaaaaaaaaa"


def test_remove_refuses_the_current_version_unless_forced(
        two_versions: tuple[EngineRegistry, str, str]) -> None:
    reg, a, b = two_versions
    reg.promote(MODEL, a, smoke=False)
    with pytest.raises(RegistryError, match="is current"):
        reg.remove(MODEL, a)
    reg.remove(MODEL, b)
    mdir = model_dir(reg.root, MODEL)
    assert sorted(p.name for p in mdir.iterdir()) == [a, CURRENT]  # no trash left behind
    with pytest.raises(RegistryError, match="no version 'bbbbbbbbbbbb'"):
        reg.remove(MODEL, b)
    reg.remove(MODEL, a, force=True)
    assert reg.current(MODEL) is None and reg.list() == []
    with pytest.raises(RegistryError, match="no version of org/tiny-model is promoted"):
        reg.get(MODEL)


def test_memory_estimate_and_old_manifests(tmp_path: Path) -> None:
    assert estimate_memory_bytes(1000, max_length=256, hidden_size=384, num_layers=6) == (
        1000 + 64 * 256 * 384 * 6 * 4 * 2)
    path = _fake(tmp_path, "aaaaaaaaaaaa")
    raw = orjson.loads((path / MANIFEST_NAME).read_bytes())
    del raw["memory_bytes"]  # as written before the field existed
    (path / MANIFEST_NAME).write_bytes(orjson.dumps(raw))
    assert read_manifest(path).memory_bytes == 0


# -- on the real default engine -------------------------------------------------------------


def _link_tree(src: Path, dst: Path) -> None:
    # Hard links keep copies of the 90 MB engine free; rewritten files are replaced (new
    # inode), never written in place, so the session's artifact is never touched.
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


@pytest.fixture
def real_root(default_engine_path: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """An engine dir holding the default engine as itself and as a second version."""
    root = tmp_path / "engines"
    v1 = default_engine_path.name
    v2 = "fedcba987654"
    mdir = model_dir(root, DEFAULT_MODEL_ID)
    _link_tree(default_engine_path, mdir / v1)
    _link_tree(default_engine_path, mdir / v2)
    manifest = read_manifest(mdir / v2)
    write_manifest(mdir / v2, dataclasses.replace(manifest, version=v2,
                                                  content_hash=v2 + manifest.content_hash[12:]))
    return root, v1, v2


@pytest.mark.slow
def test_first_build_is_promoted_and_carries_a_memory_estimate(
        default_engine_path: Path, engine_root: Path) -> None:
    reg = EngineRegistry(engine_root)
    assert reg.get(DEFAULT_MODEL_ID) == default_engine_path
    manifest = reg.show(DEFAULT_MODEL_ID)
    weights = (default_engine_path / "model.onnx").stat().st_size
    assert manifest.memory_bytes == estimate_memory_bytes(
        weights, max_length=manifest.max_length, hidden_size=384, num_layers=6)


@pytest.mark.slow
def test_find_artifact_serves_the_promoted_version(real_root: tuple[Path, str, str]) -> None:
    from engines.select import EngineSettings, find_artifact

    root, _, v2 = real_root
    EngineRegistry(root).promote(DEFAULT_MODEL_ID, v2, smoke=False)
    assert find_artifact(EngineSettings(engine_dir=root)).name == v2


@pytest.mark.slow
def test_cli_list_show_promote_remove(real_root: tuple[Path, str, str]) -> None:
    from qscore.cli.app import app

    root, v1, v2 = real_root
    run = CliRunner().invoke
    dirs = ["--engine-dir", str(root)]
    for cmd in ("list", "show", "promote", "remove", "verify"):
        assert run(app, ["engine", cmd, "--help"]).exit_code == 0
    shown = run(app, ["engine", "show", "default", *dirs])
    assert shown.exit_code == 2 and "no version of" in shown.output

    promoted = run(app, ["engine", "promote", "default", v2, *dirs])  # with the smoke run
    assert promoted.exit_code == 0, promoted.output
    listed = run(app, ["engine", "list", "--json", *dirs])
    assert listed.exit_code == 0, listed.output
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert {(r["version"], r["current"]) for r in rows} == {(v1, False), (v2, True)}
    assert all(r["memory_bytes"] > 0 for r in rows)
    table = run(app, ["engine", "list", *dirs])
    assert table.exit_code == 0 and v2 in table.stdout and "*" in table.stdout

    shown = run(app, ["engine", "show", "default", *dirs])
    assert shown.exit_code == 0, shown.output
    assert orjson.loads(shown.stdout)["version"] == v2
    assert orjson.loads(run(app, ["engine", "show", "default", v1, *dirs]).stdout)[
        "version"] == v1

    refused = run(app, ["engine", "remove", "default", v2, *dirs])
    assert refused.exit_code == 2 and "is current" in refused.output
    assert run(app, ["engine", "remove", "default", v1, *dirs]).exit_code == 0
    assert not (model_dir(root, DEFAULT_MODEL_ID) / v1).exists()
    bad = run(app, ["engine", "promote", "default", v1, *dirs])
    assert bad.exit_code == 2 and "no version" in bad.output
