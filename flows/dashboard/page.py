"""The dashboard as HTML: no template engine, no CDN (machines here may have no network),
every value escaped. Charts are inline SVG polylines, one per arm."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any

from flows.dashboard.view import BACKEND_WINDOW_S, DashboardView

ARM_COLOURS = {"legacy": "#5b7083", "production": "#e8590c"}
VERDICT_CLASS = {
    "PROMOTE": "good",
    "ROLLBACK": "bad",
    "NEEDS_APPROVAL": "warn",
    "HOLD": "",
    "INSUFFICIENT_DATA": "",
}
STATE_CLASS = {
    "running": "warn",
    "completed": "good",
    "rolled_back": "bad",
    "aborted": "bad",
    "awaiting_approval": "warn",
}

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2733;background:#f7f8fa}
h1{font-size:1.3rem;margin:0 0 .3rem} h2{font-size:1rem;margin:1.4rem 0 .4rem}
table{border-collapse:collapse;background:#fff;font-size:.85rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.good{color:#2b8a3e;font-weight:600}.bad{color:#c92a2a;font-weight:600}
.warn{color:#e67700;font-weight:600}.muted{color:#6b7785}
.problem{background:#fff3bf;padding:.5rem .8rem;border-left:4px solid #f08c00}
.charts{display:flex;gap:1.5rem;flex-wrap:wrap}
figure{margin:0;background:#fff;padding:.4rem .6rem} figcaption{font-size:.8rem}
tr.current td{background:#fff4e6}
"""

SCRIPT = """
const every = %d;
async function refresh() {
  const note = document.getElementById('connection');
  try {
    const response = await fetch('fragment', {cache: 'no-store'});
    if (!response.ok) throw new Error('HTTP ' + response.status);
    document.getElementById('live').innerHTML = await response.text();
    note.textContent = '';
  } catch (err) {
    note.textContent = 'dashboard server unreachable (' + err.message + '); retrying';
  }
  setTimeout(refresh, every);
}
setTimeout(refresh, every);
"""


def _num(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    return f"{value:,.{digits}f}{suffix}"


def _sig(value: float | None) -> str:
    """Four significant digits: gate statistics range from 1e-4 to 1e4."""
    return "-" if value is None else f"{value:.4g}"


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None and high is None else f"[{_sig(low)}, {_sig(high)}]"


def _when(value: datetime | None) -> str:
    return value.strftime("%H:%M:%S") if value else "-"


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Collection[int] = (),
    row_class: Callable[[int], str] | None = None,
) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_class(i)}"' if row_class and row_class(i) else ""
        cells = "".join(
            f'<td class="n">{c}</td>' if j in numeric else f"<td>{c}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    if not body:
        return '<p class="muted">none yet</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _badge(text: str | None, classes: dict[str, str]) -> str:
    if not text:
        return "-"
    return f'<span class="{classes.get(text, "")}">{escape(text)}</span>'


def chart(
    series: list[dict[str, Any]], metric: str, title: str, fmt: Callable[[float], str]
) -> str:
    """One SVG line per arm of `metric` over time; empty buckets are gaps, not zeros."""
    width, height, pad = 360, 120, 4
    points = [s for s in series if s.get(metric) is not None]
    if not points:
        return (
            f'<figure><figcaption>{escape(title)}</figcaption><p class="muted">no data</p></figure>'
        )
    times = sorted({p["t"] for p in points})
    top = max(p[metric] for p in points) or 1.0
    x_of = {t: pad + (width - 2 * pad) * i / max(len(times) - 1, 1) for i, t in enumerate(times)}
    lines, legend = [], []
    for arm in sorted({p["arm"] for p in points}):
        coords = " ".join(
            f"{x_of[p['t']]:.1f},{height - pad - (height - 2 * pad) * p[metric] / top:.1f}"
            for p in points
            if p["arm"] == arm
        )
        colour = ARM_COLOURS.get(arm, "#444")
        lines.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}" '
            f'data-arm="{escape(arm)}"/>'
        )
        last = [p[metric] for p in points if p["arm"] == arm][-1]
        legend.append(f'<span style="color:{colour}">■ {escape(arm)} {escape(fmt(last))}</span>')
    return (
        f"<figure><figcaption>{escape(title)} (max {escape(fmt(top))}) "
        f"{' '.join(legend)}</figcaption>"
        f'<svg width="{width}" height="{height}" role="img" aria-label="{escape(title)}">'
        f'<rect width="{width}" height="{height}" fill="#fbfcfd"/>{"".join(lines)}</svg></figure>'
    )


