"""The conformance matrix: one row per runtime (its canonical backend id), a column per obligation.

A runtime with an evidence bundle (`<report-dir>/<backend>/`) gets the run's labels, each
cell lowered (never raised) by the lowering checker's verdict on its descriptors'
proposals, which the row links. A runtime with only descriptors gets a static row. Output:

* `matrix.md`   - Markdown: label codes per cell, the reasons listed under the table;
* `matrix.html` - one self-contained page (inline CSS, PNGs embedded): the reason of each
                  cell on hover and in an expandable note, links to the evidence, and for each
                  run-backed row a timeline of the canonical probe (pool occupancy by resident,
                  active and other blocks, with the refusal or admission marked).
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from pytest_rkv.contract import OBLIGATIONS, Label
from pytest_rkv.evidence import ROW, EvidenceError, Row, read_row
from pytest_rkv.provenance import summary as provenance_summary

CODES = {
    Label.NATIVE.value: "N",
    Label.ADAPTER.value: "A",
    Label.APPROXIMATION.value: "S",
    Label.REJECTED.value: "R",
    Label.UNKNOWN.value: "?",
    None: "-",
}
COLOURS = {"N": "#1a7f37", "A": "#4f7fd1", "S": "#c9a227", "R": "#cf222e", "?": "#8c959f", "-": "#eaeef2"}


@dataclass
class MatrixRow:
    name: str  # the canonical backend id: one row per runtime
    label: str
    reason: str
    cells: dict[str, tuple[str | None, str]]  # obligation id -> (label, reason)
    source: str  # path of the evidence (the bundle's row.json, else a descriptor)
    kind: str  # "run" or "static"
    timeline: list[dict] = field(default_factory=list)
    timeline_from: str = ""
    runtime: str = ""  # "vllm 0.32.0"
    proposals: list[tuple[str, str]] = field(default_factory=list)  # (descriptor path, its checked label)
    provenance: str = ""  # one line: suite, runtime build, platform, stand-ins (run rows)


# Lowest first: a cell is the lowest of the run's label and what the checker gives each
# proposal (which is never above the run's label, but may be a rejected mapping).
_ORDER = [Label.REJECTED.value, Label.UNKNOWN.value, Label.APPROXIMATION.value, Label.ADAPTER.value,
          Label.NATIVE.value]


def _lowest(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:  # not applicable in one: the other decides
        return b if a is None else a
    return min(a, b, key=_ORDER.index)


def row_from_bundle(path: Path) -> MatrixRow:
    row = read_row(path)
    row_path = path / ROW if path.is_dir() else path
    cells = {ob.id: (_value(row.obligations[ob.id].label) if ob.id in row.obligations else None,
                     row.obligations[ob.id].reason if ob.id in row.obligations else "")
             for ob in OBLIGATIONS}
    timeline, source = _timeline(row)
    return MatrixRow(
        name=row.backend, label=row.label.value, reason=row.reason, cells=cells, source=str(row_path),
        kind="run", timeline=timeline, timeline_from=source,
        runtime=f"{row.runtime} {row.runtime_version or ''}".strip(),
        provenance=provenance_summary(row.provenance) if row.provenance else "",
    )


def runtime_rows(bundles: list[Path], checks: list["RowCheck"]) -> list[MatrixRow]:
    """One row per canonical backend id. A run-backed runtime: the run's labels, each cell
    lowered (never raised) by what the checker gives its descriptors' proposals, which are
    linked from the row; a rejected proposal marks its cells, not the runtime's row label.
    A runtime with no run: its descriptors' static labels."""
    rows: dict[str, MatrixRow] = {}
    for path in bundles:
        r = row_from_bundle(path)
        if r.name in rows:
            raise EvidenceError(f"two bundles for backend {r.name}: {rows[r.name].source} and {r.source}")
        rows[r.name] = r
    for check in checks:
        r = rows.get(check.backend)
        if r is None:
            rows[check.backend] = r = MatrixRow(
                name=check.backend, label=check.label.value, reason=check.reason,
                cells={ob_id: (_value(c.label), "; ".join(f.text for f in c.findings) or "-")
                       for ob_id, c in check.obligations.items()},
                source=check.source or check.name, kind="static",
                runtime=f"{check.runtime} {check.version}".strip())
        else:
            for ob_id, c in check.obligations.items():
                label, reason = r.cells[ob_id]
                lowered = _lowest(label, _value(c.label))
                if lowered != label:
                    reason = f"{reason}; lowered by {Path(check.source).name}: {c.reason}"
                r.cells[ob_id] = (lowered, reason)
            # A rejected proposal is a verdict on that mapping, shown in its cells and linked;
            # the runtime's row keeps what its run earned (lowered only by weaker evidence).
            lowered = r.label if check.label == Label.REJECTED else _lowest(r.label, check.label.value)
            if lowered != r.label:
                r.label, r.reason = lowered, f"{r.reason}; lowered by {Path(check.source).name}: {check.reason}"
        r.proposals.append((check.source, check.label.value))
    return sorted(rows.values(), key=lambda r: (r.kind != "run", r.name))


