"""The benchmark's oracle runs the upstream layers themselves: at equal lengths its two halves reproduce the
language model's prefill, and at stage-2 lengths the layers after K see only the first rows."""

from __future__ import annotations

import torch

from tests.script_loader import load_script


def _language_model():
    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from models.tiny import seeded_init_
    from models.tiny.qwen2_5_vl import tiny_qwen2_5_vl_config

    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    seeded_init_(model, seed=0, std=0.05)
    return model.model.language_model.eval()


def test_oracle_halves_reproduce_the_language_models_prefill_and_cut_after_layer_k():
    bench = load_script("bench_video")
    language_model = _language_model()
    num_layers = language_model.config.num_hidden_layers
    embeds = torch.randn(1, 40, language_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40).view(1, 1, -1).expand(3, 1, -1)
    with torch.no_grad():
        full = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=True).last_hidden_state
        for layer in (None, 0, num_layers - 2):
            oracle = bench.Oracle(language_model, layer)
            assert len(oracle.halves) == (1 if layer is None else 2)
            assert torch.allclose(oracle.forward(embeds, 40), full, atol=1e-5)
        # cut to the first 25 rows after layer 0: the first 25 rows of layers 1.. on those rows alone
        oracle = bench.Oracle(language_model, 0)
        after_first = oracle.halves[0](inputs_embeds=embeds, position_ids=positions).last_hidden_state[:, :25]
        rest = oracle.halves[1](inputs_embeds=after_first, position_ids=positions[..., :25]).last_hidden_state
        assert torch.allclose(oracle.forward(embeds, 25), rest, atol=1e-6)
        assert oracle.prefill_s(40, 25) > 0
