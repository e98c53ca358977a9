// The /v1 API as the dashboard calls it: the key travels in the Authorization header (never a cookie or a URL)
// and lives in sessionStorage, so it is gone when the browser tab closes.

const KEY_NAME = "modelpress.apiKey";
export const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export const credentials = {
  get: () => sessionStorage.getItem(KEY_NAME),
  set: (key) => sessionStorage.setItem(KEY_NAME, key),
  clear: () => sessionStorage.removeItem(KEY_NAME),
};

/** An API answer outside 2xx: `detail` and, for a 422 from validation, `errors` ({loc, msg, type}). */
export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.detail ? body.detail : `the server answered ${status}`);
    this.status = status;
    this.errors = (body && body.errors) || [];
  }
}

function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${credentials.get() || ""}`, ...extra };
}

function signedOut(status) {
  if (status === 401) {
    credentials.clear();
    window.dispatchEvent(new Event("modelpress:signed-out"));
  }
}

async function parse(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text };
  }
}

/** A JSON call to the API; throws ApiError with the API's own message on a non-2xx answer. */
export async function api(path, { method = "GET", body, headers = {} } = {}) {
  const init = { method, headers: authHeaders(headers), credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await parse(response);
  if (!response.ok) {
    signedOut(response.status);
    throw new ApiError(response.status, data);
  }
  return data;
}

/** Files above this go up in parts through /v1/uploads (the API's default part size): a failed part is sent again. */
export const PARTS_FROM_BYTES = 64 * 1024 * 1024;
const PART_TRIES = 3;

/** Upload a model or dataset file: in one multipart POST, or in parts when it is big; resolves to the resource. */
export function uploadFile(kind, file, name, onProgress) {
  if (file.size > PARTS_FROM_BYTES) return uploadInParts(kind, file, name, onProgress);
  return uploadWhole(`/v1/${kind}s`, file, name, onProgress);
}

/** PUT one part's bytes with progress; resolves to the upload's state. */
function sendPart(uploadId, number, blob, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("PUT", `/v1/uploads/${uploadId}/parts/${number}`);
    request.setRequestHeader("Authorization", `Bearer ${credentials.get() || ""}`);
    request.setRequestHeader("Content-Type", "application/octet-stream");
    request.upload.addEventListener("progress", (event) => onProgress(event.loaded));
    request.addEventListener("load", () => {
      let data = {};
      try {
        data = JSON.parse(request.responseText || "{}");
      } catch {
        data = { detail: request.responseText };
      }
      if (request.status >= 200 && request.status < 300) resolve(data);
      else reject(new ApiError(request.status, data));
    });
    request.addEventListener("error", () => reject(new ApiError(0, { detail: "the connection dropped" })));
    request.send(blob);
  });
}

/**
 * A resumable upload: create it, send each part the server does not hold yet (each tried up to PART_TRIES
 * times), then complete it. `partSize` is left to the server unless given.
 */
export async function uploadInParts(kind, file, name, onProgress, partSize) {
  const created = await api("/v1/uploads", {
    method: "POST",
    body: { kind, filename: file.name, size: file.size, name: name || undefined, part_size: partSize },
  });
  const held = new Set(created.received);
  let done = 0;
  for (let number = 1; number <= created.parts; number += 1) {
    const start = (number - 1) * created.part_size;
    const blob = file.slice(start, Math.min(start + created.part_size, file.size));
    if (!held.has(number)) {
      for (let attempt = 1; ; attempt += 1) {
        try {
          await sendPart(created.id, number, blob, (loaded) => onProgress((done + loaded) / file.size));
          break;
        } catch (error) {
          signedOut(error.status);
          const retriable = error.status === 0 || error.status === 429 || error.status >= 500;
          if (!retriable || attempt >= PART_TRIES) throw error;
          await sleep(1000 * attempt);
        }
      }
    }
    done += blob.size;
    onProgress(done / file.size);
  }
  return api(`/v1/uploads/${created.id}/complete`, { method: "POST" });
}

/** POST a file as multipart (`file`, `name`) with upload progress; resolves to the created resource. */
function uploadWhole(route, file, name, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", route);
    request.setRequestHeader("Authorization", `Bearer ${credentials.get() || ""}`);
    request.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    request.addEventListener("load", () => {
      let data = null;
      try {
        data = JSON.parse(request.responseText);
      } catch {
        data = { detail: request.responseText || `the server answered ${request.status}` };
      }
      if (request.status >= 200 && request.status < 300) resolve(data);
      else {
        signedOut(request.status);
        reject(new ApiError(request.status, data));
      }
    });
    request.addEventListener("error", () => reject(new ApiError(0, { detail: "the upload was interrupted" })));
    const form = new FormData();
    if (name) form.append("name", name);
    form.append("file", file, file.name);
    request.send(form);
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Parse server-sent events from a fetch body: yields {id, event, data} per event, skipping comments. */
async function* readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { id: null, event: "message", data: [] };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
        else if (field === "event") event.event = text;
      }
      if (event.data.length) yield { ...event, data: event.data.join("\n") };
    }
  }
}

/**
 * Follow a job's event stream until its final status, calling onJob with each job resource.
 * EventSource cannot send the key header, so the stream is read with fetch; after a dropped connection it
 * reconnects with Last-Event-ID. Resolves to the final job, or null when `signal` aborts.
 */
export async function followJob(jobId, onJob, signal) {
  let lastId = null;
  let delay = 1000;
  while (!signal.aborted) {
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events`, {
        headers,
        signal,
        credentials: "omit",
        cache: "no-store",
      });
      if (!response.ok) {
        signedOut(response.status);
        throw new ApiError(response.status, await parse(response));
      }
      for await (const event of readEvents(response.body)) {
        if (event.id) lastId = event.id;
        if (event.event !== "job") continue;
        const job = JSON.parse(event.data);
        onJob(job);
        delay = 1000;
        if (FINAL.has(job.status)) return job;
      }
    } catch (error) {
      if (signal.aborted) return null;
      if (error instanceof ApiError && error.status >= 400 && error.status < 500 && error.status !== 429) throw error;
    }
    await sleep(delay);
    delay = Math.min(delay * 2, 15000);
  }
  return null;
}

/** Download an artifact: fetched with the key header, then saved under its own name. */
export async function download(artifact) {
  const response = await fetch(artifact.download_url, { headers: authHeaders(), credentials: "omit" });
  if (!response.ok) {
    signedOut(response.status);
    throw new ApiError(response.status, await parse(response));
  }
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = artifact.name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}
