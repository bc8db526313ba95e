/* gradwatch compare page: draw the overlaid runs, x axes linked. */
"use strict";

(function () {
  const data = gw.readJSON("compare-data");
  if (!data) return;
  const divs = [];
  const jobs = Object.entries(data.figures).map(([key, fig]) => {
    const div = document.getElementById("chart-" + key);
    divs.push(div);
    return Plotly.newPlot(div, fig.data, gw.themed(fig.layout), gw.plotConfig);
  });
  Promise.all(jobs).then(() => {
    return gw.linkXAxes(divs, null).fit();
  }).then(() => {
    document.body.dataset.chartsReady = "true";
  });
})();
