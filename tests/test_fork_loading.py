"""The forks load checkpoints exactly as upstream does, including the original (legacy) key layout.

transformers treats classes defined outside its package as custom code and skips its
checkpoint key conversions for them; a fork that did not undo this would load a real
llava-hf or Qwen2.5-VL checkpoint with its language-model weights missing (random) and
produce garbled text: the founding regression of this project.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from models.llava import modeling_llava as llava_fork
from models.qwen2_5_vl import modeling_qwen2_5_vl as qwen_fork
from models.tiny import seeded_init_


def tiny_qwen2_5_vl_config():
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]),
        image_token_id=290, video_token_id=291, vision_start_token_id=292,
    )


def tiny_llava_config():
    return transformers.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
        image_token_id=299,
    )


CASES = {
    "llava": (tiny_llava_config, transformers.LlavaForConditionalGeneration, llava_fork.LlavaForConditionalGeneration),
    "qwen2_5_vl": (tiny_qwen2_5_vl_config, transformers.Qwen2_5_VLForConditionalGeneration, qwen_fork.Qwen2_5_VLForConditionalGeneration),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("original_format", [True, False])
def test_fork_loads_checkpoint_identically_to_upstream(tmp_path, name, original_format):
    make_config, upstream_cls, fork_cls = CASES[name]
    model = upstream_cls(make_config()).eval()
    seeded_init_(model, seed=3)
    model.save_pretrained(tmp_path, save_original_format=original_format)
    upstream, info_up = upstream_cls.from_pretrained(tmp_path, output_loading_info=True)
    fork, info_fork = fork_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info_fork["missing_keys"] and not info_fork["unexpected_keys"], info_fork
    assert info_fork["missing_keys"] == info_up["missing_keys"]
    up_state, fork_state = upstream.state_dict(), fork.state_dict()
    assert up_state.keys() == fork_state.keys()
    for key in up_state:
        assert torch.equal(up_state[key], fork_state[key]), key
        assert torch.equal(up_state[key], model.state_dict()[key]), key
