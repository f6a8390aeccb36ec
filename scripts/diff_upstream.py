#!/usr/bin/env python
"""Audit the forked model files, and upstream statements copied elsewhere, against the pinned upstream.

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

Copied blocks
-------------
Outside the forks (every non-fork ``.py`` file under ``pruning/`` and ``pipelines/``), a few
upstream statements re-implemented for a subset of the rows carry a marker::

    # Copied from diffusers.models.transformers.transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0.__call__ with hidden_states->reference_states, img_key->key, img_value->value
    key = attn.to_k(reference_states)
    value = attn.to_v(reference_states)
    # ...
    head_dim = attn.inner_dim // attn.heads
    # End copied

* the name is the dotted path of a module-level class or function (or a method) in the
  installed package, exactly where it is defined; the file is found with
  ``importlib.util.find_spec`` and the definition with ``ast`` (nothing is imported);
* ``with A->B, C->D`` (optional): the upstream source is read with every ``A`` replaced by ``B``,
  in order, like transformers' ``with Bert->Roberta`` but whole words only: ``self->attn``
  leaves ``self_attn`` alone (an ``A`` that starts or ends with a non-word character, such as
  ``self.``, is not bounded on that side);
* a ``# ...`` line inside a block stands for upstream statements left out (any number);
* both sides are reduced to their statements: comments, blank lines, line breaks inside
  brackets and spacing are dropped (a trailing comma is a token like any other); indentation
  counts relative to the block's first statement.

Forks are audited whole, so the ``# Copied from`` comments that upstream files carry are not
read there.

A block passes when its statements, with the renames applied to upstream, occur in the named
definition as one contiguous run of statements, or, with ``# ...`` lines, as contiguous runs
in the same order. No line numbers are involved, so a benign upstream change elsewhere never
breaks a marker. The audit fails, at the marker's line, when

  * the block drifted (``path:line: copied block drifted from <name> (<package> <version>): ...``),
  * the name is unknown in the installed package, or the package is not the pinned version,
  * a marker is malformed, unclosed, or a block has no statement.

Usage::

    python scripts/diff_upstream.py            # audit every fork under models/ and every copied block
    python scripts/diff_upstream.py --quiet    # violations only, no diffs or per-block lines
    python scripts/diff_upstream.py pruning/edit/reference_reuse.py   # one file: a fork, or copied blocks
    python scripts/diff_upstream.py --init transformers transformers/models/llava/modeling_llava.py \
        models/llava/modeling_llava.py         # create a fresh fork
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import importlib.metadata
import importlib.util
import io
import re
import sys
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


# ----------------------------------------------------------------------------- copied blocks

COPY_OPEN = re.compile(r"^\s*# Copied from ([A-Za-z_][\w.]*)(?: with (.+?))?\s*$")
COPY_CLOSE = re.compile(r"^\s*# End copied\s*$")
COPY_ELISION = re.compile(r"^\s*# \.\.\.\s*$")
MALFORMED_COPY = re.compile(r"^\s*#+\s*(copied from|end copied)", re.IGNORECASE)
RENAME = re.compile(r"^\s*(\S+)\s*->\s*(\S+)\s*$")
SKIPPED_TOKENS = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


@dataclass(frozen=True)
class Statement:
    """One logical line of Python, reduced to what it does."""

    line: int  # 1-based line of its first token in its file
    indent: int  # column of its first token
    text: str  # its tokens joined by single spaces (no comments, no layout)
    source: str  # its first physical line, stripped (for messages)


@dataclass
class CopiedBlock:
    path: str
    line: int  # the `# Copied from` line
    name: str  # dotted upstream name, as written
    renames: list[tuple[str, str]]
    segments: list[list[Statement]]  # contiguous runs, separated by `# ...` lines


@dataclass
class CopyAuditResult:
    path: str
    blocks: list[CopiedBlock] = field(default_factory=list)  # blocks that passed
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def statements(lines: list[str], first_line: int = 1) -> list[Statement]:
    """The statements of consecutive source ``lines`` (which must hold whole statements).

    Raises ``SyntaxError`` (tokenize errors included) when they do not.
    """
    margin = min((len(l) - len(l.lstrip(" \t")) for l in lines if l.strip()), default=0)
    text = "".join(l[margin:] if l.strip() else "\n" for l in lines)
    result: list[Statement] = []
    current: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NEWLINE and current:
                start_row, start_col = current[0].start
                result.append(
                    Statement(
                        line=first_line + start_row - 1,
                        indent=margin + start_col,
                        text=" ".join(t.string for t in current),
                        source=current[0].line.splitlines()[0].strip(),
                    )
                )
                current = []
            elif tok.type not in SKIPPED_TOKENS:
                current.append(tok)
    except tokenize.TokenError as exc:
        raise SyntaxError(exc.args[0]) from None
    if current:  # pragma: no cover - tokenize always ends a statement with NEWLINE
        raise SyntaxError("incomplete statement")
    return result


def apply_renames(source: str, renames: list[tuple[str, str]]) -> str:
    """``A -> B`` in order; an end of ``A`` that is a word character only matches at a word boundary."""
    for old, new in renames:
        pattern = ("(?<!\\w)" if re.match(r"\w", old) else "") + re.escape(old) + ("(?!\\w)" if re.search(r"\w$", old) else "")
        source = re.sub(pattern, lambda _m, new=new: new, source)
    return source


def parse_copied_blocks(text: str, path: str) -> tuple[list[CopiedBlock], list[Violation]]:
    """The ``# Copied from`` ... ``# End copied`` blocks of a file, and the marker violations."""
    blocks: list[CopiedBlock] = []
    violations: list[Violation] = []
    open_block: tuple[int, str, list[tuple[str, str]], list[tuple[int, str]]] | None = None

    def close(block) -> None:
        start, name, renames, body = block
        runs: list[list[tuple[int, str]]] = [[]]
        for i, line in body:
            if COPY_ELISION.match(line):
                runs.append([])
            else:
                runs[-1].append((i, line))
        segments = []
        for run in runs:
            if not run:
                continue
            try:
                segment = statements([line for _, line in run], first_line=run[0][0])
            except SyntaxError as exc:
                violations.append(Violation(path, start, f"copied block is not a run of whole statements (lines {run[0][0]}-{run[-1][0]}: {exc.msg})"))
                return
            if segment:
                segments.append(segment)
        if not segments:
            violations.append(Violation(path, start, "copied block has no statement"))
            return
        blocks.append(CopiedBlock(path, start, name, renames, segments))

    for i, line in enumerate(text.splitlines(keepends=True), start=1):
        m_open = COPY_OPEN.match(line)
        if m_open:
            if open_block is not None:
                violations.append(Violation(path, open_block[0], "copied block is never closed with `# End copied`"))
            renames = []
            for item in m_open.group(2).split(",") if m_open.group(2) else []:
                m_rename = RENAME.match(item)
                if m_rename is None:
                    violations.append(Violation(path, i, f"malformed rename {item.strip()!r}: write `with A->B, C->D`"))
                else:
                    renames.append((m_rename.group(1), m_rename.group(2)))
            open_block = (i, m_open.group(1), renames, [])
        elif COPY_CLOSE.match(line):
            if open_block is None:
                violations.append(Violation(path, i, "`# End copied` closes no `# Copied from` block"))
            else:
                close(open_block)
                open_block = None
        else:
            if MALFORMED_COPY.match(line):
                violations.append(
                    Violation(path, i, "malformed copy marker: use exactly `# Copied from <module>.<name> [with A->B, ...]` / `# End copied`")
                )
            if open_block is not None:
                open_block[3].append((i, line))
    if open_block is not None:
        violations.append(Violation(path, open_block[0], "copied block is never closed with `# End copied`"))
    return blocks, violations


