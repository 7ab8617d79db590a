// kiln's web page: plain JavaScript over the same API as the CLI and SDK. The API key lives in
// localStorage; the terminal is xterm.js on /sandboxes/:id/ws (browsers cannot set headers on a
// WebSocket, so that one route takes ?token=).
"use strict";

const $ = (id) => document.getElementById(id);
let token = localStorage.getItem("kiln.token") || "";
let term = null, socket = null, refreshTimer = null;

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = r.status === 204 ? null : await r.json().catch(() => null);
  if (!r.ok) {
    const err = new Error((data && data.error) || `${r.status} ${r.statusText}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  return td;
}

function button(label, onclick, cls) {
  const b = document.createElement("button");
  b.textContent = label;
  b.className = cls || "";
  b.addEventListener("click", onclick);
  return b;
}

function showError(e) {
  $("error").textContent = e ? e.message : "";
}

async function refresh() {
  let sandboxes;
  try {
    sandboxes = await api("GET", "/sandboxes");
  } catch (e) {
    if (e.status === 401) return logout("That key was refused: " + e.message);
    return showError(e);
  }
  const tbody = $("sandboxes").querySelector("tbody");
  const rows = await Promise.all(sandboxes.map(async (sb) => {
    const published = await api("GET", `/sandboxes/${sb.id}/publish`).catch(() => []);
    const tr = document.createElement("tr");
    tr.dataset.id = sb.id;
    tr.dataset.name = sb.name;
    [sb.name, sb.status, sb.thermal, sb.cpus, `${sb.memory_mb} MB`, sb.ip, egress(sb.net_policy), sb.image]
      .forEach((v) => tr.appendChild(cell(v)));
    const links = document.createElement("td");
    for (const rule of published) {
      const a = document.createElement("a");
      a.href = rule.url;
      a.target = "_blank";
      a.textContent = `${rule.port} → ${rule.url}`;
      links.appendChild(a);
      links.appendChild(document.createElement("br"));
    }
    tr.appendChild(links);
    const actions = document.createElement("td");
    actions.className = "actions";
    actions.appendChild(button("Terminal", () => openTerminal(sb), "terminal"));
    actions.appendChild(button("Publish…", () => publish(sb), "publish"));
    actions.appendChild(button("Fork", () => fork(sb), "fork"));
    actions.appendChild(button("Snapshot…", () => snapshot(sb), "snapshot"));
    actions.appendChild(button(sb.status === "running" ? "Stop" : "Start",
      () => act(api("POST", `/sandboxes/${sb.id}/${sb.status === "running" ? "stop" : "start"}`))));
    actions.appendChild(button("Destroy", () => {
      if (confirm(`Destroy ${sb.name}? Its disk goes with it.`)) act(api("DELETE", `/sandboxes/${sb.id}`));
    }, "danger"));
    tr.appendChild(actions);
    return tr;
  }));
  tbody.replaceChildren(...rows);
  await refreshImages();
  showError(null);
}

// The images table, and the create form's choice of image (ready ones only; default first).
async function refreshImages() {
  const images = await api("GET", "/images").catch(() => []);
  $("images").querySelector("tbody").replaceChildren(...images.map((i) => {
    const tr = document.createElement("tr");
    tr.dataset.name = i.name;
    const status = i.progress ? `${i.status} (${i.progress})` : i.status;
    [i.name, i.source, status, `${i.size_mb} MB`, i.created_at].forEach((v) => tr.appendChild(cell(v)));
    return tr;
  }));
  const select = $("new-image");
  const chosen = select.value || "default";
  const ready = images.filter((i) => i.status === "ready").map((i) => i.name);
  if (ready.join() !== [...select.options].map((o) => o.value).join()) {
    select.replaceChildren(...ready.map((name) => new Option(name, name, false, name === chosen)));
  }
}

function egress(policy) {
  if (!policy) return "";
  if (policy.default === "public") return "public";
  const allowed = [...policy.allow_hosts, ...policy.allow_cidrs];
  return allowed.length ? `deny, except ${allowed.join(", ")}` : "deny";
}

async function act(promise) {
  try {
    await promise;
  } catch (e) {
    showError(e);
  }
  refresh();
}

async function publish(sb) {
  const port = prompt(`Publish which port of ${sb.name}?`, "3000");
  if (!port) return;
  act(api("POST", `/sandboxes/${sb.id}/publish`, { port: Number(port) }));
}

// A fork: a copy of the sandbox at this instant, processes and memory included (it keeps running).
function fork(sb) {
  act(api("POST", "/sandboxes", { from: sb.id }).then((copy) => {
    $("create-status").textContent = `forked ${sb.name} as ${copy.name} (paused ${copy.fork.paused_ms} ms)`;
  }));
}

async function snapshot(sb) {
  const name = prompt(`Name of the snapshot of ${sb.name}?`, `${sb.name}-snap`);
  if (!name) return;
  act(api("POST", `/sandboxes/${sb.id}/checkpoint`, { name }).then((snap) => {
    $("create-status").textContent = `snapshot ${snap.name}: ${snap.size_mb} MB`;
  }));
}

function openTerminal(sb) {
  closeTerminal();
  $("terminal-panel").hidden = false;
  $("terminal-title").textContent = `${sb.name} — shell`;
  term = new Terminal({ cursorBlink: true, fontSize: 14, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open($("terminal"));
  fit.fit();
  const proto = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${proto}://${location.host}/sandboxes/${sb.id}/ws?token=${encodeURIComponent(token)}`);
  socket.binaryType = "arraybuffer";
  const sendSize = () => socket.readyState === 1 &&
    socket.send(JSON.stringify({ type: "resize", rows: term.rows, cols: term.cols }));
  socket.onopen = sendSize;
  socket.onmessage = (ev) => {
    if (typeof ev.data === "string") {
      const msg = JSON.parse(ev.data);
      if (msg.type === "error") term.write(`\r\n[${msg.error}]\r\n`);
      return;
    }
    term.write(new Uint8Array(ev.data));
  };
  socket.onclose = () => term && term.write("\r\n[disconnected]\r\n");
  const encoder = new TextEncoder();
  term.onData((d) => socket.readyState === 1 && socket.send(encoder.encode(d)));
  term.onResize(sendSize);
  window.onresize = () => fit.fit();
  term.focus();
}

function closeTerminal() {
  if (socket) socket.close();
  if (term) term.dispose();
  socket = term = null;
  $("terminal-panel").hidden = true;
}

function logout(message) {
  closeTerminal();
  clearInterval(refreshTimer);
  localStorage.removeItem("kiln.token");
  token = "";
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function start() {
  if (!token) return logout();
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  await refresh();
  clearInterval(refreshTimer);
  refreshTimer = setInterval(refresh, 5000);
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  localStorage.setItem("kiln.token", token);
  start();
});
$("logout").addEventListener("click", () => logout());
$("terminal-close").addEventListener("click", closeTerminal);
$("create-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = { cpus: Number($("new-cpus").value), memory_mb: Number($("new-memory").value) };
  if ($("new-name").value) body.name = $("new-name").value;
  if ($("new-image").value) body.image = $("new-image").value;
  $("create").disabled = true;
  $("create-status").textContent = "creating…";
  try {
    const sb = await api("POST", "/sandboxes", body);
    $("create-status").textContent = `created ${sb.name}`;
    $("new-name").value = "";
  } catch (e) {
    $("create-status").textContent = "";
    showError(e);
  } finally {
    $("create").disabled = false;
  }
  refresh();
});
start();
