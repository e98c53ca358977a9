// A job: its recipe, the timeline of its steps, baseline against optimized, per-layer damage, sample
// generations side by side and the artifacts to download. Status and progress move live until it ends.

import { api, download, FINAL, followJob } from "../api.js";
import { damageChart } from "../charts.js";
import { alertBox, bytes, h, number, replace, statusBadge, stepName, when } from "../dom.js";
import { cancelButton, progressCell } from "./jobs.js";

const METRICS = [
  ["parameters", "parameters", number],
  ["nonzero parameters", "nonzero_parameters", number],
  ["size on disk", "size_bytes", bytes],
  ["perplexity", "perplexity", (v) => number(v, 4)],
  ["prefill latency (ms)", "prefill_ms", (v) => number(v, 4)],
  ["decode (ms per token)", "decode_ms_per_token", (v) => number(v, 4)],
  ["peak memory", "peak_memory", (v) => bytes(v && v.bytes)],
  ["device", "device", (v) => v ?? "—"],
];

function recipeSection(job) {
  const omit = new Set(["type", "method"]);
  return h(
    "section",
    { class: "card", "aria-labelledby": "recipe-title" },
    h("h2", { id: "recipe-title" }, "Recipe"),
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, ["#", "step", "options"].map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        job.recipe.map((step, i) =>
          h(
            "tr",
            {},
            h("td", {}, i),
            h("td", {}, stepName(step)),
            h("td", { class: "mono" }, JSON.stringify(Object.fromEntries(Object.entries(step).filter(([k]) => !omit.has(k))))),
          ),
        ),
      ),
    ),
    h("p", {}, "Calibration: ", h("code", {}, JSON.stringify(job.calibration)), " · Evaluation: ", h("code", {}, JSON.stringify(job.evaluation))),
  );
}

function timeline(job, report) {
  const items = [h("li", {}, `submitted ${when(job.created_at)}`)];
  for (const attempt of job.attempt_history) {
    items.push(
      h("li", {}, `attempt started ${when(attempt.started_at)} on ${attempt.worker || "a worker"}: ${attempt.outcome}`),
    );
  }
  const done = new Map((report ? report.steps : []).map((step) => [step.index, step]));
  job.recipe.forEach((step, i) => {
    const measured = done.get(i);
    const running = job.status === "running" && job.progress.step_index === i;
    const text = measured
      ? `step ${i}: ${stepName(step)} took ${number(measured.duration_s, 3)} s`
      : `step ${i}: ${stepName(step)}${running ? ` (running: ${job.progress.message})` : ""}`;
    items.push(h("li", { class: measured ? "" : "pending" }, text));
  });
  items.push(h("li", { class: job.finished_at ? "" : "pending" }, job.finished_at ? `${job.status} ${when(job.finished_at)}` : "not finished"));
  return h("ol", { class: "timeline" }, items);
}

function comparison(report) {
  const ratios = report.ratios || {};
  const kl = report.quality && report.quality.kl_divergence;
  const rows = METRICS.map(([label, key, format]) =>
    h("tr", {}, h("th", { scope: "row" }, label), h("td", { class: "num" }, format(report.baseline[key])), h("td", { class: "num" }, format(report.optimized[key]))),
  );
  if (kl) {
    rows.push(h("tr", {}, h("th", { scope: "row" }, "KL divergence to baseline (mean, nats)"), h("td", { class: "num" }, "0"), h("td", { class: "num" }, number(kl.mean, 4))));
    rows.push(h("tr", {}, h("th", { scope: "row" }, "top-1 agreement"), h("td", { class: "num" }, "1"), h("td", { class: "num" }, number(kl.top1_agreement, 4))));
  }
  const ratioText = [
    ["size", ratios.size],
    ["perplexity", ratios.perplexity],
    ["prefill speed-up", ratios.prefill_speedup],
    ["decode speed-up", ratios.decode_speedup],
  ]
    .map(([name, value]) => `${name} ${value === null || value === undefined ? "—" : `${number(value, 3)}×`}`)
    .join(" · ");
  return [
    h(
      "table",
      { id: "comparison" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "measure"), h("th", { scope: "col", class: "num" }, "baseline"), h("th", { scope: "col", class: "num" }, "optimized"))),
      h("tbody", {}, rows),
    ),
    h("p", {}, `Ratios: ${ratioText}`),
    ratios.speed_note ? h("p", { class: "notice" }, ratios.speed_note) : null,
    (report.notes || []).map((note) => h("p", { class: "muted" }, note)),
  ];
}

