"""The documentation build's own step (an mkdocs hook, `hooks:` in mkdocs.yml): what is generated, and what fails.

Generated at build time, never committed, so it cannot go stale:

* the method reference: `<!-- methods:summary -->` becomes the table `jaxmerge methods --markdown`
  prints, and `<!-- methods:family MODULE -->` one section per method of that module's `METHODS`
  (parameters, defaults, ranges, paper), read from the method table (jaxmerge/methods/_table.py);
* the benchmark tables: `<!-- bench:FILE.json -->` becomes a table read from benchmarks/results/FILE.json
  with its machine, date and command, and `<!-- bench:all -->` lists every result file, so a new one
  shows up without anyone retyping it;
* the command-line reference (reference/cli.md) from the `jaxmerge` argument parser;
* the notebooks (notebooks/*.ipynb, rendered by mkdocs-jupyter without executing) and the
  changelog (CHANGELOG.md) as pages.

The build stops (PluginError) on: a public function or class of the API reference without a docstring
(every module named by a `::: module` line of docs/api/*.md, and everything `jaxmerge` exports), a
method-table module without a family page, a method missing from the pages, an unknown marker.
Broken links, missing pages and pages left out of the navigation are mkdocs' own warnings, which
`mkdocs build --strict` turns into errors (`validation:` in mkdocs.yml).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
MARKER = re.compile(r"<!--\s*(methods|bench):\s*([^\s>]*)\s*([^\s>]*)\s*-->")


# --- the API reference: every public function and class has a docstring ------------------------

def _api_identifiers(docs_dir: Path) -> list[str]:
    ids = []
    for page in sorted((docs_dir / "api").glob("*.md")):
        ids += re.findall(r"^::: *([\w.]+)", page.read_text(), flags=re.M)
    return ids


def check_docstrings(docs_dir: Path) -> list[str]:
    """Paths of the public functions and classes the API reference shows that have no docstring.

    A module's public names are its `__all__` (read at run time: `jaxmerge`'s is built from a tuple,
    which a static reader cannot expand), else its members not starting with `_` that it defines.
    """
    import importlib

    import griffe

    identifiers = _api_identifiers(docs_dir)
    loader = griffe.GriffeLoader(search_paths=[str(REPO)], docstring_parser=griffe.Parser.google)
    packages = {name: loader.load(name) for name in sorted({i.split(".")[0] for i in identifiers} | {"jaxmerge"})}
    loader.resolve_aliases(implicit=False, external=False)

    def lookup(path: str):
        obj = packages[path.split(".")[0]]
        for part in path.split(".")[1:]:
            obj = obj.members[part]
        return obj.final_target if obj.is_alias else obj

    missing = []
    for identifier in ["jaxmerge", *identifiers]:
        obj = lookup(identifier)
        if not obj.is_module:
            candidates = [obj]
        else:
            exported = getattr(importlib.import_module(identifier), "__all__", None)
            if exported is None:
                candidates = [m for n, m in obj.members.items() if not n.startswith("_") and not m.is_alias]
            else:
                candidates = []
                for name in exported:
                    member = lookup(f"{identifier}.{name}")
                    if member.is_module and name in member.members:  # a function named as its module
                        member = lookup(f"{member.path}.{name}")
                    candidates.append(member)
        for member in candidates:
            if (member.is_function or member.is_class) and not member.docstring and member.path not in missing:
                missing.append(member.path)
    return missing


def check_package_page(docs_dir: Path) -> None:
    """Every name `jaxmerge` exports is on its reference page (rendered, or linked to its module's page)."""
    import jaxmerge

    text = (docs_dir / "api" / "index.md").read_text()
    lacking = [name for name in jaxmerge.__all__ if not re.search(rf"(- {name}\n|`{name}`)", text)]
    if lacking:
        raise PluginError(f"docs/api/index.md does not show these exports of jaxmerge: {', '.join(lacking)}")


# --- the method reference -----------------------------------------------------------------------

def _methods_markdown() -> str:
    """Exactly what `jaxmerge methods --markdown` prints (the README's table too)."""
    from jaxmerge.cli import _methods

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _methods(argparse.Namespace(name=None, markdown=True))
    return out.getvalue()


def _family_of() -> dict[str, str]:
    """Method name -> the module that declares it."""
    import importlib

    from jaxmerge.methods._modules import MODULES

    return {m.name: module for module in MODULES for m in importlib.import_module(module).METHODS}


def _page_of(module: str) -> str:
    return module.rsplit(".", 1)[-1] + ".md"


def _paper(text: str) -> str:
    text = re.sub(r"arXiv:(\d{4}\.\d{4,5})", r"[arXiv:\1](https://arxiv.org/abs/\1)", text)
    return re.sub(r"(?<!\()(https?://[^\s,;)]+)", r"<\1>", text)


def methods_summary(page_dir: str) -> str:
    """The summary table, each method's name linking to its section of its family's page."""
    family = _family_of()
    prefix = "" if page_dir == "methods" else "../methods/"
    lines = []
    for line in _methods_markdown().splitlines():
        m = re.match(r"\| `(\w+)` \|", line)
        if m:
            name = m.group(1)
            link = f"{prefix}{_page_of(family[name])}#{name}"
            line = line.replace(f"| `{name}` |", f"| [`{name}`]({link}) |", 1)
        lines.append(_paper(line) if m else line)
    return "\n".join(lines) + "\n"


def _default(p) -> str:
    from jaxmerge.methods._table import REQUIRED

    if p.default is REQUIRED:
        return "required"
    if p.default is None:
        return "auto"
    return f"`{p.default!r}`"


def methods_family(module: str) -> str:
    """One section per method the module declares."""
    import importlib

    from jaxmerge.methods import _table as table

    out = []
    for declared in importlib.import_module(module).METHODS:
        m = table.get(declared.name)
        models = f"{m.min_models} or more" if m.max_models is None else (
            str(m.min_models) if m.min_models == m.max_models else f"{m.min_models} to {m.max_models}")
        counted = " (the base included)" if m.base is not table.BasePolicy.IGNORED else ""
        out += [
            f"## `{m.name}` {{#{m.name}}}", "",
            m.summary[:1].upper() + m.summary[1:] + ".", "",
            f"- **Base model**: {m.base.value}",
            f"- **Models**: {models}{counted}",
            f"- **Random**: {'yes, drawn from `key` (`seed` in recipes and commands)' if m.random else 'no'}",
            f"- **One kernel per tensor size**: {'yes (entry-wise)' if m.entrywise is not None else 'no (shape matters)'}",
            f"- **Paper**: {_paper(m.paper)}",
            "",
        ]
        if m.params:
            out += ["| parameter | type | per model | default | allowed | meaning |",
                    "| --- | --- | --- | --- | --- | --- |"]
            for p in m.params:
                allowed = "/".join(f"`{c}`" for c in p.choices) if p.choices else (
                    p._range().removeprefix("in ") if p.low is not None or p.high is not None else "")
                out.append(f"| `{p.name}` | {p.kind.__name__} | {'yes' if p.scope.value != 'shared' else ''} | "
                           f"{_default(p)} | {allowed} | {p.doc.replace('|', '/')} |")
            out.append("")
        else:
            out += ["No parameters.", ""]
        out += ["```bash", f"jaxmerge methods {m.name}", "```", ""]
    return "\n".join(out)


def check_method_pages(docs_dir: Path) -> None:
    from jaxmerge.methods._modules import MODULES

    text = "".join(p.read_text() for p in (docs_dir / "methods").glob("*.md"))
    documented = set(re.findall(r"<!--\s*methods:\s*family\s+([\w.]+)\s*-->", text))
    lacking = [m for m in MODULES if m not in documented]
    if lacking:
        raise PluginError(f"method families without a page in docs/methods/ (a `<!-- methods:family MODULE -->` "
                          f"marker): {', '.join(lacking)}")
    for module in MODULES:
        if not (docs_dir / "methods" / _page_of(module)).exists():
            raise PluginError(f"docs/methods/{_page_of(module)} should hold the family {module}")


# --- benchmarks ---------------------------------------------------------------------------------

# How each committed result file was made, where the file does not record it (newer files hold `command`).
COMMANDS = {
    "cpu-2core.json": "python -m benchmarks.compare --json benchmarks/results/cpu-2core.json",
    "methods_rest.json": "python -m benchmarks.methods --size 4096 --repeats 3 --json benchmarks/results/methods_rest.json",
    "vs_mergekit.json": "python -m benchmarks.vs_mergekit --dtypes float32,bfloat16 --reps 0",
    "vs_mergekit_methods.json": "python -m benchmarks.vs_mergekit --methods dare_ties,task_arithmetic --rounds 2 --reps 0 "
                                "--output benchmarks/results/vs_mergekit_methods.json",
    "vs_mergekit_large.json": "python -m benchmarks.vs_mergekit --sizes large --rounds 2 --reps 0 "
                              "--output benchmarks/results/vs_mergekit_large.json",
    "vs_mergekit_tinyllama.json": "python -m benchmarks.vs_mergekit --sizes tinyllama --dtypes bfloat16 --methods slerp,linear "
                                  "--rounds 2 --reps 0 --baseline /tmp/vsm/baseline --dir /tmp/vsm "
                                  "--output benchmarks/results/vs_mergekit_tinyllama.json",
    "processes.json": "python -m benchmarks.processes",
    "quality.json": "python -m benchmarks.quality",
    "quality-quick.json": "python -m benchmarks.quality --quick",
    "write_recycling.json": "python -m benchmarks.write_recycling",
}


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        if x == 0:
            return "0"
        return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits else f"{x:.2g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(_num(v, digits) for v in x)
    return str(x).replace("|", "/")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _committed(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ad", "--date=short", "--", str(path)],
                             cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _provenance(path: Path, data: dict) -> str:
    machine = data.get("machine")
    date = data.get("date")
    if isinstance(machine, dict):
        date = date or machine.get("date")
        bits = [f"{machine.get('cpu_count', '?')} cores", machine.get("processor", ""), machine.get("device", "")]
        versions = ", ".join(f"{k} {machine[k]}" for k in ("jax", "torch", "peft") if k in machine)
        machine = " ".join(b for b in bits if b) + (f" ({versions})" if versions else "")
    if not date:
        committed = _committed(path)
        date = f"not recorded (file committed {committed})" if committed else "not recorded"
    command = data.get("command") or COMMANDS.get(path.name) or "not recorded"
    return (f"*`benchmarks/results/{path.name}`: machine {machine or 'not recorded'}; date {date}; "
            f"command `{command}`.*\n\n")


def _shape(text: str) -> str:
    sides = text.split("x")
    return f"{sides[0]}²" if len(sides) == 2 and sides[0] == sides[1] else text


def _bench_compare(data: dict) -> str:
    rows = [[f"`{r['function']}`", _shape(r["shape"]), r["tasks"], r["peft_s"], r["jaxmerge_s"], f"{r['speedup']:.1f}x",
             f"{r['first_call_s']:.2f}", f"{r['ratio_to_floor']:.1f}", f"{r['peak_memory_x_inputs']:.2f}",
             r.get("interop_s"),
             f"{100 * r['interop_keeps_speedup']:.0f}%" if r.get("interop_keeps_speedup") is not None else ""]
            for r in data["rows"]]
    return _table(["function", "shape", "tasks", "PEFT s", "jaxmerge s", "speed-up", "first call s",
                   "x read-once floor", "XLA peak / inputs", "interop s", "interop keeps"], rows)


def _bench_methods(data: dict) -> str:
    rows = [[f"`{r['method']}`", r["models"], r["mergekit_s"], r["jaxmerge_s"], f"{r['speedup']:.1f}x",
             f"{r['first_call_s']:.2f}"] for r in sorted(data["rows"], key=lambda r: -r["speedup"])]
    return (f"Size {data.get('size')}² float32, a base and the models listed.\n\n"
            + _table(["method", "models", "mergekit s", "jaxmerge s", "speed-up", "jaxmerge first call s"], rows))


def _floor(row: dict, key: str, one_thread_key: str, digits: int) -> str:
    """`row[key]`, and in brackets the figure against the one-reading-thread floor where the run has it."""
    text = f"{row[key]:.{digits}f}"
    return f"{text} ({row[one_thread_key]:.{digits}f})" if one_thread_key in row else text


def _bench_vs_mergekit(data: dict) -> str:
    rows = []
    for r in data["rows"]:
        peak = r["peak_gb"]
        rows.append([r["size"], r["dtype"], f"`{r['method']}`", f"{r['model_gb']:.2f}",
                     f"{r['mergekit_s']:.1f} / {peak['mergekit']:.2f}", f"{r['jaxmerge_s']:.1f}",
                     f"{r['jaxmerge_cached_s']:.1f}", f"{r['speedup']:.1f}x ({r['speedup_cached']:.1f}x)",
                     f"{peak['jaxmerge_cached']:.2f} ({r['rss_ratio']:.2f}x)", _floor(r, "floor_s", "floor_one_thread_s", 2),
                     _floor(r, "x_floor_cached", "x_floor_one_thread_cached", 1)])
    note = (" The floor reads as jaxmerge reads, with several threads; in brackets, the floor with one reading "
            "thread, as measured before jaxmerge read in parallel."
            if any("floor_one_thread_s" in r for r in data["rows"]) else "")
    return (f"Medians of {data.get('rounds')} alternating rounds, each tool in its own process.{note}\n\n"
            + _table(["model", "dtype", "method", "GB per model", "mergekit s / peak GB", "jaxmerge s, compiling",
                      "jaxmerge s, cached", "speed-up (cached)", "jaxmerge peak GB (x mergekit's)", "floor s",
                      "cached x floor"], rows))


def _bench_quality(data: dict) -> str:
    rows = []
    for name, r in sorted(data["methods"].items(), key=lambda kv: -kv[1]["average"]):
        hyper = ", ".join(f"{k} {_num(v) if not isinstance(v, list) else '(per task)'}"
                          for k, v in (r.get("hyperparameters") or {}).items() if k != "coefficients")
        rows.append([name, f"{100 * r['average']:.1f}", f"{100 * r['normalized']:.1f}", hyper])
    return _table(["method", "average accuracy %", "normalised %", "chosen on validation"], rows)


def _bench_processes(data: dict) -> str:
    med = data["medians_s"]
    peaks = {k: max(max(p) for p in v) for k, v in data["peaks_gb"].items()}
    rows = [["one process", med["one"], f"{peaks['one']:.2f}"], ["two processes", med["two"], f"{peaks['two']:.2f}"]]
    return (f"{data.get('size')} {data.get('dtype')} `{data.get('method')}`, {data.get('shards')} shards of "
            f"{data.get('max_shard_size')}, medians of {data.get('rounds')} rounds; two over one: "
            f"{data['two_over_one']:.2f}x; outputs identical byte for byte: {_num(data.get('identical_output'))}.\n\n"
            + _table(["run", "median wall s", "peak RSS GB (largest process)"], rows))


def _bench_fresh_buffers(data: dict) -> str:
    rows = [[k, data["median_fresh_s"][k], data["median_again_s"][k], ", ".join(f"{s:.3f}" for s in data["fresh_s"][k])]
            for k in data["median_fresh_s"]]
    return (f"{data['mb']:.0f} MB read into a fresh buffer, then again into it; {data['rounds']} alternating rounds, "
            f"each a fresh process, {data['gap_s']:g} s apart.\n\n"
            + _table(["buffer", "median s, fresh", "median s, again", "every round s, fresh"], rows))


def _bench_parallel_reads(data: dict) -> str:
    rows = [[k, v, f"{data['gb_per_s'][k]:.1f}", ", ".join(f"{s:.3f}" for s in data["seconds"][k])]
            for k, v in data["median_s"].items()]
    return (f"{data['gb']:.1f} GB from {len(data['files'])} files in {data['range_mb']:.0f} MB ranges, "
            f"{data['rounds']} alternating rounds.\n\n"
            + _table(["reading", "median s", "GB/s", "every round s"], rows))


def _bench_cold_reads(data: dict) -> str:
    rows = [[k, v, ", ".join(f"{s:.2f}" for s in data["seconds"][k])] for k, v in data["median_s"].items()]
    return (f"{data['inputs_gb']:.1f} GB of inputs dropped from the page cache before every run, "
            f"{data['rounds']} alternating rounds: reading ahead {data['speed_up']:.2f}x faster than without, "
            f"{data['x_floor']['read ahead']:.2f}x the I/O floor.\n\n"
            + _table(["run", "median s", "every round s"], rows))


def _bench_write_recycling(data: dict) -> str:
    med = data["median_s"]
    rows = [[k, v, ", ".join(f"{s:.2f}" for s in data["seconds"][k])] for k, v in med.items()]
    return (f"A {data['file_gb']:.2f} GB file, {data['rounds']} alternating rounds, {data['gap_s']:g} s apart.\n\n"
            + _table(["page cache", "median s", "every round s"], rows))


def _scalars(record: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in record.items():
        if isinstance(v, dict):
            flat.update({f"{prefix}{k}.{kk}": vv for kk, vv in _scalars(v).items()})
        elif not isinstance(v, list) or all(not isinstance(x, (dict, list)) for x in v):
            flat[f"{prefix}{k}"] = v
    return flat


def _bench_generic(data: dict) -> str:
    """Any result file: its first list of records as a table, else its scalar fields."""
    skip = {"machine", "date", "command"}
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            records = [_scalars(r) for r in value]
            columns = [c for c in dict.fromkeys(c for r in records for c in r) if not isinstance(records[0].get(c), list)]
            columns = [c for c in columns if not re.search(r"(^|\.)(load_|walls_|seconds)", c)][:12]
            return f"`{key}`:\n\n" + _table(columns, [[r.get(c) for c in columns] for r in records])
    flat = {k: v for k, v in _scalars(data).items() if k.split(".")[0] not in skip}
    return _table(["field", "value"], [[f"`{k}`", v] for k, v in list(flat.items())[:30]])


def _render_bench(path: Path) -> str:
    """The file's provenance line and its table: a renderer of its own for the known kinds, else generic."""
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data.get("rows"), list) and data.get("rows") else [{}]
    if "peft_s" in rows[0]:
        render = _bench_compare
    elif "jaxmerge_cached_s" in rows[0] and "peak_gb" in rows[0]:
        render = _bench_vs_mergekit
    elif {"mergekit_s", "jaxmerge_s", "first_call_s", "method"} <= set(rows[0]):
        render = _bench_methods
    elif data.get("benchmark") == "benchmarks.quality":
        render = _bench_quality
    elif "two_over_one" in data:
        render = _bench_processes
    elif "gb_per_s" in data:
        render = _bench_parallel_reads
    elif "most_still_cached_after_evicting" in data:
        render = _bench_cold_reads
    elif "median_s" in data and "seconds" in data:
        render = _bench_write_recycling
    elif "median_fresh_s" in data:
        render = _bench_fresh_buffers
    else:
        render = _bench_generic
    try:
        body = render(data)
    except (KeyError, TypeError, ValueError, AttributeError):  # a known kind whose fields changed: show it as it is
        body = _bench_generic(data)
    return _provenance(path, data) + body


def bench(which: str, shown: set[str]) -> str:
    if which == "all":
        files = sorted(RESULTS.glob("*.json"))
        out = []
        for path in files:
            if path.name in shown:
                continue
            out += [f"### `{path.name}`", "", _render_bench(path)]
        listing = _table(["file", "machine / date / command"],
                         [[f"`{p.name}`", _provenance(p, json.loads(p.read_text())).strip().strip("*")] for p in files])
        return "\n".join(out) + "\nEvery result file:\n\n" + listing
    path = RESULTS / which
    if not path.exists():
        raise PluginError(f"benchmarks page: no result file benchmarks/results/{which}")
    shown.add(which)
    return _render_bench(path)


# --- the command-line reference -----------------------------------------------------------------

def cli_reference() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal's width: fixed here
    from jaxmerge.cli import build_parser

    parser = build_parser()
    out = ["# Command line", "",
           "Generated from the `jaxmerge` command's own parser at build time: what `jaxmerge COMMAND --help` prints.",
           "", "```text", parser.format_help().rstrip(), "```", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        out += [f"## `jaxmerge {name}`", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(out)


# --- mkdocs events ------------------------------------------------------------------------------

def on_config(config):
    docs_dir = Path(config["docs_dir"])
    missing = check_docstrings(docs_dir)
    if missing:
        raise PluginError("public functions or classes without a docstring (the API reference would lack them): "
                          + ", ".join(missing))
    check_package_page(docs_dir)
    check_method_pages(docs_dir)
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns the notebooks into pages
def on_files(files: Files, config) -> Files:
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        # A real file whose source folder is the repository (mkdocs-jupyter reads it through src_dir).
        files.append(File(f"notebooks/{notebook.name}", src_dir=str(REPO), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    changelog = (REPO / "CHANGELOG.md").read_text()
    files.append(File.generated(config, "changelog.md", content=changelog))
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    return files


_shown_benchmarks: set[str] = set()


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "benchmarks.md":
        _shown_benchmarks.clear()
    page_dir = str(Path(page.file.src_uri).parent)

    def replace(match: re.Match) -> str:
        kind, arg, extra = match.groups()
        if kind == "methods" and arg == "summary":
            return methods_summary(page_dir)
        if kind == "methods" and arg == "family":
            return methods_family(extra)
        if kind == "bench":
            return bench(arg, _shown_benchmarks)
        raise PluginError(f"{page.file.src_uri}: unknown marker {match.group(0)}")

    return MARKER.sub(replace, markdown)

