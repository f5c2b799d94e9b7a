"""The documentation's sources: docstrings in the one style mkdocstrings renders, a nav whose pages
exist, no asset from a CDN, and a tutorial page whose code runs and whose numbers hold.

Nothing here builds the site or needs a browser by default; `tests/check_docs_offline.py` does that
(headless Chromium), run by the last test only when SDEKIT_DOCS_BROWSER=1 (not in CI)."""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("sdekit", "diffusion")

# Sphinx/RST markup that mkdocstrings prints literally (the standard is $...$, $$...$$, backticks).
RST_MARKUP = re.compile(
    r":(?:math|class|func|meth|attr|mod|obj|ref|data|exc|py:\w+):`"
    r"|^\s*\.\. (?:math|note|warning|code-block|code|seealso|versionadded|deprecated)::"
    r"|::\s*$",
    re.M,
)
NAV_PAGE = re.compile(r"^\s*-\s*(?:[^\n:]+:\s*)?([\w./-]+\.md)\s*$", re.M)
REMOTE = re.compile(r"^(?:https?:)?//", re.I)


def docstrings(path: pathlib.Path):
    """(line, qualified name, docstring) of the module, every class and every function in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(child, clean=False)
                name = f"{prefix}{child.name}"
                if doc:
                    found.append((child.lineno, name, doc))
                visit(child, name + ".")

    module_doc = ast.get_docstring(tree, clean=False)
    if module_doc:
        found.append((1, "<module>", module_doc))
    visit(tree, "")
    return found


def rst_markup_in(paths, root=ROOT):
    bad = []
    for path in paths:
        for line, name, doc in docstrings(path):
            for match in RST_MARKUP.finditer(doc):
                bad.append(f"{path.relative_to(root)}:{line} {name}: {match.group().strip()!r}")
    return bad


def package_sources():
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_docstrings_have_no_sphinx_roles_or_rst_directives():
    sources = package_sources()
    assert len(sources) > 30, "the package sources were not found"
    bad = rst_markup_in(sources)
    assert not bad, "Sphinx/RST markup in docstrings (write $...$, $$...$$ or `name`):\n" + "\n".join(bad)


def test_the_markup_scan_finds_what_it_should(tmp_path):
    """The scanner sees roles and directives in module, class, method and nested docstrings, and
    leaves Markdown alone."""
    src = tmp_path / "m.py"
    src.write_text(
        '"""Module with :math:`x^2`."""\n'
        "class A:\n"
        '    """A class.\n\n    .. math::\n\n        x\n    """\n'
        "    def f(self):\n"
        '        """See :class:`B` and :func:`g`."""\n'
        "        def inner():\n"
        '            """Literal block::\n\n                code\n            """\n'
        "def ok():\n"
        '    """Markdown: $x^2$, $$y$$, `name`, ``name``, a ratio 1:2 and a time 10:30."""\n',
        encoding="utf-8",
    )
    bad = rst_markup_in([src], root=tmp_path)
    assert [b.split(": ", 1)[1] for b in bad] == ["':math:`'", "'.. math::'", "':class:`'", "':func:`'",
                                                   "'::'"], bad


COMBINED_PARAM = re.compile(r"^(\s*)(\**\w+(?:, \**\w+)+)\s*(?::\s*(.*))?$")


def combined_parameters_of_different_kinds(path: pathlib.Path):
    """NumPy-style ``a, b:`` entries (in a Parameters section) whose names differ in annotation or
    default in the signature: the API reference (griffe) gives every name the first one's type and
    default, so such a row is printed wrong."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            func, doc = init, ast.get_docstring(node, clean=True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            func, doc = node, ast.get_docstring(node, clean=True)
        else:
            continue
        if not doc or "Parameters\n----------" not in doc:
            continue
        if func is not None:
            args = func.args
            positional = args.posonlyargs + args.args
            defaults = dict(zip([a.arg for a in positional][len(positional) - len(args.defaults):], args.defaults))
            defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
            kinds = {a.arg: (ast.unparse(a.annotation) if a.annotation else None,
                             ast.unparse(defaults[a.arg]) if a.arg in defaults else None)
                     for a in positional + args.kwonlyargs}
        elif isinstance(node, ast.ClassDef):  # a dataclass: its annotated fields are the parameters
            kinds = {f.target.id: (ast.unparse(f.annotation), ast.unparse(f.value) if f.value else None)
                     for f in node.body if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)}
        else:
            continue
        section = doc.split("Parameters\n----------", 1)[1].split("\n\n", 1)[0]
        for line in section.splitlines():
            m = COMBINED_PARAM.match(line)
            if not m or m.group(1) or m.group(3):
                continue
            names = [n.strip().lstrip("*") for n in m.group(2).split(",")]
            if any(n in kinds for n in names) and len({kinds.get(n) for n in names}) > 1:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {m.group(2)}")
    return bad


def test_no_shared_parameter_row_for_parameters_of_different_types():
    bad = [b for path in package_sources() for b in combined_parameters_of_different_kinds(path)]
    assert not bad, ("docstring rows naming several parameters of different types/defaults "
                     "(the API reference prints the first one's for all; split them):\n" + "\n".join(bad))