def fragment(view: DashboardView) -> str:
    """The part of the page that refreshes."""
    parts = [
        f'<p class="muted">read {view.read_at:%Y-%m-%d %H:%M:%S} UTC from '
        f"{escape(view.data_dir)}</p>"
    ]
    if view.problem:
        parts.append(f'<p class="problem">{escape(view.problem)}</p>')
    r = view.rollout
    if r is None:
        if not view.problem:
            parts.append(
                '<p class="problem">no rollout recorded yet: start one with '
                "<code>rollout start</code> or <code>rollout demo</code></p>"
            )
    else:
        parts.append(
            f"<h1>Rollout <code>{escape(r['rollout_id'])}</code>: "
            f"{_badge(r['state'], STATE_CLASS)}</h1>"
            f"<p>plan <b>{escape(r['plan'])}</b>, router group <b>{escape(r['router_group'])}"
            f"</b>, algorithm <b>{escape(r['algorithm'])}</b>; phase "
            f"{r['phase_index'] + 1}/{r['phases']} <b>{escape(r['phase'])}</b> "
            f"({escape(r['mode'])}, {r['traffic_percent']:g} %)</p>"
        )
        parts.append(_arms(view))
        parts.append(
            '<div class="charts">'
            + chart(
                view.series, "p95_ms", f"p95 latency per {view.bucket_s}s", lambda v: f"{v:.0f} ms"
            )
            + chart(view.series, "error_rate", f"error rate per {view.bucket_s}s", _pct)
            + chart(view.series, "requests", f"requests per {view.bucket_s}s", lambda v: f"{v:.0f}")
            + "</div>"
        )
        parts.append(_gate(view))
        parts.append(_timeline(view))
        parts.append("<h2>Decisions</h2>")
        parts.append(
            _table(
                ["when", "phase", "verdict", "action", "actor", "reason"],
                (
                    [
                        _when(d["decided_at"]),
                        str((d["phase_index"] or 0) + 1),
                        _badge(d["verdict"], VERDICT_CLASS),
                        escape(d["action"]),
                        escape(d.get("actor") or "-"),
                        escape(d["reason"]),
                    ]
                    for d in view.decisions
                ),
            )
        )
    parts.append(_backends(view))
    parts.append(_routers(view))
    parts.append(_events(view))
    return "\n".join(parts)


def _arms(view: DashboardView) -> str:
    return "<h2>This phase, per arm</h2>" + _table(
        [
            "arm",
            "requests",
            "shadow",
            "success",
            "errors",
            "p50",
            "p95",
            "p99",
            "$/request",
            "quality",
            "last request",
        ],
        (
            [
                f'<span style="color:{ARM_COLOURS.get(a["arm"], "#444")}">{escape(a["arm"])}</span>',
                _num(a["requests"]),
                _num(a["shadow_requests"]),
                _pct(a["success_rate"]),
                _pct(a["error_rate"]),
                _num(a["p50_ms"], 0, " ms"),
                _num(a["p95_ms"], 0, " ms"),
                _num(a["p99_ms"], 0, " ms"),
                _num(a["cost_per_request_usd"], 5),
                _num(a["mean_quality"], 3),
                _when(a["last_ts"]),
            ]
            for a in view.arms
        ),
        numeric=set(range(1, 10)),
    )


