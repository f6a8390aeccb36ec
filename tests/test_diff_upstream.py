"""The upstream audit (scripts/diff_upstream.py) catches every kind of drift and passes clean forks.

Each test feeds `audit_text` a small synthetic upstream/fork pair, so the property holds
independently of the real forks; the last tests run the CLI over the real forks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import diff_upstream  # noqa: E402
from diff_upstream import HEADER_TEMPLATE, absolutize_imports, audit_text, sha256_text  # noqa: E402

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
