// The dashboard's router: the URL fragment names the page (#/jobs/<id>), so the server serves one HTML page and
// every link can be bookmarked. Each page renders into <main> and returns a function that stops its streams.

import { credentials } from "./api.js";
import { alertBox, replace } from "./dom.js";
import { renderJob } from "./pages/job.js";
import { renderJobs } from "./pages/jobs.js";
import { renderLibrary } from "./pages/library.js";
import { renderModel } from "./pages/model.js";
import { renderRecipe } from "./pages/recipe.js";
import { renderSignIn } from "./pages/signin.js";

const ROUTES = [
  [/^\/signin$/, renderSignIn, "Sign in"],
  [/^\/models$/, renderLibrary, "Models and datasets"],
  [/^\/models\/([\w-]+)$/, renderModel, "Model"],
  [/^\/jobs$/, renderJobs, "Jobs"],
  [/^\/jobs\/([\w-]+)$/, renderJob, "Job"],
  [/^\/new$/, renderRecipe, "New job"],
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let stop = () => {};

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/models";
  const [path, query = ""] = raw.split("?");
  return { path, query: new URLSearchParams(query) };
}

async function route() {
  stop();
  stop = () => {};
  const { path, query } = parseHash();
  const signedIn = Boolean(credentials.get());
  nav.hidden = !signedIn;
  if (!signedIn && path !== "/signin") {
    location.replace(`#/signin?next=${encodeURIComponent(path)}`);
    return;
  }
  const match = ROUTES.map(([pattern, render, title]) => [pattern.exec(path), render, title]).find(([m]) => m);
  if (!match) {
    replace(main, alertBox(`There is no page at ${path}.`));
    return;
  }
  const [groups, render, title] = match;
  document.title = `${title} · modelpress`;
  for (const link of nav.querySelectorAll("a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#${path}`);
  }
  const controller = new AbortController();
  stop = () => controller.abort();
  replace(main);
  try {
    await render(main, { params: groups.slice(1), query, signal: controller.signal });
  } catch (error) {
    if (!controller.signal.aborted) replace(main, alertBox(error.message));
  }
  if (!main.contains(document.activeElement)) main.focus({ preventScroll: true });
}

document.getElementById("sign-out").addEventListener("click", () => {
  credentials.clear();
  location.hash = "#/signin";
});
window.addEventListener("modelpress:signed-out", () => {
  if (!location.hash.startsWith("#/signin")) location.hash = "#/signin";
});
window.addEventListener("hashchange", route);
route();