function damage(report) {
  const container = h("div", { id: "damage-chart" });
  const worst = (report.damage && report.damage.worst) || [];
  const section = h(
    "section",
    { class: "card", "aria-labelledby": "damage-title" },
    h("h2", { id: "damage-title" }, "Per-layer damage"),
    container,
    worst.length
      ? h(
          "table",
          {},
          h("caption", { class: "muted" }, "the most damaged layers"),
          h("thead", {}, h("tr", {}, ["step", "layer", "error", "measure"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, worst.map((w) => h("tr", {}, h("td", {}, `${w.step}: ${w.key}`), h("td", { class: "mono" }, w.layer), h("td", { class: "num" }, number(w.error, 4)), h("td", {}, w.measure)))),
        )
      : h("p", { class: "muted" }, "No step changed Linear weights in place."),
  );
  return { section, draw: () => damageChart(container, report) };
}

function samples(report) {
  return h(
    "table",
    { class: "side-by-side", id: "samples" },
    h("thead", {}, h("tr", {}, ["prompt", "baseline", "optimized"].map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, (report.samples || []).map((s) => h("tr", {}, h("th", { scope: "row" }, s.prompt), h("td", {}, s.baseline ?? "—"), h("td", {}, s.optimized ?? "—")))),
  );
}

function artifacts(list, message) {
  if (!list.length) return h("p", { class: "muted" }, "No artifacts.");
  return h(
    "ul",
    { id: "artifacts" },
    list.map((artifact) =>
      h(
        "li",
        {},
        h(
          "button",
          {
            type: "button",
            class: "secondary",
            "data-artifact": artifact.kind,
            onclick: () => download(artifact).catch((error) => replace(message, alertBox(error.message))),
          },
          `Download ${artifact.name}`,
        ),
        ` ${bytes(artifact.size_bytes)} · sha256 `,
        h("code", {}, artifact.sha256.slice(0, 16)),
        "…",
      ),
    ),
  );
}

/** A search's outcome: every candidate it built, measured, with the Pareto front and the choice marked; the timed
 * decode speed where a decode_speed search measured it, and each task's accuracy where the budget limits tasks. */
function candidates(search) {
  const result = search.result;
  const timed = result.candidates.some((c) => c.speed_source === "measured");
  const tasks = result.candidates.some((c) => c.tasks && c.tasks.length);
  const columns = ["candidate", "formats", "size", "perplexity", "increase", "predicted", "KL (mean)"];
  if (timed) columns.push("decode (tokens/s)");
  if (tasks) columns.push("tasks (accuracy ± stderr, drop)");
  columns.push("budget", "front");
  const taskText = (t) =>
    t.accuracy === null || t.accuracy === undefined
      ? `${t.task}: not scored`
      : `${t.task} ${number(t.accuracy, 3)} ± ${number(t.stderr, 3)} (${number(-100 * t.drop + 0, 2)} pts)`;
  return h(
    "section",
    { class: "card", "aria-labelledby": "candidates-title" },
    h("h2", { id: "candidates-title" }, "Search candidates"),
    h("p", {}, result.message),
    h(
      "table",
      { id: "candidates" },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        result.candidates.map((c) =>
          h(
            "tr",
            {},
            h("td", {}, result.chosen === c.id ? `${c.id} (chosen)` : c.id),
            h("td", {}, (c.pruning ? `pruned ${c.pruning}; ` : "") + Object.entries(c.formats).map(([format, count]) => `${count}× ${format}`).join(", ")),
            h("td", { class: "num" }, bytes(c.size_bytes)),
            h("td", { class: "num" }, number(c.perplexity, 4)),
            h("td", { class: "num" }, `${number(100 * c.perplexity_increase, 3)}%`),
            h("td", { class: "num" }, `${number(100 * c.predicted_perplexity_increase, 3)}%`),
            h("td", { class: "num" }, number(c.kl_divergence, 4)),
            timed ? h("td", { class: "num" }, c.speed_source === "measured" ? number(c.decode_tokens_per_s, 4) : "not timed") : null,
            tasks ? h("td", {}, (c.tasks || []).map(taskText).join("; ")) : null,
            h("td", {}, c.meets_budget ? "met" : "missed"),
            h("td", {}, c.pareto ? "yes" : ""),
          ),
        ),
      ),
    ),
  );
}

export async function renderJob(main, { params, signal }) {
  const [jobId] = params;
  let job = await api(`/v1/jobs/${jobId}`);
  const isSearch = job.kind === "search"; // a search's report is its candidates, shown from /v1/searches
  const search = job.status === "succeeded" && isSearch ? await api(`/v1/searches/${jobId}`) : null;
  const report = job.status === "succeeded" && !isSearch ? await api(`/v1/jobs/${jobId}/report`) : null;
  const files = job.status === "succeeded" ? (await api(`/v1/jobs/${jobId}/artifacts`)).data : [];
  const message = h("div", { "aria-live": "polite" });
  const status = h("span", { id: "job-status" }, statusBadge(job.status));
  const progress = progressCell(job);
  const timelineBox = h("div", {}, timeline(job, report));
  const errorBox = h("div", {}, job.error ? alertBox(`${job.error.code}: ${job.error.message}`) : null);
  const update = (next) => {
    const wasFinal = FINAL.has(job.status);
    job = next;
    replace(status, statusBadge(next.status));
    progress.update(next);
    cancel.hidden = FINAL.has(next.status);
    replace(timelineBox, timeline(next, report));
    replace(errorBox, next.error ? alertBox(`${next.error.code}: ${next.error.message}`) : null);
    if (!wasFinal && next.status === "succeeded") window.dispatchEvent(new HashChangeEvent("hashchange"));
  };
  const cancel = cancelButton(job, update, message);
  const model = await api(`/v1/models/${job.model_id}`).catch(() => null);
  const damageParts = report ? damage(report) : null;
  replace(
    main,
    h("h1", {}, "Job ", h("span", { class: "mono" }, job.id)),
    h(
      "p",
      { class: "row" },
      status,
      progress.element,
      cancel,
      model ? h("a", { href: `#/models/${model.id}` }, `model ${model.name}`) : null,
    ),
    message,
    errorBox,
    recipeSection(job),
    h("section", { class: "card", "aria-labelledby": "timeline-title" }, h("h2", { id: "timeline-title" }, "Timeline"), timelineBox),
    report
      ? [
          h("section", { class: "card", "aria-labelledby": "results-title" }, h("h2", { id: "results-title" }, "Baseline and optimized"), comparison(report)),
          damageParts.section,
          h("section", { class: "card", "aria-labelledby": "samples-title" }, h("h2", { id: "samples-title" }, "Sample generations"), samples(report)),
          h("section", { class: "card", "aria-labelledby": "artifacts-title" }, h("h2", { id: "artifacts-title" }, "Artifacts"), artifacts(files, message)),
        ]
      : search
        ? [
            candidates(search),
            h("section", { class: "card", "aria-labelledby": "artifacts-title" }, h("h2", { id: "artifacts-title" }, "Artifacts"), artifacts(files, message)),
          ]
        : h("p", { class: "muted", id: "report-pending" }, "The report and the artifacts appear here when the job has succeeded."),
  );
  if (damageParts) damageParts.draw();
  if (!FINAL.has(job.status)) {
    followJob(job.id, update, signal).catch((error) => replace(message, alertBox(error.message)));
  }
}
