"""Offline WordNet: nltk's reader works, preparing from the Debian database, clear errors without one."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import nltk
import pytest

from crossmodal_kd.clip.wordnet import (
    DEFAULT_SOURCE,
    LEXNAMES,
    REQUIRED_FILES,
    SOURCE_ENV,
    WordNetUnavailableError,
    lexnames_text,
    load_wordnet,
    prepare_wordnet,
)

needs_debian_wordnet = pytest.mark.skipif(
    not (DEFAULT_SOURCE / "data.noun").is_file(),
    reason="Debian WordNet not installed (apt-get install wordnet-base wordnet-sense-index)",
)


@pytest.fixture(scope="module")
def wn(tmp_path_factory):
    return load_wordnet(nltk_data=tmp_path_factory.getbasetemp() / "nltk_data")


def test_load_wordnet_answers_synsets_hypernyms_and_lexnames(wn):
    dog = wn.synset("dog.n.01")
    assert {"canine.n.02", "domestic_animal.n.01"} <= {s.name() for s in dog.hypernyms()}
    assert dog.lexname() == "noun.animal"
    assert "domestic_dog" in dog.lemma_names()
    assert wn.synsets("dogs", pos="n")[0] == dog  # morphology (noun.exc + rules) works
    assert load_wordnet() is wn  # a second call reuses the loaded reader


def test_lexnames_is_the_standard_wordnet_list():
    lines = lexnames_text().splitlines()
    assert len(LEXNAMES) == len(lines) == 45
    assert lines[0] == "00\tadj.all\t3"
    assert lines[3] == "03\tnoun.Tops\t1"
    assert lines[5] == "05\tnoun.animal\t1"
    assert lines[29] == "29\tverb.body\t2"
    assert lines[44] == "44\tadj.ppl\t3"


@needs_debian_wordnet
@pytest.mark.filterwarnings("ignore:The multilingual functions are not available")
def test_prepare_from_debian_files_private_idempotent_and_concurrent(tmp_path, monkeypatch):
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = tmp_path / "nltk_data"
    root.mkdir()
    os.chmod(root, 0o777)  # nltk refuses a world-writable root: prepare must tighten it
    results, errors = [], []

    def prepare():
        try:
            results.append(prepare_wordnet(DEFAULT_SOURCE, root))
        except Exception as exc:  # noqa: BLE001 - any failure is reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [root, root]
    corpus = root / "corpora" / "wordnet"
    assert sorted(p.name for p in (root / "corpora").iterdir()) == ["wordnet"]  # no temp folders left
    assert (corpus / "lexnames").read_text() == lexnames_text()
    for path in [root, root / "corpora", corpus, *corpus.iterdir()]:
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), path
    before = (corpus / "data.noun").stat().st_mtime_ns
    assert prepare_wordnet(DEFAULT_SOURCE, root) == root
    assert (corpus / "data.noun").stat().st_mtime_ns == before  # already there: nothing copied

    monkeypatch.setattr(nltk.data, "path", [str(root)])  # nltk only reads corpora under its data path
    reader = WordNetCorpusReader(str(corpus), None)
    dog = reader.synset("dog.n.01")
    assert dog.lexname() == "noun.animal"
    assert "canine.n.02" in {s.name() for s in dog.hypernyms()}


@needs_debian_wordnet
def test_an_incomplete_prepared_folder_is_rebuilt(tmp_path):
    corpus = tmp_path / "corpora" / "wordnet"
    corpus.mkdir(parents=True)
    (corpus / "data.noun").write_text("truncated")
    prepare_wordnet(DEFAULT_SOURCE, tmp_path)
    assert all((corpus / f).is_file() for f in REQUIRED_FILES)
    assert (corpus / "data.noun").stat().st_size == (DEFAULT_SOURCE / "data.noun").stat().st_size


@pytest.fixture
def no_nltk_data(monkeypatch):
    """nltk finds no data of its own, so load_wordnet must prepare it."""
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.delenv("NLTK_DATA", raising=False)


def test_missing_source_says_what_to_install(tmp_path, no_nltk_data, monkeypatch):
    missing = tmp_path / "no_wordnet_here"
    with pytest.raises(WordNetUnavailableError) as info:
        load_wordnet(source=missing, nltk_data=tmp_path / "nltk_data")
    msg = str(info.value)
    assert str(missing) in msg
    assert "apt-get install wordnet-base wordnet-sense-index" in msg
    assert "nltk.downloader wordnet" in msg
    monkeypatch.setenv(SOURCE_ENV, str(missing))  # the environment variable is the default source
    with pytest.raises(WordNetUnavailableError, match=str(missing)):
        load_wordnet(nltk_data=tmp_path / "nltk_data")
    assert not (tmp_path / "nltk_data").exists()  # nothing half-made


def test_incomplete_source_names_the_missing_files(tmp_path, no_nltk_data):
    source = tmp_path / "wordnet"
    source.mkdir()
    (source / "data.noun").write_text("")
    with pytest.raises(
        WordNetUnavailableError, match=r"incomplete \(missing index\.noun, index\.verb, .*index\.sense"
    ):
        prepare_wordnet(source, tmp_path / "nltk_data")


def test_default_cache_root_follows_the_environment(monkeypatch, tmp_path):
    from crossmodal_kd.clip.wordnet import default_cache_root

    monkeypatch.delenv("CROSSMODAL_KD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "crossmodal_kd"
    monkeypatch.setenv("CROSSMODAL_KD_CACHE", str(tmp_path / "mine"))
    assert default_cache_root() == Path(tmp_path / "mine")
