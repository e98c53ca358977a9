// Jobs: filter by status and model, progress that moves live over each job's event stream, and cancel.

import { api, FINAL, followJob } from "../api.js";
import { alertBox, h, replace, statusBadge, stepName, when } from "../dom.js";

const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

/** A progress bar and its message for a job, updated in place. */
export function progressCell(job) {
  const bar = h("progress", { max: 1, value: job.progress.fraction, "aria-label": `progress of job ${job.id}` });
  const text = h("span", { class: "muted" }, ` ${Math.round(job.progress.fraction * 100)}% ${job.progress.message}`);
  return {
    element: h("span", {}, bar, text),
    update(next) {
      bar.value = next.progress.fraction;
      text.textContent = ` ${Math.round(next.progress.fraction * 100)}% ${next.progress.message}`;
    },
  };
}

/** A cancel button that asks the API and shows its answer; hidden once the job has ended. */
export function cancelButton(job, onJob, message) {
  const button = h("button", { type: "button", class: "danger", hidden: FINAL.has(job.status) }, "Cancel");
  button.setAttribute("aria-label", `Cancel job ${job.id}`);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      onJob(await api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }));
    } catch (error) {
      replace(message, alertBox(error.message));
      button.disabled = false;
    }
  });
  return button;
}

function jobRow(job, models, signal, message) {
  const status = h("td", {}, statusBadge(job.status));
  const progress = progressCell(job);
  const update = (next) => {
    replace(status, statusBadge(next.status));
    progress.update(next);
    cancel.hidden = FINAL.has(next.status);
  };
  const cancel = cancelButton(job, update, message);
  const row = h(
    "tr",
    { "data-job": job.id },
    h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id.slice(0, 8))),
    h("td", {}, models.get(job.model_id) ? h("a", { href: `#/models/${job.model_id}` }, models.get(job.model_id)) : "—"),
    h("td", {}, job.kind === "search" ? "quality-budget search" : job.recipe.map(stepName).join(" → ")),
    status,
    h("td", {}, progress.element),
    h("td", {}, when(job.created_at)),
    h("td", {}, cancel),
  );
  if (!FINAL.has(job.status)) followJob(job.id, update, signal).catch((error) => replace(message, alertBox(error.message)));
  return row;
}

export async function renderJobs(main, { query, signal }) {
  const models = new Map((await api("/v1/models?limit=200")).data.map((m) => [m.id, m.name]));
  const statusSelect = h(
    "select",
    { id: "filter-status" },
    STATUSES.map((s) => h("option", { value: s, selected: s === (query.get("status") || "") }, s || "any status")),
  );
  const modelSelect = h(
    "select",
    { id: "filter-model" },
    h("option", { value: "" }, "any model"),
    [...models].map(([id, name]) => h("option", { value: id, selected: id === query.get("model") }, name)),
  );
  const apply = () => {
    const params = new URLSearchParams();
    if (statusSelect.value) params.set("status", statusSelect.value);
    if (modelSelect.value) params.set("model", modelSelect.value);
    location.hash = `#/jobs${params.size ? `?${params}` : ""}`;
  };
  statusSelect.addEventListener("change", apply);
  modelSelect.addEventListener("change", apply);

  const params = new URLSearchParams({ limit: "100" });
  if (query.get("status")) params.set("status", query.get("status"));
  if (query.get("model")) params.set("model_id", query.get("model"));
  const jobs = await api(`/v1/jobs?${params}`);
  const message = h("div", { "aria-live": "polite" });
  const body = jobs.data.length
    ? h(
        "table",
        { id: "jobs-table" },
        h(
          "thead",
          {},
          h("tr", {}, ["job", "model", "recipe", "status", "progress", "submitted", ""].map((c) => h("th", { scope: "col" }, c))),
        ),
        h("tbody", {}, jobs.data.map((job) => jobRow(job, models, signal, message))),
      )
    : h("p", { class: "muted" }, "No jobs match.");
  replace(
    main,
    h("h1", {}, "Jobs"),
    h(
      "div",
      { class: "row" },
      h("div", {}, h("label", { for: "filter-status" }, "Status"), statusSelect),
      h("div", {}, h("label", { for: "filter-model" }, "Model"), modelSelect),
      h("a", { class: "button", href: "#/new" }, "New job"),
    ),
    message,
    h("section", { class: "card" }, body, jobs.count > jobs.data.length ? h("p", { class: "muted" }, `Showing the newest ${jobs.data.length} of ${jobs.count}.`) : null),
  );
}