def _run_matches(segment: list[Statement], upstream: list[Statement], at: int, offset: int) -> bool:
    return at + len(segment) <= len(upstream) and all(
        s.text == u.text and s.indent - u.indent == offset for s, u in zip(segment, upstream[at:])
    )


def copy_drift(block: CopiedBlock, upstream_source: str) -> str | None:
    """``None`` when ``block`` matches the upstream definition's source, else what differs (one line).

    Renames are applied to the upstream source; the first segment may sit anywhere (its first
    statement fixes the indentation offset), each later segment is the earliest match after the
    previous one.
    """
    upstream = statements(apply_renames(upstream_source, block.renames).splitlines(keepends=True))
    first, rest = block.segments[0], block.segments[1:]
    for start in range(len(upstream)):
        offset = first[0].indent - upstream[start].indent
        if not _run_matches(first, upstream, start, offset):
            continue
        position = start + len(first)
        for segment in rest:
            found = next((i for i in range(position, len(upstream)) if _run_matches(segment, upstream, i, offset)), None)
            if found is None:
                break
            position = found + len(segment)
        else:
            return None
    known = {u.text for u in upstream}
    missing = next((s for segment in block.segments for s in segment if s.text not in known), None)
    if missing is not None:
        return f"line {missing.line} {missing.source!r} is not an upstream statement"
    return "every statement is upstream, but not as contiguous runs in this order and indentation (a `# ...` gap?)"


def audit_copies_text(
    text: str,
    *,
    path: str,
    resolve: Callable[[str], tuple[str, str]],
    pins: dict[str, str] | None = None,
    installed: Callable[[str], str | None] | None = None,
) -> CopyAuditResult:
    """Audit the copied blocks of one file (pure but for ``resolve``/``installed``).

    ``resolve(name) -> (upstream source of the definition, package)`` raises ``LookupError``
    with the reason for an unknown name; ``installed(package)`` gives the installed version,
    checked against ``pins``.
    """
    result = CopyAuditResult(path)
    blocks, result.violations = parse_copied_blocks(text, path)
    for block in blocks:
        try:
            upstream_source, package = resolve(block.name)
        except LookupError as exc:
            result.violations.append(Violation(path, block.line, f"copied block names an unknown upstream {block.name}: {exc.args[0]}"))
            continue
        version = installed(package) if installed is not None else None
        pinned = (pins or {}).get(package.lower().replace("_", "-"))
        if pinned is not None and version != pinned:
            result.violations.append(
                Violation(path, block.line, f"installed {package}=={version} but requirements.txt pins =={pinned}: reinstall with `make venv`")
            )
            continue
        try:
            drift = copy_drift(block, upstream_source)
        except SyntaxError as exc:
            result.violations.append(Violation(path, block.line, f"upstream {block.name} is not Python after the renames: {exc.msg}"))
            continue
        if drift is not None:
            shown = f"{block.name} ({package} {version})" if version else block.name
            result.violations.append(Violation(path, block.line, f"copied block drifted from {shown}: {drift}"))
        else:
            result.blocks.append(block)
    return result


