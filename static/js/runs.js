/* gradwatch runs list: live rows (server-sent events), auto-applied filters, compare picker. */
"use strict";

(function () {
  const table = document.getElementById("runs-table");
  const body = document.getElementById("runs-body");
  const form = document.getElementById("filters");
  const compareButton = document.getElementById("compare-button");

  if (form) {
    form.querySelectorAll("select").forEach((s) => s.addEventListener("change", () => form.submit()));
  }

  function checkedIds() {
    return new Set([...body.querySelectorAll("input[name=runs]:checked")].map((i) => i.value));
  }

  function updateCompareButton() {
    if (compareButton) compareButton.disabled = checkedIds().size < 2;
  }
  body.addEventListener("change", updateCompareButton);
  updateCompareButton();

  function row(run, checked) {
    const tr = gw.el("tr", { "data-run-id": run.id, class: run.flagged ? "flagged" : null });
    const pick = gw.el("td", { class: "pick" });
    pick.append(gw.el("input", { type: "checkbox", name: "runs", value: run.id,
      "aria-label": "compare " + run.name, checked: checked }));
    const name = gw.el("td", { class: "name" });
    name.append(gw.el("a", { href: "/runs/" + run.id }, run.name),
      gw.el("span", { class: "id" }, run.id.slice(0, 8)));
    const cells = [
      pick, name, gw.el("td", {}, run.project), gw.el("td"), gw.el("td"),
      gw.el("td", { class: "num" }, run.epoch_count), gw.el("td", { class: "num" }),
      gw.el("td"), gw.el("td", { class: "when", title: gw.fmtWhen(run.updated_at) },
        gw.fmtWhen(run.updated_at)),
    ];
    cells[3].append(gw.statusBadge(run.status, run.lost));
    cells[4].append(gw.taskChips(run.tasks));
    cells[6].append(gw.ratioCell(run.last_grad_norm_ratio, run.ratio_threshold));
    cells[7].append(gw.flag(run), gw.kindBadges(run));
    tr.append(...cells);
    return tr;
  }

  let last = null;
  function render(list) {
    const text = JSON.stringify(list.runs);
    if (text === last) return;
    last = text;
    const checked = checkedIds();
    body.replaceChildren(...list.runs.map((r) => row(r, checked.has(r.id))));
    gw.setText("runs-total", String(list.total));
    const empty = document.getElementById("runs-empty");
    if (empty) empty.classList.toggle("hidden", list.runs.length > 0);
    updateCompareButton();
  }

  if (table && table.dataset.stream && window.EventSource) {
    let retryDelay = 1000;
    const connect = () => {
      const source = new EventSource(table.dataset.stream);
      source.addEventListener("open", () => { retryDelay = 1000; });
      source.addEventListener("runs", (ev) => render(JSON.parse(ev.data)));
      source.addEventListener("error", () => {
        if (source.readyState === EventSource.CLOSED) {
          setTimeout(connect, retryDelay);
          retryDelay = Math.min(retryDelay * 2, 5000);
        }
      });
    };
    connect();
  }
})();
