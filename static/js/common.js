/* gradwatch: helpers shared by the pages. No innerHTML with data: text goes in via textContent. */
"use strict";

window.gw = (function () {
  const PALETTE = ["#2f6fdf", "#f08c00", "#2b9348", "#7b4fd1", "#0aa5b8",
                   "#a0522d", "#d63ca7", "#8a8f1f", "#5c677d", "#d4a100"];

  /** A number from the API: JSON numbers, or the strings "NaN", "Infinity", "-Infinity". */
  function num(x) {
    return x === null || x === undefined ? null : Number(x);
  }

  /** A value for a Plotly trace: non-finite and missing become null (a gap). */
  function finite(x) {
    const v = num(x);
    return v !== null && Number.isFinite(v) ? v : null;
  }

  function isNonFinite(x) {
    const v = num(x);
    return v !== null && !Number.isFinite(v);
  }

  function nonFiniteLabel(x) {
    const v = num(x);
    return Number.isNaN(v) ? "NaN" : v > 0 ? "Infinity" : "-Infinity";
  }

  function fmtRatio(x) {
    const v = num(x);
    if (v === null) return "–";
    if (Number.isNaN(v)) return "NaN";
    if (!Number.isFinite(v)) return v > 0 ? "∞" : "-∞";
    const rounded = Number(v.toPrecision(3));  // like Python's f"{v:.3g}"
    const s = Math.abs(v) < 1000 ? String(rounded) : rounded.toExponential().replace("e+", "e");
    return s + "×";
  }

  /** An alert's peak: a ratio for imbalance, a plain number (cosine, weight) otherwise. */
  function fmtPeak(alert) {
    const v = num(alert.peak_value);
    if (alert.kind === "imbalance" || v === null || !Number.isFinite(v)) return fmtRatio(v);
    return String(Number(v.toPrecision(3)));
  }

  function ratioClass(x, threshold) {
    const v = num(x);
    if (v === null) return "";
    if (!Number.isFinite(v)) return "nonfinite";
    return v > threshold ? "over" : "ok";
  }

  function fmtWhen(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
      `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())} UTC`;
  }

  /** Create an element; `text` is set with textContent, never parsed as HTML. */
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function readJSON(id) {
    const node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  function statusBadge(status, lost) {
    if (lost) {
      const title = "running, but its client has not been heard from";
      return el("span", { class: "badge status-lost", title }, "lost");
    }
    const badge = el("span", { class: "badge status-" + status });
    if (status === "running") {
      badge.append(el("span", { class: "pulse", "aria-hidden": "true" }), "live");
    } else {
      badge.textContent = status;
    }
    return badge;
  }

  /** The red flag means imbalance only (templates/_macros.html flag). */
  function flag(run) {
    if ((run.open_alert_kinds || {}).imbalance) {
      return el("span", { class: "flag flag-open", title: "an imbalance alert is open" }, "⚑ open");
    }
    if (run.flagged) {
      return el("span", { class: "flag flag-past", title: "an imbalance alert was opened earlier" },
        "⚑ past");
    }
    return document.createTextNode("");
  }

  /** Open alerts other than imbalance, one badge per kind (templates/_macros.html). */
  function kindBadges(run) {
    const wrap = document.createDocumentFragment();
    Object.keys(run.open_alert_kinds || {}).sort().forEach((kind) => {
      if (kind === "imbalance") return;
      const n = run.open_alert_kinds[kind];
      const label = kind.replace(/_/g, " ");
      wrap.append(el("span", { class: "kind-badge kind-" + kind,
        title: `${n} open ${label} alert(s)` }, label + (n > 1 ? ` ×${n}` : "")));
    });
    return wrap;
  }

  /** Plotly colours for the page's colour scheme (the CSS variables of app.css). */
  function themeLayout() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return { paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { color: v("--ink") }, "xaxis.gridcolor": v("--grid"), "yaxis.gridcolor": v("--grid") };
  }

  function themed(layout) {
    const t = themeLayout();
    const out = Object.assign({}, layout, { paper_bgcolor: t.paper_bgcolor,
      plot_bgcolor: t.plot_bgcolor, font: Object.assign({}, layout.font, t.font) });
    out.xaxis = Object.assign({ gridcolor: t["xaxis.gridcolor"] }, layout.xaxis);
    out.yaxis = Object.assign({ gridcolor: t["yaxis.gridcolor"] }, layout.yaxis);
    return out;
  }

  function ratioCell(value, threshold) {
    if (value === null || value === undefined) return el("span", { class: "muted" }, "–");
    return el("span", { class: "ratio " + ratioClass(value, threshold) }, fmtRatio(value));
  }

  function taskChips(tasks) {
    const wrap = el("span", { class: "chips" });
    tasks.forEach((t, i) => wrap.append(el("span", { class: "chip task-" + (i % 10) }, t)));
    return wrap;
  }

  const plotConfig = {
    displaylogo: false,
    responsive: true,
    displayModeBar: "hover",
    modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"],
  };

  /** The epochs every chart covers: [first, last] over all traces (null when empty). */
  function fullRange(divs) {
    let lo = Infinity, hi = -Infinity;
    divs.forEach((d) => (d.data || []).forEach((t) => {
      if (t.x && t.x.length) { lo = Math.min(lo, t.x[0]); hi = Math.max(hi, t.x[t.x.length - 1]); }
    }));
    if (lo > hi) return null;
    return lo === hi ? [lo - 1, hi + 1] : [lo, hi];
  }

  /**
   * Charts that share the epoch axis: zoom/pan on one moves them all; "autoscale" means every
   * epoch (the same range everywhere, whatever markers or shapes a chart has). Returns
   * { fit() } to re-fit after new epochs unless the user has zoomed in.
   */
  function linkXAxes(divs, onRange) {
    let syncing = false;
    let zoomed = false;
    function apply(range, except) {
      syncing = true;
      const targets = divs.filter((d) => d !== except);
      return Promise.all(targets.map((d) => Plotly.relayout(d, { "xaxis.range": range })))
        .finally(() => { syncing = false; });
    }
    function fit() {
      const range = fullRange(divs);
      return zoomed || !range ? Promise.resolve() : apply(range, null);
    }
    divs.forEach((div) => {
      div.on("plotly_relayout", (ev) => {
        if (syncing) return;
        if (ev["xaxis.autorange"]) {
          zoomed = false;
          fit();
          if (onRange) onRange(null);
          return;
        }
        let range = null;
        if (ev["xaxis.range[0]"] !== undefined) range = [ev["xaxis.range[0]"], ev["xaxis.range[1]"]];
        else if (ev["xaxis.range"]) range = ev["xaxis.range"];
        if (!range) return;
        zoomed = true;
        apply(range, div);
        if (onRange) onRange(range);
      });
    });
    return {
      fit,
      zoomTo(range) { zoomed = true; return apply(range, null); },
    };
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node) node.textContent = text;
  }

  function replace(id, child) {
    const node = document.getElementById(id);
    if (node) node.replaceChildren(child);
  }

  return { PALETTE, num, finite, isNonFinite, nonFiniteLabel, fmtRatio, fmtPeak, ratioClass, fmtWhen, el,
    readJSON, statusBadge, flag, kindBadges, themed, ratioCell, taskChips, plotConfig, linkXAxes, setText, replace };
})();
