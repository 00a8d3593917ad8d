"""Configurations that cannot work fail before anything is built, naming the key to change."""
import pytest
from hydra import compose, initialize_config_dir

import vtc.config  # noqa: F401
from vtc.assembly.checks import check_config
from vtc.config import CONF_DIR
from vtc.errors import ConfigError


def cfg(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides,key,words",
    [
        (["compressor=pool", "compressor.stride=5"], "compressor.stride", "does not divide the 8x8 patch grid"),
        (["compressor=pool", "compressor.stride=-2"], "compressor.stride", "positive"),
        (["compressor=vcc", "compressor.layer=9"], "compressor.layer", "outside the LLM's layers"),
        (["encoder=clip_l14_336", "encoder.path=/nonexistent/clip"], "encoder.path", "does not exist"),
        (["encoder=clip_l14_336"], "encoder.path", "is required"),
        (["llm=vicuna_7b", "llm.path=/nonexistent/vicuna"], "llm.path", "does not exist"),
        (["data.image_size=224"], "data.image_size", "cannot go into an encoder built for 112"),
        (["data=llava", "data.train_shards='/nonexistent/shard-{000..001}.tar'", "llm.tokenizer_path=x"],
         "data.train_shards", "does not exist"),
        (["trainer.max_steps=0"], "trainer.max_steps", "positive"),
        (["data.generate.train_readout=3"], "data.generate.train_readout", "must be in 0..2"),
        (["data.generate.train_turns=1"], "data.generate.train_readout", "must be in 0..0"),
        (["data.generate.train_turns=0", "data.generate.train_readout=0"], "data.generate.train_turns", ">= 1"),
        (["trainer=fsdp", "trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val", "refuses under FSDP1"),
    ],
)
def test_bad_config_names_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        check_config(cfg(*overrides))
    assert e.value.key == key and words in str(e.value)


def test_default_config_passes():
    info, depth = check_config(cfg())
    assert info.grid == 8 and depth == 4
