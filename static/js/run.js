/* gradwatch run page: draw the charts, append new epochs from the server (SSE), zoom, and
   pick the epoch of the task-pair cosine matrix. */
"use strict";

(function () {
  const data = gw.readJSON("run-data");
  if (!data) return;
  const charts = {};        // key -> div
  const sources = {};       // key -> trace sources (see server/charts.py)
  let cursor = data.cursor;
  let source = null;        // the EventSource
  let retryDelay = 1000;
  let finished = !data.live;
  let detailTimer = null;
  let axes = null;          // linked x axes (gw.linkXAxes)
  let running = data.live;  // open episodes read "open" while running, "open at end" after

  function draw(figures, keepRange) {
    const jobs = [];
    for (const [key, fig] of Object.entries(figures)) {
      const div = document.getElementById("chart-" + key);
      if (!div) continue;
      sources[key] = fig.sources;
      const layout = gw.themed(fig.layout);
      if (keepRange && div.layout && div.layout.xaxis && !div.layout.xaxis.autorange) {
        layout.xaxis = Object.assign({}, layout.xaxis, { range: div.layout.xaxis.range });
      }
      const isNew = !charts[key];
      charts[key] = div;
      jobs.push(isNew ? Plotly.newPlot(div, fig.data, layout, gw.plotConfig)
                      : Plotly.react(div, fig.data, layout, gw.plotConfig));
    }
    return Promise.all(jobs);
  }

  // ------------------------------------------------------------- values from a MetricsRead

  function column(m, path) {
    let values;
    if (path[0] === "task") values = (m.task_metrics[path[1]] || {})[path[2]];
    else if (path[0] === "epoch") values = m.epoch_metrics[path[1]];
    else if (path[0] === "pair") {
      const pair = m.cosines.find((p) => p.a === path[1] && p.b === path[2]);
      values = pair && pair.values;
    }
    return values || m.epochs.map(() => null);
  }

  /** What to append to one trace for a batch of new epochs, or null for nothing. */
  function appendFor(src, m) {
    if (src.kind === "series") {
      return { x: m.epochs.slice(), y: column(m, src.path).map(gw.finite) };
    }
    if (src.kind === "above") {
      const vals = column(m, src.path).map(gw.finite);
      const idx = vals.map((v, i) => (v !== null && v > src.threshold ? i : -1)).filter((i) => i >= 0);
      return idx.length ? { x: idx.map((i) => m.epochs[i]), y: idx.map((i) => vals[i]) } : null;
    }
    if (src.kind === "nonfinite") {
      const cols = src.paths.map((p) => column(m, p));
      const x = [], y = [], text = [];
      m.epochs.forEach((epoch, i) => {
        const bad = [];
        cols.forEach((col, j) => {
          if (gw.isNonFinite(col[i])) bad.push(`${src.labels[j]} = ${gw.nonFiniteLabel(col[i])}`);
        });
        if (bad.length) { x.push(epoch); y.push(0.97); text.push(bad.join("<br>")); }
      });
      return x.length ? { x, y, text } : null;
    }
    return null;
  }

  /** Shaded bands over stretches above the threshold (same rule as charts.ratio_shapes). */
  function flaggedBands(xs, ys, threshold) {
    const bands = [];
    let start = null;
    for (let i = 0; i < xs.length; i++) {
      const over = ys[i] !== null && ys[i] > threshold;
      if (over && start === null) start = xs[i];
      if (start !== null && (!over || i === xs.length - 1)) {
        bands.push([start, over ? xs[i] : xs[i - 1]]);
        start = null;
      }
    }
    return bands.map(([a, b]) => ({
      type: "rect", name: "flagged", xref: "x", x0: a - 0.5, x1: b + 0.5, yref: "paper",
      y0: 0, y1: 1, layer: "below", fillcolor: "#d62828", opacity: 0.13, line: { width: 0 },
    }));
  }

  function refreshBands() {
    const div = charts.ratio;
    if (!div) return;
    const src = sources.ratio.find((s) => s.kind === "above");
    const line = div.data[0];
    const keep = (div.layout.shapes || []).filter((s) => s.name !== "flagged");
    Plotly.relayout(div, { shapes: keep.concat(flaggedBands(line.x, line.y, src.threshold)) });
  }

  /** New epochs as new heatmap columns: each group's row gets its values (same rule as
   *  balance_charts.group_row), a group seen for the first time gets a row of its own. */
  function appendGroups(div, i, src, m) {
    const trace = div.data[i];
    const names = trace.y.slice();
    const z = trace.z.map((row) => row.slice());
    for (const g of m.groups || []) {
      if (!names.includes(g.name)) {
        names.push(g.name);
        z.push(trace.x.map(() => null));
      }
    }
    names.forEach((name, r) => {
      const g = (m.groups || []).find((s) => s.name === name);
      const values = g ? g[src.field].map(gw.finite) : m.epochs.map(() => null);
      z[r] = z[r].concat(src.log10
        ? values.map((v) => (v !== null && v > 0 ? Math.log10(v) : null)) : values);
    });
    return Plotly.restyle(div, { x: [trace.x.concat(m.epochs)], y: [names], z: [z] }, [i]);
  }

  // ------------------------------------------------------------- cosine matrix epoch

  let matrixPinned = null;  // the epoch the user picked; null: follow the latest epoch
  let matrixTimer = null;

  /** Draw the T x T matrix of `epoch` (served by /api/runs/{id}/cosine-matrix). */
  function showMatrix(epoch) {
    const div = charts.cosine_matrix;
    if (!div || !Number.isInteger(epoch) || epoch < 0) return Promise.resolve();
    const note = document.getElementById("matrix-note");
    return fetch(`${data.matrix_url}?epoch=${epoch}`, { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status))))
      .then((d) => {
        const input = document.getElementById("matrix-epoch");
        if (input && document.activeElement !== input) input.value = String(d.epoch);
        if (!d.figure) {
          if (note) note.textContent = `no cosines at epoch ${d.epoch}`;
          return null;
        }
        if (note) note.textContent = matrixPinned === null
          ? "following the latest epoch; click a point on any chart over epochs to pick one"
          : `epoch ${d.epoch} picked; "latest" follows new epochs again`;
        return Plotly.react(div, d.figure.data, gw.themed(d.figure.layout), gw.plotConfig)
          .then(() => { div.dataset.epoch = String(d.figure.layout.meta.epoch); });
      })
      .catch((err) => console.warn("gradwatch: could not load the cosine matrix", err));
  }

  function scheduleMatrix(epoch) {
    clearTimeout(matrixTimer);
    matrixTimer = setTimeout(() => showMatrix(epoch), 250);
  }

  function pickEpoch(epoch) {
    matrixPinned = epoch;
    const latest = document.getElementById("matrix-latest");
    if (latest) latest.disabled = epoch === null;
    return showMatrix(epoch === null ? lastEpoch() : epoch);
  }

  function wireMatrix(timeline) {
    const div = charts.cosine_matrix;
    if (!div) return;
    div.dataset.epoch = String(div.layout.meta.epoch);
    const form = document.getElementById("matrix-tools");
    const input = document.getElementById("matrix-epoch");
    input.value = String(div.layout.meta.epoch);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const epoch = Number(input.value);
      if (Number.isInteger(epoch) && epoch >= 0) pickEpoch(epoch);
    });
    document.getElementById("matrix-latest").addEventListener("click", () => pickEpoch(null));
    for (const chart of timeline) {
      chart.on("plotly_click", (ev) => {
        const x = ev && ev.points && ev.points.length ? Number(ev.points[0].x) : NaN;
        if (Number.isInteger(x)) pickEpoch(x);
      });
    }
  }

  function lastEpoch() {
    const div = charts.ratio || Object.values(charts)[0];
    const xs = div && div.data[0] ? div.data[0].x : [];
    return xs.length ? xs[xs.length - 1] : -Infinity;
  }

  function applyMetrics(m) {
    if (!m.epochs.length) return;
    if (m.epochs[0] <= lastEpoch()) {  // an older epoch arrived late (e.g. a spool sync): redraw
      reload(null);
      return;
    }
    for (const [key, div] of Object.entries(charts)) {
      sources[key].forEach((src, i) => {
        if (src.kind === "groups") {
          appendGroups(div, i, src, m);
          return;
        }
        const add = appendFor(src, m);
        if (!add) return;
        const update = {};
        for (const k of Object.keys(add)) update[k] = [add[k]];
        Plotly.extendTraces(div, update, [i]);
        if (src.kind === "nonfinite" && !div.data[i].showlegend) {
          Plotly.restyle(div, { showlegend: true }, [i]);
        }
      });
    }
    refreshBands();
    if (axes) axes.fit();
    if (matrixPinned === null && m.cosines.length) scheduleMatrix(m.epochs[m.epochs.length - 1]);
    const note = document.getElementById("no-epochs");
    if (note) note.remove();
  }

  function reload(range) {
    let url = data.figures_url;
    if (range) url += `?epoch_min=${Math.floor(range[0])}&epoch_max=${Math.ceil(range[1])}`;
    return fetch(url, { headers: { Accept: "application/json" } })
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status))))
      .then((d) => {
        cursor = Math.max(cursor, d.cursor);
        return draw(d.figures, Boolean(range)).then(() => {
          if (matrixPinned !== null) showMatrix(matrixPinned);  // a redraw shows the last epoch
          return range || !axes ? null : axes.fit();
        });
      })
      .catch((err) => console.warn("gradwatch: could not load chart data", err));
  }

  // ------------------------------------------------------------- header and alerts

  function applyRun(update) {
    const run = update.run;
    gw.replace("run-status", gw.statusBadge(run.status, run.lost));
    gw.replace("run-flag", gw.flag(run));
    gw.replace("run-badges", gw.kindBadges(run));
    running = run.status === "running";
    gw.setText("run-epochs", String(run.epoch_count));
    gw.replace("run-ratio", gw.ratioCell(run.last_grad_norm_ratio, run.ratio_threshold));
    renderAlerts(update.alerts);
  }

  function renderAlerts(alerts) {
    const body = document.getElementById("alerts-body");
    if (!body) return;
    body.replaceChildren(...alerts.map((a) => {
      const open = a.closed_epoch === null;
      const tr = gw.el("tr", { class: (open ? "open " : "closed ") + a.kind });
      const status = !open ? gw.el("span", { class: "muted" }, "closed")
        : a.kind === "imbalance" ? gw.el("span", { class: "flag flag-open" }, "⚑ open")
        : gw.el("span", { class: "open-badge" }, "open");
      const link = gw.el("a", {
        class: "epoch-link",
        href: `?epoch=${a.opened_epoch}` + (open ? "" : `&to=${a.closed_epoch}`) + "#charts",
      }, a.opened_epoch);
      const cells = [status, gw.el("span", { class: "kind kind-" + a.kind },
        a.kind.replace(/_/g, " ")), a.task || "–", link,
        open ? (running ? "open" : "open at end") : a.closed_epoch,
        gw.fmtPeak(a), a.message];
      cells.forEach((c, i) => {
        const td = gw.el("td", { class: i >= 3 && i <= 5 ? "num" : null });
        if (c instanceof Node) td.append(c); else td.textContent = String(c);
        tr.append(td);
      });
      return tr;
    }));
    gw.setText("alert-count", String(alerts.length));
    const empty = document.getElementById("alerts-empty");
    if (empty) empty.classList.toggle("hidden", alerts.length > 0);
  }

  // ------------------------------------------------------------- live

  function setLive(state, text) {
    const node = document.getElementById("live-state");
    if (!node) return;
    node.dataset.state = state;
    node.textContent = text;
  }

  function connect() {
    if (finished) return;
    source = new EventSource(`${data.stream_url}?since=${cursor}`);
    source.addEventListener("open", () => {
      retryDelay = 1000;
      setLive("live", "live: new epochs appear as they arrive");
    });
    source.addEventListener("metrics", (ev) => {
      const m = JSON.parse(ev.data);
      applyMetrics(m);
      cursor = Math.max(cursor, m.cursor);
    });
    source.addEventListener("run", (ev) => applyRun(JSON.parse(ev.data)));
    source.addEventListener("end", () => {
      finished = true;
      source.close();
      setLive("ended", "run ended: the charts are complete");
    });
    source.addEventListener("error", () => {
      if (finished) return;
      setLive("reconnecting", "connection lost: reconnecting…");
      if (source.readyState === EventSource.CLOSED) {  // the browser gave up: retry ourselves
        setTimeout(connect, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 5000);
      }
    });
  }

  // ------------------------------------------------------------- zoom

  function focusFromUrl() {
    const params = new URLSearchParams(window.location.search);
    if (!params.has("epoch")) return null;
    const from = Number(params.get("epoch"));
    const to = params.has("to") ? Number(params.get("to")) : from;
    if (!Number.isFinite(from) || !Number.isFinite(to)) return null;
    const pad = Math.max(5, Math.round((to - from) * 0.5));
    return [from - pad, to + pad];
  }

  function onRange(range) {
    if (!data.downsampled) return;
    clearTimeout(detailTimer);
    detailTimer = setTimeout(() => reload(range), 300);  // every epoch of the zoomed range
  }

  draw(data.figures, false).then(() => {
    // The cosine matrix has tasks, not epochs, on its x axis: it is not linked.
    const timeline = Object.values(charts).filter(
      (d) => !(d.layout.meta && d.layout.meta.epoch_axis === false));
    axes = gw.linkXAxes(timeline, onRange);
    wireMatrix(timeline);
    const focus = focusFromUrl();
    const ready = focus ? axes.zoomTo(focus).then(() => onRange(focus)) : axes.fit();
    return ready.then(() => {
      document.body.dataset.chartsReady = "true";
      connect();
    });
  });
})();
