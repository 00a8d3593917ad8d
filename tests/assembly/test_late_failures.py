"""Configurations a new user types that used to fail late (issue 22, item 3): each is refused by the
config check before any data generation, encoder pre-training, model building or MLflow run, naming
the key and what to do instead; the <unk> guard stops training on data the tokenizer cannot read."""
import io
import json
import tarfile

import pytest

from vtc.assembly.checks import check_config
from vtc.config import compose_conf
from vtc.errors import ConfigError


@pytest.fixture
def shard(tmp_path):
    """A local shard path that exists (the check only looks at existence)."""
    path = tmp_path / "train-000000.tar"
    path.touch()
    return str(path)


def refused(*overrides) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        check_config(compose_conf("train", overrides))
    return e.value


# Past the encoder and tokenizer refusals: a random-init tiny tower, an explicit tokenizer folder.
NO_TINY = ("encoder.pretrain=null", "encoder.path=null")


def test_llava_without_train_shards():
    e = refused("data=llava")
    assert e.key == "data.train_shards" and "is required with data=llava" in str(e) and "vtc.data.convert" in str(e)


def test_llava_with_the_tiny_encoders_pretraining_names_a_real_encoder(shard):
    """Used to die in encoder pre-training: TypeError from os.path.join(None, 'train')."""
    e = refused("data=llava", f"data.train_shards={shard}")
    assert e.key == "encoder" and "data.root is null" in str(e)
    assert "encoder=clip_l14_336 encoder.path=" in str(e) and "encoder.path=<data/encoders/tiny-clip" in str(e)


def test_pretraining_data_root_without_a_synthetic_split(shard, tmp_path):
    e = refused("data=llava", f"data.train_shards={shard}", f"encoder.pretrain.data_root={tmp_path}")
    assert e.key == "encoder.pretrain.data_root" and "train/index.json" in str(e)


def test_null_encoder_path_with_pretraining():
    e = refused("encoder.path=null")
    assert e.key == "encoder.path" and "encoder.pretrain=null" in str(e)


def test_llava_with_the_synthetic_tokenizer(shard):
    """llm=tiny's tokenizer is ${data.root}/tokenizer: 'None/tokenizer' under data=llava."""
    e = refused("data=llava", f"data.train_shards={shard}", *NO_TINY)
    assert e.key == "llm.tokenizer_path" and "real LLM's tokenizer" in str(e) and "llm=vicuna_7b llm.path=" in str(e)


def test_llava_without_test_shards_when_testing(shard, tmp_path):
    """Used to train to the end and only then stop with 'data.test_shards: no test shards'."""
    base = ("data=llava", f"data.train_shards={shard}", *NO_TINY, f"llm.tokenizer_path={tmp_path}")
    e = refused(*base)
    assert e.key == "data.test_shards" and "test=false" in str(e)
    check_config(compose_conf("train", [*base, "test=false"]))
    check_config(compose_conf("train", [*base, f"data.test_shards={shard}"]))


def test_optuna_sweep_without_val_shards(shard, tmp_path):
    """Without val shards training skips validation (fine), but an Optuna sweep scores each job by
    val/acc and fails on the None after the first trial; plain runs stay allowed."""
    from hydra.core.hydra_config import HydraConfig

    base = ["data=llava", f"data.train_shards={shard}", *NO_TINY, f"llm.tokenizer_path={tmp_path}", "test=false"]
    check_config(compose_conf("train", base))
    hydra_cfg = compose_conf("train", [*base, "hparams_search=optuna"], hydra_config=True)
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        with pytest.raises(ConfigError) as e:
            check_config(compose_conf("train", [*base, "hparams_search=optuna"]))
        assert e.value.key == "data.val_shards" and "optimized_metric=val/acc" in str(e.value)
        check_config(compose_conf("train", [*base, "hparams_search=optuna", f"data.val_shards={shard}"]))
    finally:
        HydraConfig.instance().cfg = None