def mkdocs_config() -> str:
    return (ROOT / "mkdocs.yml").read_text(encoding="utf-8")


def test_every_nav_page_exists():
    pages = NAV_PAGE.findall(mkdocs_config())
    assert len(pages) >= 5, "could not read the nav of mkdocs.yml"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"pages in the mkdocs.yml nav that do not exist under docs/: {missing}"


def test_site_assets_are_local():
    """Scripts, styles and fonts come from the built site, never from a CDN: mkdocs.yml's
    extra_javascript / extra_css are local files, Material's Google Fonts are off, and no page,
    script or stylesheet of ours loads anything over http(s)."""
    cfg = mkdocs_config()
    assert re.search(r"^\s*font:\s*false\b", cfg, re.M), "theme.font must be false (Google Fonts CDN)"
    for key in ("extra_javascript", "extra_css"):
        m = re.search(rf"^{key}:\s*\n((?:\s+-[^\n]*\n?)+)", cfg, re.M)
        entries = re.findall(r"-\s*(?:path:\s*)?([^\s#]+)", m.group(1)) if m else []
        for entry in entries:
            assert not REMOTE.match(entry), f"{key} loads {entry} from the network"
            assert (DOCS / entry).is_file(), f"{key} entry {entry} is not a file under docs/"
    fonts = DOCS / "javascripts" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2"
    assert (DOCS / "javascripts" / "mathjax" / "tex-chtml.js").is_file() and len(list(fonts.glob("*.woff"))) >= 10
    loads = re.compile(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//"
                       r"|@import\s+(?:url\()?[\"']?(?:https?:)?//|url\(\s*[\"']?(?:https?:)?//"
                       r"|\.src\s*=\s*[\"'](?:https?:)?//", re.I)
    own = [*DOCS.glob("*.md"), *(DOCS / "stylesheets").glob("*.css"), *(DOCS / "javascripts").glob("*.js")]
    offenders = [f"{p.relative_to(ROOT)}: {m.group()}" for p in own
                 for m in loads.finditer(p.read_text(encoding="utf-8"))]
    assert not offenders, "assets loaded from the network:\n" + "\n".join(offenders)


# ----------------------------------------------------------------------------------------------
# docs/byo_network.md runs as written
# ----------------------------------------------------------------------------------------------
BYO = DOCS / "byo_network.md"


def python_blocks(page: pathlib.Path):
    return re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)


def test_bring_your_own_network_page_runs_and_its_numbers_hold():
    import diffusion.nets

    blocks = python_blocks(BYO)
    assert len(blocks) >= 5, "the tutorial lost its code blocks"
    ns = {"__name__": "__byo_network__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    nets_before = dict(diffusion.nets.NETS)
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{BYO}:block{i}", "exec"), ns)
        # the page prints u for t = 1e-3, 0.5, 1 and says it spans about [-7, 5] from 1e-5 to 1
        assert ns["u"].tolist() == pytest.approx([-4.5577, 1.2276, 5.0250], abs=1e-4)
        span = ns["model"].noise_cond(torch.tensor([1e-5, 1.0]))
        assert -7.5 < float(span[0]) < -6.5 and 4.5 < float(span[1]) < 5.5
        # training lowered the loss; samples: 20 evaluations of dpmpp_2m, finite SDE samples
        loss = ns["history"]["loss"]
        assert sum(loss[-20:]) / 20 < 0.8 * sum(loss[:20]) / 20
        assert ns["samples"].stats.nfe == 20 and tuple(ns["samples"].x.shape) == (1000, 2)
        assert torch.isfinite(ns["noisy"].x).all()
        # the likelihood numbers the page quotes: untrained ~5.9, trained ~1.6, exact 0.75 nats/dim
        torch.manual_seed(0)
        untrained = diffusion.ScoreModel(ns["TinyMLP"](), ns["sde"], predict="eps")
        nll_untrained = -untrained.log_likelihood(ns["test"].data, rtol=1e-4, atol=1e-4).log_prob.mean().item() / 2
        assert nll_untrained == pytest.approx(5.9, abs=0.3)
        assert ns["nll_exact"] == pytest.approx(0.75, abs=0.01)
        assert ns["nll_exact"] < ns["nll_model"] < nll_untrained - 3
        assert ns["nll_model"] == pytest.approx(1.6, abs=0.3)
        assert "SavableTinyMLP" in diffusion.nets.NETS
    finally:
        torch.set_num_threads(threads)
        diffusion.nets.NETS.clear()
        diffusion.nets.NETS.update(nets_before)


@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("SDEKIT_DOCS_BROWSER") != "1",
                    reason="builds the site and opens it in headless Chromium: set SDEKIT_DOCS_BROWSER=1 "
                           "(needs the docs extra, playwright and a Chromium)")
def test_built_site_renders_offline_in_a_browser(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "check_docs_offline.py"), "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert run.returncode == 0, run.stdout + run.stderr
