"""The upstream audit (scripts/diff_upstream.py) catches every kind of drift and passes clean forks.

Each test feeds `audit_text` a small synthetic upstream/fork pair, so the property holds
independently of the real forks; the last tests run the CLI over the real forks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.script_loader import load_script

REPO_ROOT = Path(__file__).resolve().parent.parent
diff_upstream = load_script("diff_upstream", "diff_upstream")
HEADER_TEMPLATE, absolutize_imports = diff_upstream.HEADER_TEMPLATE, diff_upstream.absolutize_imports
audit_text, sha256_text = diff_upstream.audit_text, diff_upstream.sha256_text

UPSTREAM_PATH = "pkg/models/toy/modeling_toy.py"
UPSTREAM = '''\
"""Toy model."""
import torch

from ...cache_utils import Cache
from ..auto import AutoModel
from .configuration_toy import ToyConfig


class ToyModel:
    def forward(self, x):
        scale = 2.0
        y = x * scale
        return y
'''


def make_fork(body: str | None = None, *, upstream: str = UPSTREAM, version: str = "1.0.0") -> str:
    header = HEADER_TEMPLATE.format(package="pkg", version=version, path=UPSTREAM_PATH, sha256=sha256_text(upstream))
    return header + (body if body is not None else absolutize_imports(upstream, UPSTREAM_PATH))


def audit(fork: str, *, upstream: str = UPSTREAM, installed: str = "1.0.0", pinned: str = "1.0.0"):
    return audit_text(fork, upstream, fork_path="fork.py", installed_version=installed, pinned_version=pinned)


def clean_body() -> str:
    return absolutize_imports(UPSTREAM, UPSTREAM_PATH)


def test_relative_imports_become_absolute_names_of_the_same_module():
    body = clean_body()
    assert "from pkg.cache_utils import Cache" in body
    assert "from pkg.models.auto import AutoModel" in body
    assert "from pkg.models.toy.configuration_toy import ToyConfig" in body
    assert len(body.splitlines()) == len(UPSTREAM.splitlines())


def test_clean_fork_passes():
    result = audit(make_fork())
    assert result.ok, result.violations


def test_fenced_code_change_and_comment_annotations_pass():
    body = clean_body().replace(
        "        y = x * scale\n",
        "        # annotation: comments may stand anywhere\n"
        "        # >>> pruning: scale tokens only when pruning is on (disabled: upstream line)\n"
        "        if getattr(self, 'pruning', None) is not None:\n"
        "            # >>> pruning: nested fence\n"
        "            y = self.pruning(x)\n"
        "            # <<< pruning\n"
        "        else:\n"
        "            y = x * scale\n"
        "        # <<< pruning\n",
    )
    result = audit(make_fork(body))
    assert result.ok, result.violations
    assert "+        if getattr(self, 'pruning', None) is not None:" in result.diff


def test_changed_constant_outside_fence_is_caught_with_its_line():
    fork = make_fork(clean_body().replace("scale = 2.0", "scale = 2.5"))
    result = audit(fork)
    assert not result.ok
    line = fork.splitlines().index("        scale = 2.5") + 1
    assert any(v.line == line and "outside a pruning fence" in v.message for v in result.violations)


def test_added_code_line_outside_fence_is_caught():
    result = audit(make_fork(clean_body().replace("        return y\n", "        y = y + 1\n        return y\n")))
    assert [v.message for v in result.violations if "added or changed" in v.message]


def test_removed_code_line_outside_fence_is_caught():
    result = audit(make_fork(clean_body().replace("        scale = 2.0\n", "")))
    assert any("removed outside a pruning fence" in v.message and "scale = 2.0" in v.message for v in result.violations)


def test_removed_line_inside_fence_passes():
    body = clean_body().replace(
        "        y = x * scale\n",
        "        # >>> pruning: the upstream multiply is skipped (test of a fenced deletion)\n"
        "        # <<< pruning\n",
    )
    result = audit(make_fork(body))
    assert result.ok, result.violations


def test_changed_import_outside_fence_is_caught():
    result = audit(make_fork(clean_body().replace("from pkg.cache_utils import Cache", "from pkg.other_cache import Cache")))
    assert not result.ok


def test_unclosed_fence_is_caught():
    body = clean_body().replace("        y = x * scale\n", "        # >>> pruning: never closed\n        y = x * scale\n")
    result = audit(make_fork(body))
    assert any("never closed" in v.message for v in result.violations)


def test_close_without_open_is_caught():
    body = clean_body().replace("        return y\n", "        return y\n        # <<< pruning\n")
    result = audit(make_fork(body))
    assert any("closes no open fence" in v.message for v in result.violations)


def test_fence_without_description_and_malformed_marker_are_caught():
    body = clean_body().replace(
        "        y = x * scale\n",
        "        # >>> pruning:\n        y = x * scale\n        # <<< pruning\n        #<<< pruning\n",
    )
    messages = [v.message for v in audit(make_fork(body)).violations]
    assert any("without a description" in m for m in messages)
    assert any("malformed fence marker" in m for m in messages)


def test_upstream_sha256_mismatch_is_caught():
    moved_upstream = UPSTREAM.replace("Toy model.", "Toy model, new release.")
    result = audit(make_fork(), upstream=moved_upstream)
    assert any("sha256" in v.message for v in result.violations)


def test_installed_version_differs_from_pin_is_caught():
    result = audit(make_fork(), installed="1.0.1", pinned="1.0.0")
    assert any("pins ==1.0.0" in v.message for v in result.violations)


def test_header_version_differs_from_installed_is_caught():
    result = audit(make_fork(version="0.9.0"))
    assert any("fork header says" in v.message for v in result.violations)


def test_missing_header_is_caught():
    result = audit(clean_body())
    assert any("missing fork header" in v.message for v in result.violations)


def test_real_forks_pass_the_audit():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "diff_upstream.py"), "--quiet"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    forks = diff_upstream.find_forks(REPO_ROOT)
    assert {p.relative_to(REPO_ROOT).as_posix() for p in forks} >= {
        "models/qwenimage/transformer_qwenimage.py",
        "models/qwen2_5_vl/modeling_qwen2_5_vl.py",
        "models/llava/modeling_llava.py",
    }


@pytest.mark.parametrize("fork", ["models/llava/modeling_llava.py"])
def test_perturbed_copy_of_a_real_fork_fails_the_cli_naming_file_and_line(tmp_path, fork):
    text = (REPO_ROOT / fork).read_text()
    assert "self.config.image_token_id" in text or "image_token_id" in text
    lines = text.splitlines(keepends=True)
    # change the first assignment of a numeric constant found in code (not a comment)
    target = next(i for i, l in enumerate(lines) if "= 1" in l and not l.strip().startswith("#"))
    lines[target] = lines[target].replace("= 1", "= 2", 1)
    perturbed = tmp_path / "modeling_llava.py"
    perturbed.write_text("".join(lines))
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "diff_upstream.py"), "--quiet", str(perturbed)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert proc.returncode == 1
    assert f"modeling_llava.py:{target + 1}:" in proc.stderr


def test_code_replaced_by_comment_outside_fence_is_caught():
    result = audit(make_fork(clean_body().replace("        scale = 2.0\n", "        # scale = 2.0\n")))
    assert any("removed outside a pruning fence" in v.message for v in result.violations)


# ----------------------------------------------------------------------------- copied blocks outside forks

TOY_UPSTREAM_NAME = "pkg.models.toy.modeling_toy.ToyBlock.forward"
TOY_UPSTREAM_FORWARD = '''\
    def forward(self, hidden_states, mask=None):
        """Docstring."""
        residual = hidden_states
        hidden_states = self.norm(hidden_states)  # pre-norm

        query = self.q_proj(hidden_states)
        key = self.k_proj(hidden_states)
        value = self.v_proj(hidden_states)
        if mask is not None:
            key = key.masked_fill(mask, 0.0)
        out = self.self_attn(query, key, value)
        return residual + out
'''


def toy_resolve(name: str):
    if name == TOY_UPSTREAM_NAME:
        return TOY_UPSTREAM_FORWARD, "pkg"
    raise LookupError(f"no {name} in the toy package")


def audit_copies(code: str, *, installed: str = "1.0.0", pinned: str = "1.0.0"):
    return diff_upstream.audit_copies_text(
        code, path="copy.py", resolve=toy_resolve, pins={"pkg": pinned}, installed=lambda package: installed
    )


def copy_of(*body: str, header: str = f"# Copied from {TOY_UPSTREAM_NAME}", indent: str = "    ") -> str:
    lines = ["def project(layer, x, mask):", indent + header, *(indent + line if line else "" for line in body), indent + "# End copied", "    return key"]
    return "\n".join(lines) + "\n"


def test_copied_block_matching_a_contiguous_run_of_upstream_statements_passes():
    result = audit_copies(copy_of("query = self.q_proj(hidden_states)", "key = self.k_proj(hidden_states)"))
    assert result.ok, result.violations
    assert [(b.line, b.name) for b in result.blocks] == [(2, TOY_UPSTREAM_NAME)]


def test_copied_block_with_one_statement_changed_fails_with_one_line_naming_file_line_and_upstream():
    result = audit_copies(copy_of("query = self.q_proj(hidden_states)", "key = self.k_proj(hidden_states) * 2"))
    assert len(result.violations) == 1
    message = str(result.violations[0])
    assert message.startswith(f"copy.py:2: copied block drifted from {TOY_UPSTREAM_NAME} (pkg 1.0.0): ")
    assert "line 4 'key = self.k_proj(hidden_states) * 2' is not an upstream statement" in message
    assert "\n" not in message


def test_copied_block_missing_an_upstream_statement_in_between_fails():
    # value = ... stands between key and the mask test upstream: dropping it silently is drift
    result = audit_copies(copy_of("key = self.k_proj(hidden_states)", "if mask is not None:", "    key = key.masked_fill(mask, 0.0)"))
    assert any("not as contiguous runs" in v.message for v in result.violations)


def test_elision_line_allows_left_out_statements_but_keeps_the_order():
    elided = copy_of("key = self.k_proj(hidden_states)", "# ...", "if mask is not None:", "    key = key.masked_fill(mask, 0.0)")
    assert audit_copies(elided).ok
    swapped = copy_of("if mask is not None:", "    key = key.masked_fill(mask, 0.0)", "# ...", "key = self.k_proj(hidden_states)")
    assert not audit_copies(swapped).ok


def test_comments_blank_lines_spacing_and_line_breaks_are_not_compared():
    result = audit_copies(copy_of(
        "# the queries",
        "query = self.q_proj(",
        "    hidden_states",
        ")",
        "",
        "key = self.k_proj( hidden_states )  # a comment",
    ))
    assert result.ok, result.violations


def test_indentation_counts_relative_to_the_first_statement_at_any_depth():
    deeper = copy_of("if mask is not None:", "    key = key.masked_fill(mask, 0.0)", indent="            ")
    assert audit_copies(deeper).ok
    flattened = copy_of("key = self.k_proj(hidden_states)", "value = self.v_proj(hidden_states)", "if mask is not None:", "key = key.masked_fill(mask, 0.0)")
    assert not audit_copies(flattened).ok


def test_renames_apply_to_whole_words_of_upstream_in_order():
    renamed = copy_of(
        "query = layer.q_proj(x)",
        "key = layer.k_proj(x)",
        header=f"# Copied from {TOY_UPSTREAM_NAME} with self->layer, hidden_states->x",
    )
    assert audit_copies(renamed).ok
    # `self->layer` leaves `self_attn` alone (transformers' substring replace would not)
    call = copy_of("out = layer.self_attn(query, key, value)", header=f"# Copied from {TOY_UPSTREAM_NAME} with self->layer")
    assert audit_copies(call).ok
    assert diff_upstream.apply_renames("self.self_attn(hidden_states)", [("self", "a"), ("hidden_states", "h")]) == "a.self_attn(h)"
    without_rename = copy_of("query = layer.q_proj(x)")
    assert not audit_copies(without_rename).ok


def test_unknown_upstream_name_fails_clearly():
    result = audit_copies(copy_of("query = self.q_proj(hidden_states)", header="# Copied from pkg.models.toy.modeling_toy.Missing.forward"))
    assert [str(v) for v in result.violations] == [
        "copy.py:2: copied block names an unknown upstream pkg.models.toy.modeling_toy.Missing.forward: "
        "no pkg.models.toy.modeling_toy.Missing.forward in the toy package"
    ]


@pytest.mark.parametrize(
    "name, reason",
    [
        ("diffusers.models.transformers.transformer_qwenimage.NoSuchBlock.forward", "no class or function 'NoSuchBlock' in diffusers.models.transformers.transformer_qwenimage"),
        ("diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock.no_such_method", "no class or function 'no_such_method'"),
        ("no_such_package_xyz.models.thing", "package no_such_package_xyz is not installed"),
    ],
)
def test_unknown_name_in_the_installed_package_is_a_lookup_error_with_the_reason(name, reason):
    with pytest.raises(LookupError, match=reason):
        diff_upstream.upstream_definition(name)


def test_upstream_definition_is_read_from_the_installed_file_without_importing_it():
    source, package = diff_upstream.upstream_definition(
        "diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock._modulate"
    )
    assert package == "diffusers"
    assert source.lstrip().startswith("def _modulate(self, x, mod_params, index=None):")


def test_installed_version_differs_from_pin_fails_the_copied_block():
    result = audit_copies(copy_of("query = self.q_proj(hidden_states)"), installed="1.1.0", pinned="1.0.0")
    assert [v.message for v in result.violations] == [
        "installed pkg==1.1.0 but requirements.txt pins ==1.0.0: reinstall with `make venv`"
    ]


def test_malformed_unclosed_unopened_and_empty_copy_markers_are_caught():
    code = (
        "# copied from somewhere\n"
        f"# Copied from {TOY_UPSTREAM_NAME} with self\n"
        "x = 1\n"
        "# End copied\n"
        "# End copied\n"
        f"# Copied from {TOY_UPSTREAM_NAME}\n"
        "# only a comment\n"
        "# End copied\n"
        f"# Copied from {TOY_UPSTREAM_NAME}\n"
        "query = self.q_proj(hidden_states)\n"
    )
    messages = [str(v) for v in audit_copies(code).violations]
    assert any(m.startswith("copy.py:1: malformed copy marker") for m in messages)
    assert any(m.startswith("copy.py:2: malformed rename 'self'") for m in messages)
    assert "copy.py:5: `# End copied` closes no `# Copied from` block" in messages
    assert "copy.py:6: copied block has no statement" in messages
    assert "copy.py:9: copied block is never closed with `# End copied`" in messages


def test_copied_block_cut_inside_a_statement_is_caught():
    result = audit_copies(copy_of("query = self.q_proj(", "# End copied", "hidden_states)"))
    assert any("not a run of whole statements" in v.message for v in result.violations)


REAL_BLOCK_NAME = "diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock.forward"
REAL_BLOCK = f'''\
def mlp(block, denoise, img_mod2, index):
    # Copied from {REAL_BLOCK_NAME} with self->block, hidden_states->denoise, modulate_index->index
    img_normed2 = block.img_norm2(denoise)
    img_modulated2, img_gate2 = block._modulate(img_normed2, img_mod2, index)
    img_mlp_output = block.img_mlp(img_modulated2)
    denoise = denoise + img_gate2 * img_mlp_output
    # End copied
    return denoise
'''


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "diff_upstream.py"), *args],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )


def test_cli_passes_a_temporary_copy_of_installed_upstream_statements(tmp_path):
    path = tmp_path / "copy.py"
    path.write_text(REAL_BLOCK)
    proc = run_cli(str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"copied block OK: {path}:2 <- {REAL_BLOCK_NAME}" in proc.stdout


def test_cli_fails_a_drifted_temporary_copy_with_one_line_naming_file_line_and_upstream(tmp_path):
    path = tmp_path / "copy.py"
    path.write_text(REAL_BLOCK.replace("denoise + img_gate2 * img_mlp_output", "denoise + img_gate2 * img_mlp_output * 0.5"))
    proc = run_cli("--quiet", str(path))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {path}:2: copied block drifted from {REAL_BLOCK_NAME} (diffusers ")
    assert "line 6 " in errors[0]


def test_real_copied_blocks_all_pass_and_are_listed():
    proc = run_cli()
    assert proc.returncode == 0, proc.stderr
    listed = [line for line in proc.stdout.splitlines() if line.startswith("copied block OK: ")]
    # (the norm/modulate/MLP statements that reference_reuse.py once copied from QwenImageTransformerBlock.forward now
    # run in the fork's fences; only the reference K/V projection is still a checked copy)
    assert any(line.startswith("copied block OK: pruning/edit/reference_reuse.py:") and "QwenDoubleStreamAttnProcessor2_0.__call__" in line for line in listed)
    # (PruneVid's stage 2 once copied Qwen2_5_VL's q projection into pruning/; the fork's attention now hands over
    # its own queries, so no copy is left there)
    files = {p.relative_to(REPO_ROOT).as_posix() for p in diff_upstream.find_copy_files(REPO_ROOT)}
    assert files >= {"pruning/edit/reference_reuse.py"}
    quiet = run_cli("--quiet")
    assert quiet.returncode == 0 and "copied block OK" not in quiet.stdout


@pytest.mark.parametrize("path", ["pruning/edit/reference_reuse.py"])
def test_one_statement_changed_in_a_real_copied_block_fails_the_cli(tmp_path, path):
    lines = (REPO_ROOT / path).read_text().splitlines(keepends=True)
    marker = next(i for i, line in enumerate(lines) if line.lstrip().startswith("# Copied from "))
    target = next(i for i in range(marker + 1, len(lines)) if not lines[i].lstrip().startswith("#"))
    lines[target] = lines[target].replace("(", "(-", 1)
    perturbed = tmp_path / Path(path).name
    perturbed.write_text("".join(lines))
    proc = run_cli("--quiet", str(perturbed))
    assert proc.returncode == 1
    assert f"{perturbed}:{marker + 1}: copied block drifted from " in proc.stderr