def _timeline(row: Row) -> tuple[list[dict], str]:
    """The canonical probe's timeline: from the claim test when the backend has claims,
    else from the same probe without a claim (stock behaviour)."""
    for ob_id, entry in (("active-refusal", row.obligations.get("active-refusal")),
                         ("eviction_observable", row.substrates.get("eviction_observable"))):
        for test in entry.tests if entry else []:
            if test.evidence.get("timeline"):
                what = ("60-block hard claim, 70-block prefill" if ob_id == "active-refusal"
                        else "no claim API: 60-block cached prompt, 70-block prefill")
                return test.evidence["timeline"], what
    return [], ""


# -- text, for `rkv check` ------------------------------------------------------------

def render_check(check: "RowCheck") -> str:
    """Per-obligation labels with their reasons, then the row."""
    lines = [f"{check.name}: {check.runtime} {check.version} (backend {check.backend}; evidence: {check.evidence})"]
    for ob_id, c in check.obligations.items():
        label = c.label.value if c.label else "n/a"
        proposed = f"proposed {c.proposed.value}" + (f" via {c.surface}" if c.surface else "") if c.proposed \
            else "nothing proposed"
        lines.append(f"  {ob_id:<26} {label:<24} ({proposed})")
        lines += [f"      - {f.text}" for f in c.findings]
    lines.append(f"row: {check.label.value.upper()}: {check.reason}")
    return "\n".join(lines)


def render_matrix(checks: list["RowCheck"]) -> str:
    """One line per descriptor, one column per obligation, plus the row label."""
    ids = [ob.id for ob in OBLIGATIONS]
    width = max([len(c.name) for c in checks] + [10])
    header = f"{'row':<{width}}  {'evidence':<8}  " + " ".join(f"{i + 1:>2}" for i in range(len(ids))) + "  label"
    lines = [header]
    for c in checks:
        if c.malformed:
            lines.append(f"{c.name:<{width}}  {'-':<8}  MALFORMED: {c.reason}")
            continue
        cells = " ".join(f"{CODES[_value(c.obligations[i].label)]:>2}" for i in ids)
        lines.append(f"{c.name:<{width}}  {c.evidence:<8}  {cells}  {c.label.value}")
    lines.append("columns: " + ", ".join(f"{i + 1} {ob}" for i, ob in enumerate(ids)))
    lines.append("cells: N native, A adapter-scoped, S approximation substrate, R rejected mapping, ? unknown, - n/a")
    return "\n".join(lines)


def _value(label: Label | None) -> str | None:
    return label.value if label is not None else None


# -- Markdown -------------------------------------------------------------------------


def markdown(rows: list[MatrixRow]) -> str:
    head = "| row | label | " + " | ".join(f"`{ob.id}`" for ob in OBLIGATIONS) + " |"
    lines = [
        "# Resident KV Claims conformance matrix",
        "",
        "Codes: **N** native conformance, **A** adapter-scoped evidence, **S** approximation "
        "substrate, **R** rejected mapping, **?** unknown evidence, **-** not applicable. "
        "Run-backed rows come from evidence bundles; static rows from descriptors alone.",
        "",
        head,
        "|" + "---|" * (len(OBLIGATIONS) + 2),
    ]
    for r in rows:
        codes = " | ".join(CODES.get(r.cells[ob.id][0], "?") for ob in OBLIGATIONS)
        lines.append(f"| {r.name} ({r.kind}) | {r.label} | {codes} |")
    lines += ["", "## Reasons", ""]
    for r in rows:
        lines += [f"### {r.name}", "", f"{r.runtime}. {r.label}: {r.reason} (evidence: `{_shown(r.source)}`)", ""]
        lines += [f"Provenance: {r.provenance}.", ""] if r.provenance else []
        lines += [f"Proposal `{_shown(src)}`: {label}." for src, label in r.proposals]
        lines += [""] if r.proposals else []
        lines += [f"- `{ob_id}`: {label or 'not applicable'}: {reason}" for ob_id, (label, reason) in r.cells.items()]
        if r.timeline:
            lines += ["", f"Canonical probe ({r.timeline_from}): " + "; ".join(
                f"{s['step']}: resident {s['resident']}" + (f" ({s['mark']})" if s.get("mark") else "")
                for s in r.timeline)]
        lines.append("")
    return "\n".join(lines)


