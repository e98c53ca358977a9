// Charts drawn by Chart.js (vendored under /ui/vendor, loaded before this module): per-layer damage as bars,
// and a model's jobs as quality against size and against decode speed, with the Pareto front drawn.

import { h } from "./dom.js";

const COLORS = ["#2456c7", "#c75a24", "#1e7a3c", "#8a2be2", "#b3261e", "#6b7a8f"];

function canvasIn(container, label) {
  const canvas = h("canvas", { role: "img", "aria-label": label });
  container.append(h("div", { class: "chart tall" }, canvas));
  return canvas;
}

/** One bar per changed Linear, one colour per step: the error the report measured for it. */
export function damageChart(container, report) {
  const steps = report.steps.filter((step) => (step.layers || []).some((layer) => layer && "relative_error" in layer));
  if (!steps.length) return null;
  const names = [...new Set(steps.flatMap((step) => step.layers.map((layer) => layer.name)))];
  const datasets = steps.map((step, i) => {
    const byName = new Map(step.layers.map((layer) => [layer.name, layer.output_error ?? layer.relative_error]));
    return {
      label: `step ${step.index}: ${step.type} / ${step.method}`,
      data: names.map((name) => byName.get(name) ?? null),
      backgroundColor: COLORS[i % COLORS.length],
    };
  });
  return new window.Chart(canvasIn(container, "per-layer damage: error of each changed Linear layer"), {
    type: "bar",
    data: { labels: names, datasets },
    options: {
      animation: false,
      maintainAspectRatio: false,
      scales: {
        x: { ticks: { autoSkip: true, maxRotation: 60, minRotation: 30 } },
        y: { title: { display: true, text: "relative error (output where measured, else weight)" }, beginAtZero: true },
      },
    },
  });
}

/**
 * The points no other point beats on both axes: lower quality loss and, on x, `better` (smaller size, higher
 * speed). Returned in x order, to be drawn as a line.
 * Apart from worker/engine/search/pareto.py (one search's candidates): this spans the points only this page gathers.
 */
export function paretoFront(points, better) {
  const sorted = [...points].sort((a, b) => (better === "lower" ? a.x - b.x : b.x - a.x) || a.y - b.y);
  const front = [];
  for (const point of sorted) {
    if (!front.length || point.y < front[front.length - 1].y) front.push(point);
  }
  return front.sort((a, b) => a.x - b.x);
}

/** A scatter of the jobs with the Pareto front; clicking a point opens its job. */
export function tradeoffChart(container, { points, xLabel, yLabel, better, title }) {
  const canvas = h("canvas", { role: "img", "aria-label": title });
  container.append(h("figure", {}, h("figcaption", {}, title), h("div", { class: "chart" }, canvas)));
  const front = paretoFront(points, better);
  return new window.Chart(canvas, {
    type: "scatter",
    data: {
      datasets: [
        {
          label: "jobs",
          data: points,
          pointRadius: 6,
          pointHoverRadius: 8,
          backgroundColor: points.map((p) => (p.baseline ? "#6b7a8f" : p.candidate ? "#1e7a3c" : "#2456c7")),
        },
        {
          label: "Pareto front",
          data: front,
          showLine: true,
          borderColor: "#c75a24",
          backgroundColor: "#c75a24",
          pointRadius: 3,
          borderWidth: 2,
        },
      ],
    },
    options: {
      animation: false,
      maintainAspectRatio: false,
      onClick: (_event, elements) => {
        const hit = elements.find((e) => e.datasetIndex === 0);
        if (hit && points[hit.index].jobId) location.hash = `#/jobs/${points[hit.index].jobId}`;
      },
      plugins: {
        tooltip: { callbacks: { label: (item) => item.raw.label } },
      },
      scales: {
        x: { title: { display: true, text: xLabel } },
        y: { title: { display: true, text: yLabel } },
      },
    },
  });
}
