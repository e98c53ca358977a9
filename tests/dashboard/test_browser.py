"""The dashboard in a real browser, as a new user meets it: sign in, upload a tiny model and a dataset, submit a
job from the recipe form, watch it finish live, open the report and the model's plot, download the artifact; and
another tenant's key sees none of it. Every page's screenshot is written (see conftest.screenshots)."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_key
from tests.utils.factories import build_tiny_model, tar_folder, write_text_dataset
from tests.utils.stack import Stack

VIEWPORT = {"width": 1280, "height": 900}
EXTRA_RECIPE = [{"type": "prune", "method": "magnitude", "sparsity": 0.3}]


class Watched:
    """A browser context with a fresh sessionStorage that records every request URL and console error."""

    def __init__(self, browser, base_url: str) -> None:
        self.context = browser.new_context(viewport=VIEWPORT, base_url=base_url, accept_downloads=True)
        self.page = self.context.new_page()
        self.urls: list[str] = []
        self.console_errors: list[str] = []
        self.page.on("request", lambda request: self.urls.append(request.url))
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda error: self.console_errors.append(str(error)))

    def sign_in(self, key: str) -> None:
        """With the keyboard only: the key field has the focus, Enter submits."""
        self.page.goto("/")
        self.page.wait_for_url(re.compile(r"#/signin"))
        self.page.wait_for_selector("#api-key:focus")
        self.page.keyboard.type(key)
        self.page.keyboard.press("Enter")
        self.page.wait_for_selector("h1:text('Models and datasets')")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("upload")
    archive = tar_folder(build_tiny_model(root / "model"), root / "tiny-llama.tar.gz", gzip=True)
    return {"model": archive, "text": write_text_dataset(root / "wiki-sample.txt")}


def test_walkthrough(browser, dashboard_stack: Stack, files: dict[str, Path], screenshots: Path, tmp_path: Path):
    key = dashboard_stack.key
    user = Watched(browser, dashboard_stack.api.url)
    page = user.page
    page.goto("/")
    page.wait_for_selector("#api-key")
    page.screenshot(path=screenshots / "sign-in.png")
    user.sign_in(key)

    # upload: the model through the file chooser, the dataset dropped on its zone
    page.set_input_files("#models-file", files["model"])
    page.fill("#models-name", "tiny-llama")
    page.click("form[aria-label='Upload to models'] button[type=submit]")
    page.wait_for_selector("#models-list td a:text('tiny-llama')")
    drop = page.evaluate_handle(
        "(text) => { const t = new DataTransfer(); t.items.add(new File([text], 'wiki-sample.txt')); return t; }",
        files["text"].read_text(),
    )
    page.dispatch_event("[data-drop=datasets]", "drop", {"dataTransfer": drop})
    page.click("form[aria-label='Upload to datasets'] button[type=submit]")
    page.wait_for_selector("#datasets-list td:text('wiki-sample')")
    page.screenshot(path=screenshots / "models.png", full_page=True)

    api = httpx.Client(base_url=dashboard_stack.api.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    model = api.get("/v1/models").json()["data"][0]
    dataset = api.get("/v1/datasets").json()["data"][0]
    assert model["name"] == "tiny-llama" and dataset["records"] > 0

    # a big file goes up in parts through /v1/uploads; here a small one in 4 KiB parts, with its progress
    in_parts = page.evaluate(
        """async (text) => {
             const { uploadInParts } = await import('/ui/js/api.js');
             const seen = [];
             const file = new File([text], 'in-parts.txt');
             const dataset = await uploadInParts('dataset', file, 'in-parts', (f) => seen.push(f), 4096);
             return { dataset, seen };
           }""",
        files["text"].read_text(),
    )
    assert in_parts["dataset"]["name"] == "in-parts" and in_parts["dataset"]["records"] == dataset["records"]
    seen = in_parts["seen"]
    assert len(seen) >= -(-files["text"].stat().st_size // 4096) and seen == sorted(seen) and seen[-1] == 1

    # the recipe form: a bad value shows the API's own message, then a valid spec is submitted
    page.click("nav a:text('New job')")
    page.wait_for_selector("#recipe-form")
    page.select_option("#model_id", model["id"])
    page.select_option("#step-kind", "prune/magnitude")
    page.click("#add-step")
    page.fill("[data-loc='recipe.0.sparsity']", "1.5")
    page.select_option("[data-loc='evaluation.dataset_id']", dataset["id"])
    page.fill("[data-loc='evaluation.seq_len']", "64")
    page.fill("[data-loc='evaluation.max_windows']", "4")
    sent = page.evaluate("JSON.parse(document.getElementById('spec-preview').textContent)")
    refused = api.post("/v1/jobs", json=sent)
    assert refused.status_code == 422
    page.click("#submit-job")
    page.wait_for_selector("#form-error")
    assert refused.json()["detail"] in page.inner_text("#form-error")
    assert page.get_attribute("[data-loc='recipe.0.sparsity']", "aria-invalid") == "true"

    page.fill("[data-loc='recipe.0.sparsity']", "0.5")
    page.select_option("#step-kind", "quantize/rtn")
    page.click("#add-step")
    page.select_option("[data-loc='recipe.1.weights.bits']", "8")
    page.screenshot(path=screenshots / "recipe-form.png", full_page=True)
    spec = page.evaluate("JSON.parse(document.getElementById('spec-preview').textContent)")
    assert [s["method"] for s in spec["recipe"]] == ["magnitude", "rtn"] and spec["recipe"][0]["sparsity"] == 0.5
    page.click("#submit-job")
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    extra = api.post("/v1/jobs", json={**spec, "recipe": EXTRA_RECIPE}).json()["id"]  # a second point on the plot
    windows = {"dataset_id": dataset["id"], "seq_len": 64, "max_windows": 4}  # the jobs' evaluation windows
    search = api.post(  # its candidates are plotted beside the jobs
        "/v1/searches",
        json={
            "model_id": model["id"],
            "calibration": {"dataset_id": dataset["id"], "samples": 4, "seq_len": 32},
            "evaluation": windows,
            "budget": {"perplexity_increase": 0.5},
            "space": {"formats": ["bf16", "int8"], "methods": ["rtn"]},
            "sensitivity_windows": 2,
        },
    )
    assert search.status_code == 202, search.text
    search_id = search.json()["id"]

    # the jobs list follows each job over its event stream: statuses change without a reload
    page.click("nav a:text('Jobs')")
    page.wait_for_selector(f"tr[data-job='{job_id}']")
    assert "quality-budget search" in page.inner_text(f"tr[data-job='{search_id}']")  # a search is listed as one
    page.evaluate(
        """() => { window.seen = []; new MutationObserver(() => {
             for (const s of document.querySelectorAll('#jobs-table [data-status]')) window.seen.push(s.dataset.status);
           }).observe(document.getElementById('jobs-table'), {subtree: true, childList: true}); }"""
    )
    page.wait_for_selector(f"tr[data-job='{job_id}'] [data-status=running]", timeout=120_000)
    page.screenshot(path=screenshots / "jobs-live.png", full_page=True)
    page.wait_for_selector(f"tr[data-job='{job_id}'] [data-status=succeeded]", timeout=300_000)
    statuses = page.evaluate("window.seen")
    assert "running" in statuses and "succeeded" in statuses
    assert page.get_attribute(f"tr[data-job='{job_id}'] progress", "value") == "1"

    # the report
    page.click(f"tr[data-job='{job_id}'] a.mono")
    page.wait_for_selector("#comparison")
    report = api.get(f"/v1/jobs/{job_id}/report").json()
    assert f"{report['optimized']['perplexity']:.4g}" in page.inner_text("#comparison")
    assert page.locator("#damage-chart canvas").count() == 1
    assert page.locator("#samples tbody tr").count() == len(report["samples"]) > 0
    assert page.locator(".timeline li").filter(has_text="took").count() == 2
    page.screenshot(path=screenshots / "job-report.png", full_page=True)
    with page.expect_download() as started:
        page.click("[data-artifact=model]")
    artifact = next(a for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] if a["kind"] == "model")
    assert started.value.suggested_filename == artifact["name"]
    saved = tmp_path / artifact["name"]
    started.value.save_as(saved)
    assert saved.stat().st_size == artifact["size_bytes"]
    with tarfile.open(saved) as tar:
        assert "config.json" in {Path(m.name).name for m in tar.getmembers()}

    # the model's plot: every succeeded job with a perplexity, and the Pareto front
    dashboard_stack.client().wait(extra, 300, dashboard_stack.workers[0])
    assert dashboard_stack.client().wait(search_id, 300, dashboard_stack.workers[0])["status"] == "succeeded"
    candidates = api.get(f"/v1/searches/{search_id}").json()["result"]["candidates"]
    assert candidates
    page.click("a:text('model tiny-llama')")
    page.wait_for_selector("#tradeoff-charts canvas >> nth=1")
    # the two jobs, the search's candidates and the model as uploaded
    assert page.locator("#points tbody tr").count() == 3 + len(candidates)
    assert page.locator("#points tbody tr", has_text="search candidate").count() == len(candidates)
    page.screenshot(path=screenshots / "model-plot.png", full_page=True)
    page.click(f"#points a[href='#/jobs/{job_id}']")
    page.wait_for_selector("#comparison")

    # a search's own page lists its candidates with the choice and the front marked
    page.goto(f"/#/jobs/{search_id}")
    page.wait_for_selector("#candidates tbody tr")
    assert page.locator("#candidates tbody tr").count() == len(candidates)

    # the key travels only in a header: never in a URL, never in a cookie; the page's CSP blocked nothing and no
    # script failed (the one failed load is the refused job above)
    assert not [url for url in user.urls if key in url]
    assert user.context.cookies() == []
    assert [e for e in user.console_errors if "422" not in e] == []
    user.context.close()


def test_other_tenant_sees_nothing(browser, dashboard_stack: Stack, files: dict[str, Path]) -> None:
    owner = dashboard_stack.client()
    model = owner.upload("/v1/models", files["model"], name="acme-only").json()
    job = owner.http.post("/v1/jobs", json={"model_id": model["id"], "recipe": EXTRA_RECIPE}).json()
    owner.http.post(f"/v1/jobs/{job['id']}/cancel")

    other = Watched(browser, dashboard_stack.api.url)
    other.sign_in(make_key("globex", dashboard_stack.env["DATABASE_URL"]))
    page = other.page
    page.wait_for_selector("#models-list :text('No models yet.')")
    page.wait_for_selector("#datasets-list :text('No datasets yet.')")
    page.goto(f"/#/jobs/{job['id']}")
    page.wait_for_selector("[role=alert]")
    assert f"job {job['id']} not found" in page.inner_text("[role=alert]")
    page.goto(f"/#/models/{model['id']}")
    page.wait_for_selector(f"[role=alert]:has-text('model {model['id']} not found')")
    page.goto("/#/jobs")
    page.wait_for_selector("text=No jobs match.")
    other.context.close()