# -- HTML -----------------------------------------------------------------------------


def timeline_png(row: MatrixRow) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = row.timeline
    x = list(range(len(steps)))
    resident = [s["resident"] for s in steps]
    active = [s["active"] for s in steps]
    other = [s["free"] for s in steps]
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    ax.bar(x, resident, color="#4f7fd1", label="resident prefix")
    ax.bar(x, active, bottom=resident, color="#f0883e", label="active request")
    ax.bar(x, other, bottom=[r + a for r, a in zip(resident, active)], color="#d0d7de", label="free / other cache")
    for i, s in enumerate(steps):
        if s.get("mark") == "refused":
            ax.annotate("refused", (i, 82), ha="center", color="#cf222e", fontweight="bold")
        elif s.get("mark") == "admitted":
            lost = s.get("resident_lost", 0)
            ax.annotate(f"admitted, {lost} resident blocks evicted" if lost else "admitted",
                        (i, 82), ha="center", color="#9a6700", fontweight="bold")
        ax.text(i, max(s["resident"] / 2, 2), str(s["resident"]), ha="center", color="white", fontweight="bold")
    ax.set_xticks(x, [s["step"] for s in steps], fontsize=8)
    ax.set_ylim(0, 92)
    ax.set_ylabel("blocks (pool of 80)")
    ax.set_title(f"{row.name}: {row.timeline_from}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def html_page(rows: list[MatrixRow], base: Path | None = None) -> str:
    esc = html.escape
    head_cells = "".join(f"<th title='{esc(ob.statement)}'>{esc(ob.id)}</th>" for ob in OBLIGATIONS)
    body = []
    for r in rows:
        link = _link(r.source, base)
        cells = []
        for ob in OBLIGATIONS:
            label, reason = r.cells[ob.id]
            code = CODES.get(label, "?")
            cells.append(
                f"<td class='c' style='background:{COLOURS[code]}' title='{esc(f'{label}: {reason}')}'>"
                f"<details><summary>{code}</summary><span>{esc(label or 'not applicable')}: {esc(reason)}</span></details></td>"
            )
        body.append(
            f"<tr><th class='r'><a href='{esc(link)}'>{esc(r.name)}</a><br><small>{esc(r.runtime)} · {esc(r.kind)}</small>"
            + "".join(f"<br><small><a href='{esc(_link(src, base))}'>proposal {esc(Path(src).stem)}</a>: {esc(lab)}</small>"
                      for src, lab in r.proposals) + "</th>"
            f"<td title='{esc(r.reason + (chr(10) + 'provenance: ' + r.provenance if r.provenance else ''))}'><b>{esc(r.label)}</b></td>{''.join(cells)}</tr>"
        )
    plots = []
    for r in rows:
        if r.timeline:
            data = base64.b64encode(timeline_png(r)).decode()
            plots.append(f"<figure><img alt='timeline of {esc(r.name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption><b>{esc(r.label)}</b>: {esc(r.reason)}</figcaption></figure>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Resident KV Claims conformance matrix</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #1f2328; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 6px; vertical-align: top; }}
th {{ background: #f6f8fa; }} th.r {{ text-align: left; }}
td.c {{ color: white; text-align: center; min-width: 2.2em; }}
td.c details span {{ display: block; color: #1f2328; background: white; padding: 3px; max-width: 16em; text-align: left; }}
summary {{ cursor: pointer; font-weight: bold; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }} figcaption {{ font-size: 12px; }}
</style></head><body>
<h1>Resident KV Claims conformance matrix</h1>
<p>N native conformance · A adapter-scoped evidence · S approximation substrate · R rejected mapping ·
? unknown evidence · - not applicable. Hover or open a cell for its reason; row names link to the evidence.</p>
<table><tr><th>row</th><th>label</th>{head_cells}</tr>
{''.join(body)}
</table>
<h2>The canonical probe, per run-backed row</h2>
<p>Pool occupancy at each step of the 80 / 60 / 70 probe: does the resident survive the active prefill?</p>
{''.join(plots) or '<p>No run-backed rows.</p>'}
</body></html>
"""


def _shown(source: str) -> str:
    """A path as a reader of the committed report should see it: relative when possible."""
    try:
        return str(Path(source).resolve().relative_to(Path.cwd()))
    except ValueError:
        return source


def _link(source: str, base: Path | None) -> str:
    """A link that survives moving the report together with its evidence: relative."""
    path = Path(source).resolve()
    if base is not None:
        return os.path.relpath(path, base.resolve())
    return path.as_uri()