def _gate(view: DashboardView) -> str:
    phase = "" if view.evaluated_phase is None else f"phase {view.evaluated_phase + 1}, "
    title = f"<h2>Last gate evaluation ({phase}{_when(view.evaluated_at)})</h2>"
    return title + _table(
        [
            "check",
            "metric",
            "decision",
            "estimate",
            "interval",
            "e-value",
            "n legacy",
            "n production",
            "threshold",
            "mode",
            "reason",
        ],
        (
            [
                escape(e["check_kind"]),
                escape(e["metric"]),
                escape(e["decision"]),
                _sig(e["estimate"]),
                _interval(e["lower_bound"], e["upper_bound"]),
                _sig(e["e_value"]),
                _num(e["n_legacy"]),
                _num(e["n_production"]),
                _sig(e["threshold"]),
                escape(e["metric_mode"]),
                escape(e["reason"]),
            ]
            for e in view.evaluation
        ),
        numeric={3, 5, 6, 7, 8},
    )


def _timeline(view: DashboardView) -> str:
    current = view.rollout["phase_index"] if view.rollout else -1
    rows = view.timeline
    return "<h2>Phases</h2>" + _table(
        [
            "#",
            "phase",
            "mode",
            "%",
            "config",
            "started",
            "ended",
            "legacy n",
            "production n",
            "outcome",
            "last verdict",
        ],
        (
            [
                str(p["phase_index"] + 1),
                escape(p["name"]),
                escape(p["mode"]),
                f"{p['traffic_percent']:g}",
                f"v{p['config_version']}" if p["config_version"] else "-",
                _when(p["started_at"]),
                _when(p["ended_at"]),
                _num(p["legacy_requests"]),
                _num(p["production_requests"]),
                escape(p["outcome"] or "-"),
                _badge(p["last_verdict"], VERDICT_CLASS),
            ]
            for p in rows
        ),
        numeric={0, 3, 7, 8},
        row_class=lambda i: "current" if rows[i]["phase_index"] == current else "",
    )


def _backends(view: DashboardView) -> str:
    title = f"<h2>Backends, last {BACKEND_WINDOW_S // 60} minutes of collected rows</h2>"
    return title + _table(
        ["backend", "arm", "requests", "errors", "timeouts", "429s", "failovers", "p95"],
        (
            [
                escape(b["backend"]),
                escape(b["arm"]),
                _num(b["requests"]),
                _pct(b["error_rate"]),
                _num(b["timeouts"]),
                _num(b["rate_limited"]),
                _num(b["failovers"]),
                _num(b["p95_ms"], 0, " ms"),
            ]
            for b in view.backends
        ),
        numeric=set(range(2, 8)),
    )


def _routers(view: DashboardView) -> str:
    return "<h2>Router instances</h2>" + _table(
        ["instance", "applied", "mode", "%", "heartbeat age", "failback", "refused config"],
        (
            [
                escape(a["instance"]),
                f"v{a['applied_version']}",
                escape(a["mode"]),
                f"{a['traffic_percent']:g}",
                f"{a['age_s']:.1f} s" + (' <span class="bad">gone</span>' if a["gone"] else ""),
                escape(a["failback_reason"] or ""),
                escape(a["refused_reason"] or ""),
            ]
            for a in view.routers
        ),
        numeric={3},
    )


def _events(view: DashboardView) -> str:
    ingest = view.ingest
    summary = (
        f'<p class="muted">collected {_num(ingest.get("rows"))} request rows from '
        f"{_num(ingest.get('segments'))} segments, last at {_when(ingest.get('last_ingest'))}; "
        f"{_num(ingest.get('quarantined'))} quarantined</p>"
        if ingest
        else ""
    )
    return (
        "<h2>Router events</h2>"
        + summary
        + _table(
            ["when", "instance", "kind", "backend", "detail"],
            (
                [
                    _when(e["ts"]),
                    escape(e["router_instance"]),
                    escape(e["kind"]),
                    escape(e["backend"] or ""),
                    escape(e["detail"]),
                ]
                for e in view.events
            ),
        )
    )


def page(view: DashboardView, refresh_s: float) -> str:
    """The whole page: the fragment plus a script that re-fetches it every `refresh_s`."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<title>rollout dashboard</title>"
        f"<noscript><meta http-equiv=refresh content={max(1, round(refresh_s))}></noscript>"
        f"<style>{STYLE}</style></head><body>"
        '<p id="connection" class="warn"></p>'
        f'<div id="live">{fragment(view)}</div>'
        f"<script>{SCRIPT % round(refresh_s * 1000)}</script></body></html>"
    )
