"""The guards catch the founding regression: a fork copy that drifted by one constant.

The bug report behind this project: a modified copy of ``modeling_qwen2_5_vl.py`` produced
garbled text with every pruning stage off, while weights loaded fine. Here a copy of the fork
with one changed constant, made in a temporary directory, must fail *both* the upstream audit
(naming file and line) and the bit-exact comparison with upstream.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoProcessor
from transformers import Qwen2_5_VLForConditionalGeneration as UpstreamQwen

from data.media import make_sample_image
from models.tiny.qwen2_5_vl import tiny_qwen2_5_vl_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
FORK = REPO_ROOT / "models" / "qwen2_5_vl" / "modeling_qwen2_5_vl.py"
# the language model's attention scale (Qwen2_5_VLAttention), one character changed
ORIGINAL = "self.rope_parameters = config.rope_parameters\n        self.scaling = self.head_dim**-0.5"
DRIFTED = ORIGINAL.replace("**-0.5", "**-0.45")


def make_drifted_copy(tmp_path: Path) -> tuple[Path, int]:
    text = FORK.read_text()
    assert text.count(ORIGINAL) == 1
    line = text[: text.index(ORIGINAL)].count("\n") + 2  # the scaling line
    drifted = tmp_path / "modeling_qwen2_5_vl.py"
    drifted.write_text(text.replace(ORIGINAL, DRIFTED))
    return drifted, line


def import_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # transformers inspects classes through their module
    spec.loader.exec_module(module)
    return module


def test_drifted_fork_fails_the_audit_at_the_changed_line(tmp_path):
    drifted, line = make_drifted_copy(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "diff_upstream.py"), "--quiet", str(drifted)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 1
    assert f"modeling_qwen2_5_vl.py:{line}: code added or changed outside a pruning fence" in proc.stderr


def test_drifted_fork_fails_the_equivalence_comparison_while_the_real_fork_passes(tmp_path):
    drifted, _ = make_drifted_copy(tmp_path)
    drifted_module = import_from(drifted, "drifted_modeling_qwen2_5_vl")
    path = tiny_qwen2_5_vl_dir()
    processor = AutoProcessor.from_pretrained(path)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=make_sample_image((112, 112), seed=5), text=prompt, return_tensors="pt")

    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Fork

    with torch.no_grad():
        expected = UpstreamQwen.from_pretrained(path).eval()(**inputs).logits
        fork_logits = Fork.from_pretrained(path).eval()(**inputs).logits
        drifted_model = drifted_module.Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
        drifted_logits = drifted_model(**inputs).logits
    assert torch.equal(fork_logits, expected)
    assert not torch.equal(drifted_logits, expected)


LLAMA_FORK = REPO_ROOT / "models" / "llama" / "modeling_llama.py"
LLAMA_ORIGINAL = "        self.scaling = self.head_dim**-0.5\n"


def test_drifted_llama_fork_fails_the_audit_and_the_equivalence_comparison(tmp_path):
    """The decoder loop system C prunes in is guarded the same way: one changed constant is caught twice."""
    from transformers import LlamaForCausalLM as UpstreamLlama

    from models.llama.modeling_llama import LlamaForCausalLM as ForkLlama
    from models.tiny.llava import build_llama_tokenizer, tiny_text_config

    text = LLAMA_FORK.read_text()
    assert text.count(LLAMA_ORIGINAL) == 1
    line = text[: text.index(LLAMA_ORIGINAL)].count("\n") + 1
    drifted = tmp_path / "modeling_llama.py"
    drifted.write_text(text.replace(LLAMA_ORIGINAL, LLAMA_ORIGINAL.replace("**-0.5", "**-0.45")))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "diff_upstream.py"), "--quiet", str(drifted)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 1
    assert f"modeling_llama.py:{line}: code added or changed outside a pruning fence" in proc.stderr

    drifted_module = import_from(drifted, "drifted_modeling_llama")
    torch.manual_seed(0)
    config = tiny_text_config(build_llama_tokenizer())
    state = UpstreamLlama(config).state_dict()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        logits = {}
        for name, cls in (("upstream", UpstreamLlama), ("fork", ForkLlama),
                          ("drifted", drifted_module.LlamaForCausalLM)):
            model = cls(config).eval()
            model.load_state_dict(state)
            logits[name] = model(input_ids=ids).logits
    assert torch.equal(logits["fork"], logits["upstream"])
    assert not torch.equal(logits["drifted"], logits["upstream"])
