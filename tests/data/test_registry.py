import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO_DATA, SHARED_DATA, needs_full_data, shared_file
from trainer.data.formats import DataError, read_conversations
from trainer.data.registry import has_split, load_registry, registered_names, resolve_dataset, resolve_references

TANG_TRAIN_SHA = "b464f5acf5a0443f1cebb60604b4cc28dd4deb1d6e7edc1583283c1d9fc2783c"
CONTENT = b'[{"instruction": "q", "output": "a"}]\n'
CONTENT_SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Keep the user's cache and any data dir of the environment out of every test."""
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SFT_DATA_DIR", raising=False)


def write_registry(tmp_path: Path, url: str, sha256: str = CONTENT_SHA) -> Path:
    path = tmp_path / "registry.yaml"
    entry = {"format": "alpaca", "splits": {"train": {"url": url, "sha256": sha256}}}
    path.write_text(yaml.safe_dump({"datasets": {"toy": entry}}), encoding="utf-8")
    return path


def test_default_registry_lists_tang_huanhuan_and_the_demo_subset():
    registry = load_registry()
    assert registered_names() == ["huanhuan", "tang", "tang-demo"]
    assert registry["tang"]["splits"]["train"]["sha256"] == TANG_TRAIN_SHA
    assert has_split("tang", "test") and not has_split("huanhuan", "test")


def test_shipped_demo_files_match_their_registered_checksums():
    splits = load_registry()["tang-demo"]["splits"]
    for source in (splits["train"], splits["test"], splits["test"]["references"]):
        assert hashlib.sha256((DEMO_DATA.parent / source["path"]).read_bytes()).hexdigest() == source["sha256"]
    assert resolve_dataset("tang-demo") == [DEMO_DATA / "tang_train.json"]
    assert resolve_dataset("tang-demo", split="test") == [DEMO_DATA / "tang_test.json"]
    assert resolve_references("tang-demo", "test") == DEMO_DATA / "tang_test_gt.txt"


@needs_full_data
def test_full_sets_match_their_checksums_and_resolve_from_a_local_copy(tmp_path, monkeypatch):
    """An extra: the registered digests are those of the published files, which only the files themselves prove."""
    registry = load_registry()
    for name, split in (("tang", "train"), ("tang", "test"), ("huanhuan", "train")):
        source = registry[name]["splits"][split]
        path = shared_file(name, source["url"].rsplit("/", 1)[-1])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == source["sha256"]
    files = resolve_dataset("tang", data_dir=SHARED_DATA)
    assert files == [SHARED_DATA / "tang" / "Tang_training_data.json"]
    assert len(read_conversations(files[0]).conversations) == 5001
    shutil.copy(SHARED_DATA / "tang" / "Tang_testing_data.json", tmp_path / "Tang_testing_data.json")
    monkeypatch.setenv("SFT_DATA_DIR", str(tmp_path))
    assert resolve_dataset("tang", split="test") == [tmp_path / "Tang_testing_data.json"]
    monkeypatch.setenv("SFT_DATA_DIR", str(SHARED_DATA))
    assert resolve_dataset("tang,huanhuan") == [
        SHARED_DATA / "tang" / "Tang_training_data.json",
        SHARED_DATA / "huanhuan" / "huanhuan.json",
    ]


def test_resolves_a_local_copy_from_the_flag_or_the_environment_nested_or_flat(tmp_path, monkeypatch):
    """--data_dir DIR and SFT_DATA_DIR=DIR find DIR/<name>/<file> and DIR/<file>, checked, with no download."""
    registry = write_registry(tmp_path, (tmp_path / "unreachable" / "toy.json").as_uri())
    nested = tmp_path / "nested" / "toy" / "toy.json"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(CONTENT)
    assert resolve_dataset("toy", data_dir=tmp_path / "nested", registry_file=registry) == [nested]
    flat = tmp_path / "flat" / "toy.json"
    flat.parent.mkdir()
    flat.write_bytes(CONTENT)
    monkeypatch.setenv("SFT_DATA_DIR", str(tmp_path / "flat"))
    assert resolve_dataset("toy", registry_file=registry) == [flat]
    assert resolve_dataset(f"toy,{nested}", registry_file=registry) == [flat, nested]
    assert not (tmp_path / "cache" / "datasets").exists()  # nothing fetched or cached


def test_tampered_local_copy_names_expected_and_actual_digest(tmp_path):
    tampered = b'[{"instruction": "q", "output": "changed"}]'
    (tmp_path / "Tang_training_data.json").write_bytes(tampered)
    with pytest.raises(DataError) as caught:
        resolve_dataset("tang", data_dir=tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "Tang_training_data.json") in message
    assert f"expected {TANG_TRAIN_SHA}" in message
    assert f"actual {hashlib.sha256(tampered).hexdigest()}" in message


