// A model: what inspection found, and every finished job on it plotted as quality against size and against
// decode speed, with the Pareto front; each point (and each row of the table below) links to its job.

import { api } from "../api.js";
import { tradeoffChart } from "../charts.js";
import { bytes, h, number, replace, stepName } from "../dom.js";

const QUALITY = {
  perplexity: { label: "perplexity (lower is better)", of: (m, kl) => m.perplexity },
  kl: { label: "KL divergence to the uploaded model (nats, lower is better)", of: (m, kl, baseline) => (baseline ? 0 : kl && kl.mean) },
};

/** One point per succeeded job with the chosen quality measured, and the uploaded model itself. */
function pointsOf(results, quality) {
  const points = [];
  for (const { job, report } of results) {
    const kl = report.quality && report.quality.kl_divergence;
    const y = QUALITY[quality].of(report.optimized, kl, false);
    if (y === null || y === undefined) continue;
    points.push({
      jobId: job.id,
      size: report.optimized.size_bytes / 1e6,
      speed: report.optimized.decode_ms_per_token ? 1000 / report.optimized.decode_ms_per_token : null,
      y,
      recipe: job.recipe.map(stepName).join(" → "),
      label: `${job.id.slice(0, 8)}: ${job.recipe.map(stepName).join(" → ")}`,
    });
  }
  const first = results.find(({ report }) => QUALITY[quality].of(report.baseline, null, true) != null);
  if (first) {
    const base = first.report.baseline;
    points.push({
      jobId: null,
      baseline: true,
      size: base.size_bytes / 1e6,
      speed: base.decode_ms_per_token ? 1000 / base.decode_ms_per_token : null,
      y: QUALITY[quality].of(base, null, true),
      recipe: "as uploaded",
      label: "as uploaded (baseline)",
    });
  }
  return points;
}

/** One point per candidate of each succeeded search on this model, as measured on its reloaded artifact. */
function candidatePoints(searches, quality) {
  const points = [];
  for (const search of searches) {
    for (const c of (search.result && search.result.candidates) || []) {
      const y = quality === "kl" ? c.kl_divergence : c.perplexity;
      if (y === null || y === undefined) continue;
      const formats = Object.entries(c.formats).map(([format, count]) => `${count}× ${format}`).join(", ");
      const recipe = `search ${search.id.slice(0, 8)} candidate ${c.id}${search.result.chosen === c.id ? " (chosen)" : ""}: ${c.method}${c.pruning ? `, pruned ${c.pruning}` : ""}, ${formats}`;
      const speed = c.speed_source === "measured" ? c.decode_tokens_per_s : null; // timed by a decode_speed search on CUDA
      points.push({ jobId: null, searchId: search.id, candidate: true, size: c.size_bytes / 1e6, speed, y, recipe, label: recipe });
    }
  }
  return points;
}

function pointTable(points) {
  return h(
    "table",
    { id: "points" },
    h("thead", {}, h("tr", {}, ["job", "recipe", "size (MB)", "decode tokens/s", "quality"].map((c) => h("th", { scope: "col" }, c)))),
    h(
      "tbody",
      {},
      points.map((p) =>
        h(
          "tr",
          {},
          h("td", {}, p.jobId ? h("a", { href: `#/jobs/${p.jobId}`, class: "mono" }, p.jobId.slice(0, 8)) : p.candidate ? "search candidate" : "baseline"),
          h("td", {}, p.recipe),
          h("td", { class: "num" }, number(p.size, 4)),
          h("td", { class: "num" }, number(p.speed, 4)),
          h("td", { class: "num" }, number(p.y, 4)),
        ),
      ),
    ),
  );
}

export async function renderModel(main, { params, query }) {
  const [modelId] = params;
  const model = await api(`/v1/models/${modelId}`);
  const finished = (await api(`/v1/jobs?model_id=${encodeURIComponent(modelId)}&status=succeeded&limit=200`)).data;
  const jobs = finished.filter((job) => job.kind !== "search"); // a search's candidates are plotted from its result
  const searches = (await api("/v1/searches?limit=200")).data.filter((s) => s.model_id === modelId && s.status === "succeeded");
  const results = await Promise.all(jobs.map(async (job) => ({ job, report: await api(`/v1/jobs/${job.id}/report`) })));
  const quality = query.get("quality") === "kl" ? "kl" : "perplexity";
  const select = h(
    "select",
    { id: "quality" },
    h("option", { value: "perplexity", selected: quality === "perplexity" }, "perplexity"),
    h("option", { value: "kl", selected: quality === "kl" }, "KL divergence"),
  );
  select.addEventListener("change", () => {
    location.hash = `#/models/${modelId}?quality=${select.value}`;
  });
  const charts = h("div", { class: "charts", id: "tradeoff-charts" });
  const points = [...pointsOf(results, quality), ...candidatePoints(searches, quality)];
  const jobPoints = points.filter((p) => !p.baseline);
  replace(
    main,
    h("h1", {}, `Model ${model.name}`),
    h(
      "section",
      { class: "card" },
      h("p", {}, `${model.architecture} · ${model.format} · ${number(model.parameters)} parameters · ${bytes(model.size_bytes)} · sha256 `, h("code", {}, model.sha256.slice(0, 16)), "…"),
      h("p", {}, h("a", { class: "button", href: `#/new?model=${model.id}` }, "New job on this model"), " ", h("a", { href: `#/jobs?model=${model.id}` }, "all jobs on this model")),
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "tradeoffs-title" },
      h("h2", { id: "tradeoffs-title" }, "Finished jobs: quality against size and speed"),
      h("div", { class: "row" }, h("div", {}, h("label", { for: "quality" }, "Quality measure"), select)),
      jobPoints.length
        ? [charts, h("p", { class: "muted" }, "Grey: the model as uploaded; green: search candidates (on the speed plot only where a decode_speed search timed them on a GPU). The line joins the points no other point beats on both axes. Click a job's point to open it."), pointTable(points)]
        : h("p", { class: "muted", id: "no-points" }, `No succeeded job on this model has a ${quality === "kl" ? "KL divergence" : "perplexity"} yet (a job measures it when it has an evaluation dataset).`),
    ),
  );
  if (!jobPoints.length) return;
  const label = QUALITY[quality].label;
  tradeoffChart(charts, {
    points: points.map((p) => ({ ...p, x: p.size })),
    xLabel: "size on disk (MB)",
    yLabel: label,
    better: "lower",
    title: `${quality === "kl" ? "KL divergence" : "Perplexity"} against size`,
  });
  const timed = points.filter((p) => p.speed !== null);
  tradeoffChart(charts, {
    points: timed.map((p) => ({ ...p, x: p.speed })),
    xLabel: "decode tokens/s, batch 1",
    yLabel: label,
    better: "higher",
    title: `${quality === "kl" ? "KL divergence" : "Perplexity"} against decode speed`,
  });
}
