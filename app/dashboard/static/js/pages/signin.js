// Sign in with an API key: it is checked against the API and kept in sessionStorage only.

import { api, credentials } from "../api.js";
import { alertBox, h, replace } from "../dom.js";

export async function renderSignIn(main, { query }) {
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    required: true,
    "aria-describedby": "api-key-hint",
  });
  const message = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", novalidate: true },
    h("label", { for: "api-key" }, "API key"),
    input,
    h(
      "span",
      { class: "hint", id: "api-key-hint" },
      "Create one with `modelpress keys create --tenant <name>`. It is sent in the Authorization header and kept " +
        "in this browser session only (closing the tab forgets it).",
    ),
    h("p", {}, h("button", { type: "submit" }, "Sign in")),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      replace(message, alertBox("Enter an API key."));
      return;
    }
    credentials.set(key);
    try {
      await api("/v1/models?limit=1");
    } catch (error) {
      credentials.clear();
      replace(message, alertBox(error.message));
      return;
    }
    const next = query.get("next");
    location.hash = next && next !== "/signin" ? `#${next}` : "#/models";
  });
  replace(main, h("div", { class: "signin" }, h("h1", {}, "Sign in"), form));
  input.focus();
}
