"""WordNet 3.0 for nltk, offline: an existing nltk install, else prepared from the Debian database.

nltk's ``wordnet`` corpus reader needs a folder ``<nltk_data>/corpora/wordnet`` holding the WordNet
database files plus ``lexnames``. Debian's ``wordnet-base`` and ``wordnet-sense-index`` packages put
the database in ``/usr/share/wordnet`` but omit ``lexnames``; :func:`prepare_wordnet` copies the files
into a private cache folder (nltk refuses folders that other accounts can write) and writes the
standard ``lexnames`` list, so nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_ENV = "CROSSMODAL_KD_WORDNET"
"""Environment variable naming the folder with the WordNet database files (default below)."""
DEFAULT_SOURCE = Path("/usr/share/wordnet")
CACHE_ENV = "CROSSMODAL_KD_CACHE"
"""Environment variable overriding the cache root (default ``$XDG_CACHE_HOME/crossmodal_kd``)."""

REQUIRED_FILES = (
    "index.noun", "index.verb", "index.adj", "index.adv",
    "data.noun", "data.verb", "data.adj", "data.adv",
    "noun.exc", "verb.exc", "adj.exc", "adv.exc",
    "index.sense", "cntlist.rev",
)  # fmt: skip
"""Database files nltk's reader opens (besides ``lexnames``); ``index.sense`` is wordnet-sense-index's."""

LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
"""The 45 WordNet 3.0 lexicographer files, in file-number order (the ``lexnames`` file Debian omits)."""
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

INSTALL_HINT = (
    "install the WordNet database with `apt-get install wordnet-base wordnet-sense-index` "
    f"(or point {SOURCE_ENV} at a folder holding it), or, online, run `python -m nltk.downloader wordnet`"
)


class WordNetUnavailableError(RuntimeError):
    """Neither nltk's data nor a WordNet database to prepare it from was found."""


def default_cache_root() -> Path:
    """``$CROSSMODAL_KD_CACHE``, else ``$XDG_CACHE_HOME/crossmodal_kd``, else ``~/.cache/crossmodal_kd``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "crossmodal_kd"


def lexnames_text() -> str:
    """The ``lexnames`` file: ``NN<TAB>name<TAB>pos-number`` per line."""
    return "".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def prepare_wordnet(source: str | Path | None = None, nltk_data: str | Path | None = None) -> Path:
    """Make ``<nltk_data>/corpora/wordnet`` from the database in ``source``; return ``nltk_data``.

    ``source`` defaults to ``$CROSSMODAL_KD_WORDNET`` or ``/usr/share/wordnet``; ``nltk_data`` to
    ``<cache root>/nltk_data``. Idempotent, and safe when several processes prepare at once: the copy
    is made in a temporary folder and renamed into place, and the first complete one wins.
    """
    source = Path(source or os.environ.get(SOURCE_ENV) or DEFAULT_SOURCE)
    root = Path(nltk_data) if nltk_data else default_cache_root() / "nltk_data"
    target = root / "corpora" / "wordnet"
    if _is_complete(target):
        return root
    if problem := _database_problem(source):
        raise WordNetUnavailableError(problem)
    for folder in (root, root / "corpora"):
        _private_dir(folder)
    if target.exists():  # left broken by hand or by an old tool: it is generated, so replace it
        log.warning("WordNet: %s is incomplete; preparing it again from %s", target, source)
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=root / "corpora"))
    try:
        for entry in source.iterdir():
            if entry.is_file():
                shutil.copyfile(entry, tmp / entry.name)
                os.chmod(tmp / entry.name, 0o644)
        if not (tmp / "lexnames").is_file():
            (tmp / "lexnames").write_text(lexnames_text())
            os.chmod(tmp / "lexnames", 0o644)
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its complete copy first
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("WordNet: prepared %s from %s", target, source)
    return root


def _database_problem(source: Path) -> str | None:
    if not source.is_dir():
        return f"WordNet: no database folder at {source}; {INSTALL_HINT}"
    missing = [f for f in REQUIRED_FILES if not (source / f).is_file()]
    if missing:
        return f"WordNet: the database at {source} is incomplete (missing {', '.join(missing)}); {INSTALL_HINT}"
    return None


def wordnet_problem() -> str | None:
    """Why :func:`load_wordnet` (default arguments) would fail, found cheaply (nothing read or copied), or None."""
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        return None
    except LookupError:
        pass
    if _is_complete(default_cache_root() / "nltk_data" / "corpora" / "wordnet"):
        return None
    return _database_problem(Path(os.environ.get(SOURCE_ENV) or DEFAULT_SOURCE))


def load_wordnet(source: str | Path | None = None, nltk_data: str | Path | None = None):
    """nltk's ``wordnet`` corpus reader, working offline.

    Uses nltk data already installed (``nltk.data.find('corpora/wordnet')``); else prepares it with
    :func:`prepare_wordnet` (same arguments), adds that folder to ``nltk.data.path`` and checks that
    ``synsets('dog')`` answers. Raises :class:`WordNetUnavailableError` saying what to install.
    """
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        root = str(prepare_wordnet(source, nltk_data))
        if root not in nltk.data.path:
            nltk.data.path.insert(0, root)
    from nltk.corpus import wordnet

    try:
        ok = bool(wordnet.synsets("dog"))
    except (LookupError, OSError) as exc:
        raise WordNetUnavailableError(
            f"WordNet: nltk cannot read its wordnet corpus ({exc}); {INSTALL_HINT}"
        ) from exc
    if not ok:
        raise WordNetUnavailableError(
            f"WordNet: nltk's wordnet corpus has no synset for 'dog': it is broken; {INSTALL_HINT}"
        )
    return wordnet


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*REQUIRED_FILES, "lexnames"))


def _private_dir(folder: Path) -> None:
    """Create ``folder`` (0o755); refuse one that other accounts may write, as nltk would."""
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            os.chmod(folder, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
        except PermissionError as exc:
            raise PermissionError(
                f"WordNet: {folder} is writable by other accounts and not ours to fix, so nltk would refuse "
                f"it; set {CACHE_ENV} to a folder you own"
            ) from exc