def has_copy_markers(text: str) -> bool:
    return any(COPY_OPEN.match(line) or MALFORMED_COPY.match(line) for line in text.splitlines())



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


COPY_ROOTS = ("pruning", "pipelines")  # where copied blocks live (forks are audited whole instead)


def upstream_definition(name: str) -> tuple[str, str]:
    """``(source, package)`` of a dotted upstream name in the installed package, nothing imported.

    ``diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock.forward``:
    the longest prefix that is a module file of the installed ``diffusers``, then the
    class/function path inside it, found with ``ast``. A bare module name gives the whole file.
    Raises ``LookupError`` with the reason.
    """
    package, *parts = name.split(".")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"package {package} is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    for split in range(len(parts), -1, -1):
        module = root.joinpath(*parts[:split])
        candidates = [module.with_suffix(".py"), module / "__init__.py"] if split else [root / "__init__.py"]
        module_file = next((c for c in candidates if c.is_file()), None)
        if module_file is not None:
            break
    else:
        raise LookupError(f"no module file for {package} in {root}")
    module_name = ".".join([package, *parts[:split]])
    source = module_file.read_text()
    qualname = parts[split:]
    if not qualname:
        return source, package
    body = ast.parse(source).body
    node = None
    for i, part in enumerate(qualname):
        node = next(
            (n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == part),
            None,
        )
        if node is None:
            where = ".".join([module_name, *qualname[:i]])
            raise LookupError(f"no class or function {part!r} in {where} ({module_file.relative_to(root.parent)})")
        body = node.body
    lines = source.splitlines(keepends=True)
    return "".join(lines[node.lineno - 1 : node.end_lineno]), package


def find_copy_files(root: Path) -> list[Path]:
    """Non-fork files under COPY_ROOTS that carry copy markers."""
    files = []
    for top in COPY_ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            text = path.read_text()
            if parse_header(text) is None and has_copy_markers(text):
                files.append(path)
    return files


def audit_copies_file(path: Path, pins: dict[str, str], display_root: Path = REPO_ROOT) -> CopyAuditResult:
    try:
        shown = str(path.resolve().relative_to(display_root))
    except ValueError:
        shown = str(path)
    return audit_copies_text(path.read_text(), path=shown, resolve=upstream_definition, pins=pins, installed=installed_version_of)


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
    parser.add_argument(
        "paths", nargs="*", type=Path,
        help="files to audit: forks (with an upstream header) or files with copied blocks "
        "(default: every fork under models/ and every copied block under " + ", ".join(COPY_ROOTS) + "/)",
    )
    parser.add_argument("--quiet", action="store_true", help="print violations only, not the diffs or the copied blocks")
    parser.add_argument("--requirements", type=Path, default=REPO_ROOT / "requirements.txt")
    parser.add_argument("--init", nargs=3, metavar=("PACKAGE", "UPSTREAM_PATH", "DEST"), help="create a fresh fork")
    args = parser.parse_args(argv)

    if args.init:
        package, upstream_path, dest = args.init
        init_fork(package, upstream_path, Path(dest))
        print(f"forked {package}/{upstream_path} -> {dest}")
        return 0

    if args.paths:
        paths = args.paths
    else:
        paths = find_forks(REPO_ROOT)
        if not paths:
            print("error: no forks found under models/ (a fork starts with an `# upstream-...` header)", file=sys.stderr)
            return 1
        paths += find_copy_files(REPO_ROOT)
    pins = read_pins(args.requirements)
    failed = 0
    for path in paths:
        if not path.exists():
            print(f"error: {path}: no such file", file=sys.stderr)
            failed += 1
            continue
        text = path.read_text()
        if parse_header(text) is None and has_copy_markers(text):
            copies = audit_copies_file(path, pins)
            if not args.quiet:
                for block in copies.blocks:
                    print(f"copied block OK: {copies.path}:{block.line} <- {block.name}")
            for violation in copies.violations:
                print(f"error: {violation}", file=sys.stderr)
            status = f"{len(copies.blocks)} copied block(s) OK" if copies.ok else f"FAILED ({len(copies.violations)} violation(s))"
            print(f"diff-upstream: {copies.path}: {status}")
            failed += not copies.ok
            continue
        result = audit_file(path, pins)
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
