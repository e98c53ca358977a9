// Form fields built from the job spec's JSON schema (the `JobCreate` component of /openapi.json): each field
// knows its path in the spec (`recipe.0.sparsity`) so the API's 422 messages land beside it, and reads back a
// value or `undefined` to leave it out (a value equal to the schema's default is left out: the API applies it).

import { h } from "./dom.js";

let counter = 0;
const nextId = () => `f${(counter += 1)}`;

export class Schema {
  constructor(openapi) {
    this.components = openapi.components.schemas;
    this.root = this.components.JobCreate;
  }

  resolve(schema) {
    let current = schema;
    while (current && current.$ref) current = this.components[current.$ref.split("/").pop()];
    return current;
  }

  /** [the schema without its `null` branch, whether null is allowed] */
  nullable(schema) {
    const branches = schema.anyOf || [];
    const others = branches.filter((b) => b.type !== "null");
    if (branches.length && others.length === 1 && others.length < branches.length) {
      return [{ ...this.resolve(others[0]), default: schema.default }, true];
    }
    const resolved = this.resolve(schema);
    return [{ ...resolved, default: schema.default ?? resolved.default }, false];
  }

  /** The step schemas of the recipe's discriminated union, keyed "type/method". */
  steps() {
    return this.root.properties.recipe.items.oneOf.map((ref) => {
      const schema = this.resolve(ref);
      return { key: `${schema.properties.type.const}/${schema.properties.method.const}`, schema };
    });
  }
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

function parseNumber(text, integer) {
  const value = Number(text);
  if (text.trim() === "" || Number.isNaN(value)) return text; // sent as typed: the API says what is wrong
  return integer && Number.isInteger(value) ? value : value;
}

function fromText(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/**
 * A labelled control for one property. `choices` maps a property name to [value, label] options (models,
 * datasets). Returns {element, read, path}.
 */
export function field(schema, name, property, path, choices) {
  const [inner, isNullable] = schema.nullable(property);
  const id = nextId();
  const hintId = `${id}-hint`;
  const description = property.description || inner.description;
  const title = property.title || name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
  const label = h("label", { for: id }, title);
  const hint = description ? h("span", { class: "hint", id: hintId }, description) : null;
  const common = { id, name: path, "data-loc": path, "aria-describedby": description ? hintId : null };
  const fallback = inner.default;
  let control;
  let read;

  if (choices[name]) {
    control = h(
      "select",
      common,
      h("option", { value: "" }, `choose a ${name.replace(/_id$/, "")}`),
      choices[name].map(([value, text]) => h("option", { value }, text)),
    );
    read = () => control.value || undefined;
  } else if (inner.enum) {
    const options = isNullable ? [null, ...inner.enum] : inner.enum;
    control = h(
      "select",
      common,
      options.map((value) => h("option", { value: JSON.stringify(value), selected: same(value, fallback) }, value === null ? "none" : String(value))),
    );
    read = () => JSON.parse(control.value);
  } else if (inner.type === "boolean") {
    control = h("input", { ...common, type: "checkbox", checked: fallback === true });
    read = () => control.checked;
    return { element: h("div", {}, h("label", { class: "inline" }, control, title), hint), read: withDefault(read, fallback), path };
  } else if (inner.type === "integer" || inner.type === "number") {
    control = h("input", { ...common, type: "text", inputmode: "decimal", value: fallback ?? "", placeholder: isNullable ? "none" : "" });
    read = () => (control.value.trim() === "" ? (isNullable ? null : undefined) : parseNumber(control.value, inner.type === "integer"));
  } else if (inner.type === "array") {
    control = h("input", { ...common, type: "text", value: (fallback || []).join(", ") });
    read = () => control.value.split(",").map((part) => part.trim()).filter(Boolean);
    if (hint) hint.textContent = `${description} (comma-separated)`;
  } else if (inner.type === "string") {
    const secret = inner.format === "password" || inner.writeOnly;
    control = h("input", { ...common, type: secret ? "password" : "text", autocomplete: "off", value: fallback ?? "" });
    read = () => (control.value === "" ? undefined : control.value);
  } else {
    control = h("input", { ...common, type: "text", value: fallback === undefined ? "" : JSON.stringify(fallback) });
    read = () => (control.value.trim() === "" ? undefined : fromText(control.value.trim()));
  }
  return { element: h("div", {}, label, control, hint), read: withDefault(read, fallback), path };
}

function withDefault(read, fallback) {
  return () => {
    const value = read();
    return fallback !== undefined && same(value, fallback) ? undefined : value;
  };
}

/** Every property of an object schema as fields (constants are fixed), read back as one object. */
export function objectFields(schema, objectSchema, path, choices, defaults = {}) {
  const fields = [];
  const constants = {};
  const nested = [];
  for (const [name, declared] of Object.entries(objectSchema.properties || {})) {
    const property = name in defaults ? { ...declared, default: defaults[name] } : declared;
    const resolved = schema.resolve(property);
    if (resolved.const !== undefined) {
      constants[name] = resolved.const;
      continue;
    }
    if (resolved.type === "object" && resolved.properties) {
      const inner = objectFields(schema, resolved, `${path}.${name}`, choices, property.default || {});
      nested.push({ name, inner, defaults: property.default });
      continue;
    }
    fields.push({ name, ...field(schema, name, property, `${path}.${name}`, choices) });
  }
  const element = h(
    "div",
    {},
    h("div", { class: "grid" }, fields.map((f) => f.element)),
    nested.map(({ name, inner }) => h("fieldset", { "data-loc": `${path}.${name}` }, h("legend", {}, name), inner.element)),
  );
  const read = () => {
    const value = { ...constants };
    for (const f of fields) {
      const v = f.read();
      if (v !== undefined) value[f.name] = v;
    }
    for (const { name, inner, defaults: given } of nested) {
      const v = inner.read({ withDefaults: given });
      if (v !== undefined) value[name] = v;
    }
    return value;
  };
  return {
    element,
    read: ({ withDefaults } = {}) => {
      const value = read();
      if (!withDefaults) return value;
      // a nested object given in full (its defaults differ from the inner fields'): send it whole when changed
      const full = { ...withDefaults, ...value };
      return same(full, withDefaults) ? undefined : full;
    },
  };
}