def test_train_refuses_before_preparing_or_building(shard, monkeypatch):
    """The refusal comes from train()'s first step: prepare (data generation, encoder
    pre-training), the model and MLflow are never reached."""
    import vtc.train.task as T

    def never(*_a, **_k):
        pytest.fail("reached a stage after the config check")

    for name in ("prepare", "build_datamodule", "build_module", "build_loggers"):
        monkeypatch.setattr(T, name, never)
    with pytest.raises(ConfigError) as e:
        T.train(compose_conf("train", ["data=llava", f"data.train_shards={shard}"]))
    assert e.value.key == "encoder"


def test_eval_of_a_sharded_checkpoint_points_to_consolidate(tmp_path):
    from vtc.eval.task import evaluate

    ckpt = tmp_path / "last.ckpt"
    ckpt.mkdir()
    (ckpt / ".metadata").touch()  # what vtc.distributed.checkpoints.is_sharded_checkpoint looks for
    with pytest.raises(ConfigError) as e:
        evaluate(compose_conf("eval", [f"ckpt_path={ckpt}"]))
    assert e.value.key == "ckpt_path" and f"python -m vtc.distributed.consolidate --ckpt {ckpt} --out " in str(e.value)
    (ckpt / ".metadata").unlink()
    with pytest.raises(ConfigError, match="is a folder, not a checkpoint file"):
        evaluate(compose_conf("eval", [f"ckpt_path={ckpt}"]))


# -- the <unk> guard where training samples are tokenized (vtc.data.decode.SampleDecoder) ---------

KNOWN = "What digit is in row 2 , column 3 ?"


def record(answer: str) -> dict:
    return {"conversations": [{"from": "human", "value": KNOWN}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def tiny_tok(tmp_path):
    from vtc.data.tokenizer import build_tiny_tokenizer, is_word_level, load_tokenizer

    build_tiny_tokenizer([KNOWN, "seven none 3"], tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert is_word_level(tok)
    return tok


def decoder(tok, max_unk_fraction=0.05):
    from vtc.data.decode import SampleDecoder
    from vtc.data.image import ImageProcessor

    return SampleDecoder(tok, "vicuna_v1", 256, ImageProcessor(112), require_supervision=True,
                         max_unk_fraction=max_unk_fraction)


def test_unknown_answer_words_stop_training(tiny_tok):
    from vtc.data.skips import UNK_CHECK_AFTER, DataSkipError, DataStats, UnknownTokensError

    known, real = decoder(tiny_tok), decoder(tiny_tok)
    sample = {"__key__": "k", "json": json.dumps(record("seven none 3")).encode()}
    for _ in range(UNK_CHECK_AFTER // 4 + 1):  # 4 supervised tokens a sample, none <unk>
        known(sample)
    llava = {"__key__": "r", "json": json.dumps(record("A red double-decker bus parked by the curb")).encode()}
    with pytest.raises(UnknownTokensError) as e:
        for _ in range(UNK_CHECK_AFTER):
            real(llava)
    assert str(e.value).startswith("llm.tokenizer_path: ") and "real LLM's tokenizer" in str(e.value)
    assert "word-level" in str(e.value) and isinstance(e.value, DataSkipError)
    with pytest.raises(UnknownTokensError):  # the pipeline's skip handler re-raises, never counts it
        DataStats().handler("other", seen=False)(e.value)
    off = decoder(tiny_tok, max_unk_fraction=None)
    for _ in range(UNK_CHECK_AFTER):
        off(llava)


def test_datamodule_training_stream_raises_on_unknown_words(tiny_tok, tmp_path):
    from vtc.data.datamodule import VTCDataModule
    from vtc.data.skips import UnknownTokensError

    path = tmp_path / "llava-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(200):
            data = json.dumps(record("The man in the photo holds an umbrella over his head")).encode()
            info = tarfile.TarInfo(f"{i:06d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dm = VTCDataModule(train_shards=str(path), tokenizer_path=tiny_tok.name_or_path, batch_size=8, shuffle_buffer=8)
    with pytest.raises(UnknownTokensError, match="llm.tokenizer_path"):
        list(dm.train_dataloader())
