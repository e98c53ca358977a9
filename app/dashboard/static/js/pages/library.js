// Models and datasets: what the tenant has uploaded, and an upload box for each (drag and drop, with progress).

import { api, uploadFile } from "../api.js";
import { alertBox, bytes, h, number, replace, when } from "../dom.js";

const KINDS = {
  models: {
    kind: "model",
    title: "Models",
    route: "/v1/models",
    accept: ".tar,.tar.gz,.tgz,.zip,.gguf",
    hint:
      "A Hugging Face folder packed as .tar, .tar.gz or .zip (config.json and *.safetensors), or a .gguf file. " +
      "Above 64 MiB it goes up in parts, and a part that fails is sent again.",
    columns: ["name", "architecture", "format", "parameters", "size", "uploaded"],
    row: (model) => [
      h("a", { href: `#/models/${model.id}` }, model.name),
      model.architecture,
      model.format,
      number(model.parameters),
      bytes(model.size_bytes),
      when(model.created_at),
    ],
  },
  datasets: {
    kind: "dataset",
    title: "Datasets",
    route: "/v1/datasets",
    accept: ".txt,.jsonl",
    hint: 'Plain text (.txt) or JSON lines (.jsonl, one {"text": …} per line), for calibration and evaluation.',
    columns: ["name", "format", "records", "size", "uploaded"],
    row: (dataset) => [
      dataset.name,
      dataset.format,
      number(dataset.records),
      bytes(dataset.size_bytes),
      when(dataset.created_at),
    ],
  },
};

function table(kind, rows) {
  if (!rows.length) return h("p", { class: "muted" }, `No ${kind.title.toLowerCase()} yet.`);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, kind.columns.map((c) => h("th", { scope: "col" }, c)))),
    h(
      "tbody",
      {},
      rows.map((row) => h("tr", { "data-id": row.id }, kind.row(row).map((cell) => h("td", {}, cell)))),
    ),
  );
}

function uploader(name, kind, onDone) {
  const fileInput = h("input", { type: "file", id: `${name}-file`, accept: kind.accept });
  const nameInput = h("input", { type: "text", id: `${name}-name`, placeholder: "(the file's name)" });
  const progress = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "upload progress" });
  const message = h("div", { "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Upload");
  const zone = h(
    "div",
    { class: "drop", "data-drop": name },
    "Drop a file here, or choose one: ",
    fileInput,
    h("span", { class: "hint" }, kind.hint),
  );
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (event.dataTransfer.files.length) fileInput.files = event.dataTransfer.files;
  });
  const form = h(
    "form",
    { "aria-label": `Upload to ${kind.title.toLowerCase()}` },
    zone,
    h(
      "div",
      { class: "row" },
      h("div", {}, h("label", { for: `${name}-name` }, "Name"), nameInput),
      button,
      progress,
    ),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const file = fileInput.files[0];
    if (!file) {
      replace(message, alertBox("Choose a file to upload first."));
      return;
    }
    button.disabled = true;
    progress.hidden = false;
    progress.value = 0;
    replace(message, `Uploading ${file.name}…`);
    try {
      const created = await uploadFile(kind.kind, file, nameInput.value.trim(), (fraction) => {
        progress.value = fraction;
      });
      replace(message, h("div", { class: "notice", role: "status" }, `Uploaded ${created.name} (${created.id}).`));
      form.reset();
      await onDone();
    } catch (error) {
      replace(message, alertBox(error.message));
    } finally {
      button.disabled = false;
      progress.hidden = true;
    }
  });
  return form;
}

export async function renderLibrary(main) {
  replace(main, h("h1", {}, "Models and datasets"));
  for (const [name, kind] of Object.entries(KINDS)) {
    const list = h("div", { id: `${name}-list` });
    const refresh = async () => replace(list, table(kind, (await api(`${kind.route}?limit=200`)).data));
    main.append(h("section", { class: "card", "aria-labelledby": `${name}-title` },
      h("h2", { id: `${name}-title` }, kind.title), list, h("h3", {}, `Upload to ${kind.title.toLowerCase()}`),
      uploader(name, kind, refresh)));
    await refresh();
  }
}
