// Building the page from data without innerHTML: names and texts from uploads are never parsed as HTML.

/** h("a", {href: "#/x", class: "y"}, "text", child) -> an element; `on*` attributes add listeners. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
}

export function alertBox(message) {
  return h("div", { class: "alert", role: "alert" }, message);
}

export function bytes(value) {
  if (value === null || value === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let size = value;
  let unit = 0;
  while (size >= 1000 && unit < units.length - 1) {
    size /= 1000;
    unit += 1;
  }
  return `${size.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export function number(value, digits = 3) {
  if (value === null || value === undefined) return "—";
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return Number(value).toPrecision(digits);
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function statusBadge(status) {
  return h("span", { class: `status ${status}`, "data-status": status }, status);
}

export function stepName(step) {
  return `${step.type} / ${step.method}`;
}