def test_download_verifies_caches_and_is_reused(tmp_path):
    source = tmp_path / "remote" / "toy.json"
    source.parent.mkdir()
    source.write_bytes(CONTENT)
    registry = write_registry(tmp_path, source.as_uri())
    [path] = resolve_dataset("toy", registry_file=registry)
    assert path == tmp_path / "cache" / "datasets" / "toy" / "toy.json"
    assert path.read_bytes() == CONTENT
    assert [p.name for p in path.parent.iterdir()] == ["toy.json"]  # no temporary file left behind
    source.unlink()  # a second resolve must come from the cache, not the network
    assert resolve_dataset("toy", registry_file=registry) == [path]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_downloaded_file_takes_the_umasks_mode(tmp_path, umask):
    """The download is staged in a mkstemp file (0600) and renamed: the cached copy must be the team's too."""
    import os
    import stat

    source = tmp_path / "toy.json"
    source.write_bytes(CONTENT)
    old = os.umask(umask)
    try:
        [path] = resolve_dataset("toy", registry_file=write_registry(tmp_path, source.as_uri()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_damaged_cache_is_fetched_again(tmp_path):
    source = tmp_path / "toy.json"
    source.write_bytes(CONTENT)
    registry = write_registry(tmp_path, source.as_uri())
    cached = tmp_path / "cache" / "datasets" / "toy" / "toy.json"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a fi")
    assert resolve_dataset("toy", registry_file=registry) == [cached]
    assert cached.read_bytes() == CONTENT


def test_download_with_wrong_checksum_is_not_kept(tmp_path):
    source = tmp_path / "toy.json"
    source.write_bytes(CONTENT)
    wrong = "0" * 64
    registry = write_registry(tmp_path, source.as_uri(), sha256=wrong)
    with pytest.raises(DataError) as caught:
        resolve_dataset("toy", registry_file=registry)
    message = str(caught.value)
    assert source.as_uri() in message and f"expected {wrong}" in message and f"actual {CONTENT_SHA}" in message
    assert list((tmp_path / "cache" / "datasets" / "toy").iterdir()) == []


def test_unreachable_url_explains_how_to_use_a_local_copy(tmp_path):
    registry = write_registry(tmp_path, (tmp_path / "missing" / "toy.json").as_uri())
    with pytest.raises(DataError) as caught:
        resolve_dataset("toy", registry_file=registry, data_dir=tmp_path / "empty")
    message = str(caught.value)
    for needed in ("--data_dir", "SFT_DATA_DIR", "toy.json", CONTENT_SHA, "--dataset /path/to/toy.json"):
        assert needed in message
    assert str(tmp_path / "empty" / "toy" / "toy.json") in message  # says where it looked
    assert list((tmp_path / "cache" / "datasets" / "toy").iterdir()) == []


def test_unknown_name_lists_registered_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"unknown dataset 'alpaca_zh'.*registered names: huanhuan, tang"):
        resolve_dataset("alpaca_zh")
    with pytest.raises(DataError, match="unknown dataset"):
        has_split("alpaca_zh", "train")


def test_missing_split_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no split 'test'; it has: train"):
        resolve_dataset("huanhuan", split="test", data_dir=tmp_path)


def test_paths_files_and_folders_mix_with_names(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name in ("b.jsonl", "a.json", "notes.txt"):
        (folder / name).write_text("[]", encoding="utf-8")
    single = tmp_path / "one.jsonl"
    single.write_text("{}", encoding="utf-8")
    assert resolve_dataset(f"{folder}, {single}") == [folder / "a.json", folder / "b.jsonl", single]
    with pytest.raises(DataError, match="not found"):
        resolve_dataset(str(tmp_path / "nope.json"))
    assert resolve_dataset(str(folder / "notes.txt")) == [folder / "notes.txt"]  # named: a text document
    (folder / "notes.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match=r"must end in \.json, \.jsonl, \.parquet or \.txt"):
        resolve_dataset(str(folder / "notes.csv"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("b.txt", "a.txt"):
        (corpus / name).write_text("text", encoding="utf-8")
    assert resolve_dataset(str(corpus)) == [corpus / "a.txt", corpus / "b.txt"]  # a folder of documents


def test_broken_registry_file_is_reported(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text("datasets:\n  toy:\n    splits:\n      train: {url: 'file:///x', sha256: abc}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"toy\.train needs a 'sha256'"):
        load_registry(path)
