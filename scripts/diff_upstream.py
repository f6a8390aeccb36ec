#!/usr/bin/env python
"""Audit the forked model files against the pinned upstream files they were copied from.

A fork is a verbatim copy of one file of an installed, pinned package (diffusers or
transformers) with
  * a comment header naming the package, version, upstream path and upstream sha256,
  * relative imports rewritten to absolute ones (``from ...cache_utils import Cache`` ->
    ``from transformers.cache_utils import Cache``), which this tool treats as no change,
  * comment-only annotations anywhere, and
  * every code change inside a fence::

        # >>> pruning: <what is changed and why>
        ...
        # <<< pruning

Fences are comment lines and may nest. The audit prints each fork's unified diff against
the rewritten upstream file and fails (exit 1), naming file and line, when

  * the installed package version is not the pin in requirements.txt (or the header's),
  * the sha256 of the installed upstream file differs from the header,
  * a code line is added, changed or removed outside a fence,
  * a fence is unbalanced or has no description.

This is the same idea as transformers' ``# Copied from`` + ``utils/check_copies.py``:
identity with upstream is checked by a program, not by promise.

Usage::

    python scripts/diff_upstream.py            # audit every fork under models/
    python scripts/diff_upstream.py --quiet    # violations only, no diffs
    python scripts/diff_upstream.py --init transformers transformers/models/llava/modeling_llava.py \
        models/llava/modeling_llava.py         # create a fresh fork
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

FENCE_OPEN = re.compile(r"^\s*# >>> pruning:(.*)$")
FENCE_CLOSE = re.compile(r"^\s*# <<< pruning\s*$")
MALFORMED_FENCE = re.compile(r"^\s*#+\s*(>>>|<<<)\s*prun")  # looks like a marker but is not exact
HEADER_FIELD = re.compile(r"^# upstream-(package|version|path|sha256): (\S+)\s*$")
RELATIVE_IMPORT = re.compile(r"^(\s*)from (\.+)([\w.]*) import ")

HEADER_TEMPLATE = """\
# ------------------------------------------------------------------------------------------
# FORK of an upstream file, audited by `make diff-upstream` (scripts/diff_upstream.py).
# upstream-package: {package}
# upstream-version: {version}
# upstream-path: {path}
# upstream-sha256: {sha256}
# Differences from upstream: relative imports made absolute, comment-only annotations, and
# code changes fenced by `# >>> pruning: <what and why>` ... `# <<< pruning`. With pruning
# disabled, every fence runs exactly the upstream statements.
# ------------------------------------------------------------------------------------------
"""


@dataclass
class Violation:
    path: str
    line: int  # 1-based line in the fork (0: the file as a whole)
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class ForkHeader:
    package: str
    version: str
    path: str
    sha256: str


@dataclass
class AuditResult:
    fork_path: str
    violations: list[Violation] = field(default_factory=list)
    diff: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations


# ----------------------------------------------------------------------------- helpers


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def module_name_of(upstream_path: str) -> str:
    """``transformers/models/llava/modeling_llava.py`` -> ``transformers.models.llava.modeling_llava``."""
    return upstream_path[: -len(".py")].replace("/", ".")


def absolutize_imports(upstream_text: str, upstream_path: str) -> str:
    """Rewrite relative imports to the absolute name of the same module, line by line.

    ``from ...cache_utils import Cache`` in ``transformers/models/llava/modeling_llava.py``
    becomes ``from transformers.cache_utils import Cache``; line count never changes.
    """
    package_parts = module_name_of(upstream_path).split(".")[:-1]

    def rewrite(match: re.Match) -> str:
        indent, dots, rest = match.group(1), match.group(2), match.group(3)
        level = len(dots)
        if level > len(package_parts):
            raise ValueError(f"relative import beyond top-level package in {upstream_path}: {match.group(0)}")
        base = package_parts[: len(package_parts) - (level - 1)]
        target = ".".join(base + ([rest] if rest else []))
        return f"{indent}from {target} import "

    return "".join(RELATIVE_IMPORT.sub(rewrite, line) for line in upstream_text.splitlines(keepends=True))


def parse_header(fork_text: str) -> ForkHeader | None:
    fields: dict[str, str] = {}
    for line in fork_text.splitlines()[:40]:
        m = HEADER_FIELD.match(line)
        if m:
            fields[m.group(1)] = m.group(2)
    if set(fields) != {"package", "version", "path", "sha256"}:
        return None
    return ForkHeader(**fields)


def is_annotation(line: str) -> bool:
    """A blank line or a comment-only line: allowed anywhere, never changes behaviour."""
    stripped = line.strip()
    return stripped == "" or stripped.startswith("#")


def fence_depths(fork_lines: list[str], path: str) -> tuple[list[int], list[Violation]]:
    """Fence nesting depth *at* each fork line (fence marker lines count as inside).

    Returns ``depth_at_line`` with ``len(fork_lines) + 1`` entries (the last one is the
    depth after the final line) and the fence-balance violations.
    """
    violations: list[Violation] = []
    depth_at_line: list[int] = []
    open_lines: list[int] = []
    for i, line in enumerate(fork_lines, start=1):
        m_open = FENCE_OPEN.match(line)
        if m_open:
            if not m_open.group(1).strip():
                violations.append(Violation(path, i, "fence opened without a description: write `# >>> pruning: <what and why>`"))
            open_lines.append(i)
            depth_at_line.append(len(open_lines))
        elif FENCE_CLOSE.match(line):
            depth_at_line.append(max(len(open_lines), 1))
            if not open_lines:
                violations.append(Violation(path, i, "`# <<< pruning` closes no open fence"))
            else:
                open_lines.pop()
        else:
            if MALFORMED_FENCE.match(line):
                violations.append(Violation(path, i, "malformed fence marker: use exactly `# >>> pruning: ...` / `# <<< pruning`"))
            depth_at_line.append(len(open_lines))
    for i in open_lines:
        violations.append(Violation(path, i, "fence opened here is never closed with `# <<< pruning`"))
    depth_at_line.append(len(open_lines))
    return depth_at_line, violations


def audit_text(
    fork_text: str,
    upstream_text: str,
    *,
    fork_path: str,
    installed_version: str | None,
    pinned_version: str | None,
) -> AuditResult:
    """Audit one fork against the upstream text it claims to copy (pure function, no I/O)."""
    result = AuditResult(fork_path=fork_path)
    header = parse_header(fork_text)
    if header is None:
        result.violations.append(
            Violation(fork_path, 1, "missing fork header (upstream-package/-version/-path/-sha256 lines)")
        )
        return result

    if installed_version is None:
        result.violations.append(Violation(fork_path, 0, f"package {header.package} is not installed: run `make venv`"))
        return result
    if pinned_version is not None and installed_version != pinned_version:
        result.violations.append(
            Violation(fork_path, 0, f"installed {header.package}=={installed_version} but requirements.txt pins =={pinned_version}: reinstall with `make venv`")
        )
    if installed_version != header.version:
        result.violations.append(
            Violation(fork_path, 0, f"fork header says {header.package}=={header.version} but {installed_version} is installed: re-fork from the pinned release")
        )
    actual_sha = sha256_text(upstream_text)
    if actual_sha != header.sha256:
        result.violations.append(
            Violation(fork_path, 0, f"sha256 of installed {header.path} is {actual_sha}, header says {header.sha256}: the upstream file moved")
        )

    upstream_lines = absolutize_imports(upstream_text, header.path).splitlines(keepends=True)
    fork_lines = fork_text.splitlines(keepends=True)
    depth_at_line, fence_violations = fence_depths(fork_lines, fork_path)
    result.violations.extend(fence_violations)

    matcher = difflib.SequenceMatcher(a=upstream_lines, b=fork_lines, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        # Lines the fork adds (insert/replace): fine inside a fence, or if comment-only.
        for j in range(j1, j2):
            if depth_at_line[j] == 0 and not is_annotation(fork_lines[j]):
                result.violations.append(
                    Violation(fork_path, j + 1, f"code added or changed outside a pruning fence: {fork_lines[j].strip()!r}")
                )
        # Upstream lines the fork drops (delete/replace): only inside a fence. In a replace,
        # the fork lines that take their place (less unfenced comments at either end) must
        # all be fenced. A pure deletion sits between fork lines j1-1 and j1: it is fenced
        # if both neighbours are.
        if i2 > i1:
            lo, hi = j1, j2
            while lo < hi and depth_at_line[lo] == 0 and is_annotation(fork_lines[lo]):
                lo += 1
            while hi > lo and depth_at_line[hi - 1] == 0 and is_annotation(fork_lines[hi - 1]):
                hi -= 1
            if hi > lo:
                fenced = all(depth_at_line[j] > 0 for j in range(lo, hi))
            else:
                fenced = j1 > 0 and depth_at_line[j1 - 1] > 0 and depth_at_line[j1] > 0
            if not fenced:
                for i in range(i1, i2):
                    if upstream_lines[i].strip():
                        result.violations.append(
                            Violation(fork_path, max(j1, 1), f"upstream line {i + 1} removed outside a pruning fence: {upstream_lines[i].strip()!r}")
                        )

    result.diff = "".join(
        difflib.unified_diff(
            upstream_lines,
            fork_lines,
            fromfile=f"upstream/{header.path} (imports absolutized)",
            tofile=fork_path,
        )
    )
    return result


# ----------------------------------------------------------------------------- I/O


def read_pins(requirements: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    if not requirements.exists():
        return pins
    for raw in requirements.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def installed_version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_upstream_file(header_path: str) -> Path | None:
    top = header_path.split("/", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent / header_path


def find_forks(root: Path) -> list[Path]:
    return sorted(p for p in (root / "models").rglob("*.py") if parse_header(p.read_text()) is not None)


def audit_file(fork_file: Path, pins: dict[str, str], display_root: Path = REPO_ROOT) -> AuditResult:
    try:
        shown = str(fork_file.resolve().relative_to(display_root))
    except ValueError:
        shown = str(fork_file)
    fork_text = fork_file.read_text()
    header = parse_header(fork_text)
    if header is None:
        return audit_text(fork_text, "", fork_path=shown, installed_version=None, pinned_version=None)
    upstream_file = installed_upstream_file(header.path)
    if upstream_file is None or not upstream_file.exists():
        return AuditResult(shown, [Violation(shown, 0, f"upstream file {header.path} not found in the installed {header.package}: run `make venv`")])
    return audit_text(
        fork_text,
        upstream_file.read_text(),
        fork_path=shown,
        installed_version=installed_version_of(header.package),
        pinned_version=pins.get(header.package.lower()),
    )


def init_fork(package: str, upstream_path: str, destination: Path) -> None:
    """Create a fresh fork: header + upstream text with relative imports made absolute."""
    upstream_file = installed_upstream_file(upstream_path)
    if upstream_file is None or not upstream_file.exists():
        raise SystemExit(f"error: {upstream_path} not found in the installed {package}")
    upstream_text = upstream_file.read_text()
    header = HEADER_TEMPLATE.format(
        package=package,
        version=installed_version_of(package),
        path=upstream_path,
        sha256=sha256_text(upstream_text),
    )
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(header + absolutize_imports(upstream_text, upstream_path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("forks", nargs="*", type=Path, help="fork files (default: every fork under models/)")
    parser.add_argument("--quiet", action="store_true", help="print violations only, not the diffs")
    parser.add_argument("--requirements", type=Path, default=REPO_ROOT / "requirements.txt")
    parser.add_argument("--init", nargs=3, metavar=("PACKAGE", "UPSTREAM_PATH", "DEST"), help="create a fresh fork")
    args = parser.parse_args(argv)

    if args.init:
        package, upstream_path, dest = args.init
        init_fork(package, upstream_path, Path(dest))
        print(f"forked {package}/{upstream_path} -> {dest}")
        return 0

    forks = args.forks or find_forks(REPO_ROOT)
    if not forks:
        print("error: no forks found under models/ (a fork starts with an `# upstream-...` header)", file=sys.stderr)
        return 1
    pins = read_pins(args.requirements)
    failed = 0
    for fork_file in forks:
        if not fork_file.exists():
            print(f"error: {fork_file}: no such file", file=sys.stderr)
            failed += 1
            continue
        result = audit_file(fork_file, pins)
        if not args.quiet and result.diff:
            print(result.diff)
        for violation in result.violations:
            print(f"error: {violation}", file=sys.stderr)
        status = "OK" if result.ok else f"FAILED ({len(result.violations)} violation(s))"
        print(f"diff-upstream: {result.fork_path}: {status}")
        failed += not result.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
