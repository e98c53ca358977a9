// The recipe form: a job spec built from the API's own schema, submitted as is; the API's 422 messages are
// shown verbatim, in one list and beside the fields they name.

import { api } from "../api.js";
import { alertBox, h, replace } from "../dom.js";
import { objectFields, Schema } from "../form.js";

let openapi = null;

async function loadSchema() {
  if (!openapi) {
    const response = await fetch("/openapi.json", { credentials: "omit" });
    openapi = await response.json();
  }
  return new Schema(openapi);
}

/** A checkbox that adds an optional section (calibration, evaluation, notify) to the spec. */
function optionalSection(schema, name, title, choices, checked) {
  const [inner] = schema.nullable(schema.root.properties[name]);
  const fields = objectFields(schema, inner, name, choices);
  const toggle = h("input", { type: "checkbox", id: `include-${name}`, checked });
  const body = h("div", { hidden: !checked }, fields.element);
  toggle.addEventListener("change", () => {
    body.hidden = !toggle.checked;
  });
  return {
    element: h("fieldset", { "data-loc": name }, h("legend", {}, h("label", { class: "inline" }, toggle, title)), body),
    read: () => (toggle.checked ? fields.read() : undefined),
  };
}

function showErrors(form, box, error) {
  for (const marked of form.querySelectorAll("[aria-invalid]")) marked.removeAttribute("aria-invalid");
  for (const note of form.querySelectorAll(".field-error")) note.remove();
  const items = error.errors.map((e) => {
    const loc = e.loc.filter((part) => part !== "body").join(".");
    // a recipe step's location names its union member ("recipe.0.prune:magnitude.sparsity"); the form does not
    const field = e.loc.filter((part) => part !== "body" && !/^[a-z]+:[a-z0-9_]+$/.test(String(part))).join(".");
    const target = form.querySelector(`[data-loc="${CSS.escape(field)}"]`);
    if (target) {
      target.setAttribute("aria-invalid", "true");
      target.after(h("span", { class: "field-error" }, e.msg));
    }
    return h("li", {}, loc ? `${loc}: ${e.msg}` : e.msg);
  });
  replace(box, h("div", { class: "alert", role: "alert", id: "form-error" }, error.message, items.length ? h("ul", {}, items) : null));
  box.scrollIntoView({ block: "nearest" });
}

export async function renderRecipe(main, { query }) {
  const schema = await loadSchema();
  const [models, datasets] = await Promise.all([api("/v1/models?limit=200"), api("/v1/datasets?limit=200")]);
  const choices = {
    model_id: models.data.map((m) => [m.id, `${m.name} (${m.architecture}, ${m.id.slice(0, 8)})`]),
    dataset_id: datasets.data.map((d) => [d.id, `${d.name} (${d.records} records, ${d.id.slice(0, 8)})`]),
  };
  const stepKinds = schema.steps();
  const modelSelect = h(
    "select",
    { id: "model_id", "data-loc": "model_id" },
    h("option", { value: "" }, "choose a model"),
    choices.model_id.map(([id, text]) => h("option", { value: id, selected: id === query.get("model") }, text)),
  );
  const steps = [];
  const stepList = h("ol", { id: "steps" });
  const preview = h("pre", { id: "spec-preview", "aria-label": "the job spec as it will be sent" });
  const errors = h("div", { "aria-live": "assertive" });

  const redrawSteps = () => {
    replace(stepList, steps.map((step, i) => step.render(i)));
    refresh();
  };
  const addStep = (key) => {
    const kind = stepKinds.find((k) => k.key === key);
    const step = { key, fields: objectFields(schema, kind.schema, "recipe.0", choices) };
    step.render = (i) => {
      for (const element of step.fields.element.querySelectorAll("[data-loc]")) {
        element.dataset.loc = element.dataset.loc.replace(/^recipe\.\d+/, `recipe.${i}`);
      }
      const move = (delta) => {
        const j = i + delta;
        if (j < 0 || j >= steps.length) return;
        [steps[i], steps[j]] = [steps[j], steps[i]];
        redrawSteps();
      };
      return h(
        "li",
        {},
        h(
          "fieldset",
          { "data-loc": `recipe.${i}` },
          h("legend", {}, `step ${i}: ${key.replace("/", " / ")}`),
          kind.schema.description ? h("p", { class: "hint" }, kind.schema.description) : null,
          step.fields.element,
          h(
            "div",
            { class: "row" },
            h("button", { type: "button", class: "secondary", onclick: () => move(-1), disabled: i === 0 }, "Move up"),
            h("button", { type: "button", class: "secondary", onclick: () => move(1), disabled: i === steps.length - 1 }, "Move down"),
            h("button", { type: "button", class: "danger", onclick: () => { steps.splice(i, 1); redrawSteps(); } }, "Remove step"),
          ),
        ),
      );
    };
    steps.push(step);
    redrawSteps();
  };

  const sections = [
    optionalSection(schema, "calibration", "Calibration text (for the steps that learn from data)", choices, false),
    optionalSection(schema, "evaluation", "Evaluation text (perplexity and KL divergence in the report)", choices, true),
    optionalSection(schema, "notify", "Webhook when the job ends", choices, false),
  ];
  const names = ["calibration", "evaluation", "notify"];
  const build = () => {
    const spec = { model_id: modelSelect.value, recipe: steps.map((s) => s.fields.read()) };
    sections.forEach((section, i) => {
      const value = section.read();
      if (value !== undefined) spec[names[i]] = value;
    });
    return spec;
  };
  const refresh = () => {
    const spec = build();
    if (spec.notify && spec.notify.secret) spec.notify = { ...spec.notify, secret: "••••" };
    preview.textContent = JSON.stringify(spec, null, 2);
  };

  const kindSelect = h("select", { id: "step-kind" }, stepKinds.map((k) => h("option", { value: k.key }, k.key.replace("/", " / "))));
  const submit = h("button", { type: "submit", id: "submit-job" }, "Submit job");
  const form = h(
    "form",
    { novalidate: true, id: "recipe-form" },
    h("section", { class: "card" }, h("label", { for: "model_id" }, "Model"), modelSelect),
    h(
      "section",
      { class: "card", "aria-labelledby": "steps-title" },
      h("h2", { id: "steps-title" }, "Recipe steps, in order"),
      stepList,
      h(
        "div",
        { class: "row" },
        h("div", {}, h("label", { for: "step-kind" }, "Step"), kindSelect),
        h("button", { type: "button", class: "secondary", id: "add-step", onclick: () => addStep(kindSelect.value) }, "Add step"),
      ),
    ),
    h("section", { class: "card" }, sections.map((s) => s.element)),
    errors,
    h("p", {}, submit),
    h("section", { class: "card" }, h("h2", {}, "The job spec"), preview),
  );
  form.addEventListener("input", (event) => {
    if (event.target.getAttribute("aria-invalid")) {
      event.target.removeAttribute("aria-invalid");
      if (event.target.nextElementSibling?.classList.contains("field-error")) event.target.nextElementSibling.remove();
    }
    refresh();
  });
  form.addEventListener("change", refresh);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: build() });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      showErrors(form, errors, error);
    } finally {
      submit.disabled = false;
    }
  });
  replace(main, h("h1", {}, "New job"), form);
  refresh();
}
