"use strict";
// The admin UI: a thin client of the JSON API. The token lives in this tab's sessionStorage only.
// Live refresh is polling (every POLL_MS while the tab is visible): EventSource cannot send the
// Authorization header, and a token in a URL would end up in access logs and proxy logs.
const POLL_MS = 3000;
const READONLY_TIP = "Read-only token: sign in with an admin token to do this";
const $ = (s, root = document) => root.querySelector(s);
const $$ = (s, root = document) => Array.from(root.querySelectorAll(s));

let token = sessionStorage.getItem("uptrakit-token");
let session = null;          // {name, role, ...} of the signed-in token
let page = "overview";
let names = {};              // service id -> display name
let pollTimer = null;
let lastOverview = null;

// -- plumbing -------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status, field) { super(message); this.status = status; this.field = field; }
}

async function api(method, path, body) {
  const r = await fetch(path, {method, headers: {"Authorization": "Bearer " + token,
    "Content-Type": "application/json"}, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) { signOut("Your token is no longer accepted: sign in again."); throw new ApiError("signed out", 401); }
  if (!r.ok) throw new ApiError(data.error || r.statusText, r.status, data.field);
  return data;
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  e.append(...children.filter((c) => c !== null && c !== undefined));
  return e;
}
function td(content, cls) {
  const c = el("td", cls ? {class: cls} : {});
  if (content instanceof Node) c.append(content); else c.textContent = content ?? "–";
  return c;
}
function say(text, isError) { const m = $("#message"); m.textContent = text || ""; m.className = isError ? "error" : "ok"; }
const readOnly = () => !session || session.role !== "admin";

// A read-only session's buttons stay in the Tab order (aria-disabled, not disabled): a keyboard user reaches
// them and learns why they do nothing; a click on one says so (the capture listener in start()).
function lock(control, ro) {
  if (control.tagName === "BUTTON") control.setAttribute("aria-disabled", ro ? "true" : "false");
  else control.disabled = ro;
  control.title = ro ? READONLY_TIP : (control.dataset.title || "");
}

function actionButton(label, handler, cls = "action") {
  const b = el("button", {type: "button", class: cls, text: label});
  if (readOnly()) lock(b, true);
  b.addEventListener("click", async () => {
    try { const done = await handler(); if (done) say(done); await refresh(); }
    catch (e) { if (e.status !== 401) say(label + ": " + e.message, true); }
  });
  return b;
}

function applyRole() {
  const ro = readOnly();
  $("#readonly-note").hidden = !ro;
  for (const b of $$("#app .action, #rotate, #enroll-form input, #enroll-form select, #admin-form input, " +
                     "#admin-form select, #network-form input, #network-form select, #network-form textarea")) {
    lock(b, ro);
  }
}

function absolute(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC").replace("+00:00", " UTC") : "–"; }
function rel(iso) {
  if (!iso) return "–";
  const s = (Date.parse(iso) - Date.now()) / 1000, a = Math.abs(s);
  const [n, unit] = a < 90 ? [Math.round(a), "s"] : a < 5400 ? [Math.round(a / 60), "min"]
    : a < 172800 ? [Math.round(a / 3600), "h"] : [Math.round(a / 86400), "d"];
  return s >= 0 ? `in ${n} ${unit}` : `${n} ${unit} ago`;
}
function when(iso) { const t = el("time", {datetime: iso || "", title: iso || "", text: rel(iso)}); return t; }
function dlRows(dl, rows) {
  dl.replaceChildren();
  for (const [k, v] of rows) dl.append(el("dt", {text: k}), v instanceof Node ? el("dd", {}, v) : el("dd", {text: v ?? "–"}));
}
function emptyRow(tbody, columns, text) {
  tbody.append(el("tr", {class: "empty"}, el("td", {colspan: String(columns), text})));
}

// Every data table's cells carry their column's heading (data-label): on a phone a row is a card of labelled lines.
function labelCells() {
  for (const table of document.querySelectorAll("table.rows")) {
    const headings = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
    for (const row of table.tBodies[0]?.rows || []) {
      [...row.cells].forEach((cell, i) => {
        if (headings[i] && !cell.hasAttribute("colspan") && cell.dataset.label !== headings[i]) cell.dataset.label = headings[i];
      });
    }
  }
}
new MutationObserver(labelCells).observe(document.documentElement, {childList: true, subtree: true});

// What a row shows, but for its relative times (they change every refresh without the row changing).
function signature(row) {
  const copy = row.cloneNode(true);
  for (const t of copy.querySelectorAll("time")) t.textContent = "";
  for (const cell of copy.querySelectorAll("[data-label]")) cell.removeAttribute("data-label");   // (labelCells' own)
  copy.removeAttribute("data-sig");
  return copy.outerHTML;
}

// Put `rows` (each with data-key) into `body`, keeping the rows already there that show the same thing: the
// element with keyboard focus, a text selection and the scroll position survive a refresh. Kept rows get
// the new relative times. (labelCells labels the cells with their column's heading.)
function fill(body, rows) {
  const old = new Map([...body.children].filter((r) => r.dataset.key).map((r) => [r.dataset.key, r]));
  const wanted = rows.map((row) => {
    row.dataset.sig = signature(row);
    const kept = old.get(row.dataset.key);
    if (!kept || kept.dataset.sig !== row.dataset.sig) return row;
    const times = row.querySelectorAll("time");
    kept.querySelectorAll("time").forEach((t, i) => { if (times[i] && t.textContent !== times[i].textContent) t.textContent = times[i].textContent; });
    return kept;
  });
  wanted.forEach((row, i) => { if (body.children[i] !== row) body.insertBefore(row, body.children[i] || null); });
  while (body.children.length > wanted.length) body.lastElementChild.remove();
}

// a dialog answering a Promise: the value of the button that closed it ("cancel" on Escape)
function dialogAnswer(dialog) {
  dialog.returnValue = "cancel";
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue), {once: true}));
}
async function ask(title, text, okLabel) {
  $("#confirm-title").textContent = title; $("#confirm-text").textContent = text; $("#confirm-ok").textContent = okLabel;
  return (await dialogAnswer($("#confirm-dialog"))) === "ok";
}

// -- banners (on every page) ----------------------------------------------------------------------

// a banner that names something to do links to where it is done
const BANNER_LINKS = {
  services_pending: ["services", "Review them", () => { $("#svc-status").value = "pending"; }],
  rotation_in_progress: ["rotation", "Follow the rotation"],
  ca_rotation_due: ["rotation", "Rotation page"],
  trusts_everything: ["network", "Network settings"],
};

async function loadBanners() {
  lastOverview = await api("GET", "/api/v1/overview");
  const box = $("#banners"); box.replaceChildren();
  for (const b of lastOverview.banners) {
    const banner = el("p", {class: "banner " + b.severity, "data-code": b.code, text: b.text + " "});
    const go = BANNER_LINKS[b.code];
    if (go) banner.append(el("a", {href: "#" + go[0], text: go[1], onclick: () => { if (go[2]) go[2](); }}));
    box.append(banner);
  }
}

// -- pages ----------------------------------------------------------------------------------------

async function loadOverview() {
  const o = lastOverview || await api("GET", "/api/v1/overview");
  const custody = {file: "key in a clear file", sealed: "key sealed", pkcs11: "key in a PKCS#11 token", external: "external CA"};
  const ca = (c) => c ? `generation ${c.generation}, expires ${c.not_after.slice(0, 10)} (${c.days_left} days left), ${custody[c.custody] || c.custody}` : "none";
  const crl = (c) => c && c.crl_number !== null ? `#${c.crl_number}, ${c.crl_entries} entries, built ${Math.round(c.crl_age_seconds / 60)} min ago` : "–";
  // (a certificate revoked lately may be on the previous generation's CRL: both are shown)
  dlRows($("#ov-ca"), [["Active CA", ca(o.active_ca)], ["Active CA's CRL", crl(o.active_ca)],
    ["Previous CA", ca(o.previous_ca)], ...(o.previous_ca ? [["Previous CA's CRL", crl(o.previous_ca)]] : []), ["Server certificate", `expires ${o.server_certificate.not_after.slice(0, 10)} (${o.server_certificate.days_left} days left)`]]);
  dlRows($("#ov-services"), [["Connected", String(o.services.connected)], ["Total", String(o.services.total)],
    ["Waiting for approval", String(o.services.pending)]]);
  dlRows($("#ov-certs"), [["Valid client certificates", String(o.certificates.valid)],
    ["In the renewal window", `${o.certificates.expiring_in_window} (the last ${o.renewal_window_hours} h of a certificate's life: connected services renew by themselves then)`],
    ["Revoked in the last 24 h", String(o.certificates.revoked_last_24h)]]);
  const {controllers} = await api("GET", "/api/v1/controllers");
  const cbody = $("#ov-controllers tbody"); cbody.replaceChildren();
  for (const c of controllers) {
    const name = c.id ? c.id + (c.this ? " (this one)" : "") : "this one (SQLite: the only one)";
    cbody.append(el("tr", {"data-controller": c.id || "local"}, td(name, "mono"), td(c.hostname),
      td(c.leader ? "leader" : "member"), td(String(c.services)), td(when(c.seen_at))));
  }
  const body = $("#ov-expiring tbody"); body.replaceChildren();
  for (const c of o.certificates.expiring) body.append(el("tr", {}, td(c.service), td(c.serial, "mono"), td(when(c.not_after), "expiring")));
  if (!o.certificates.expiring.length) emptyRow(body, 3, "Nothing expires inside the renewal window: connected services renew on their own before it.");
}

async function loadNames() {
  const {services} = await api("GET", "/api/v1/services");
  names = Object.fromEntries(services.map((s) => [s.id, s.friendly_name || s.hostname || s.id]));
  return services;
}

async function loadServices() {
  const services = await loadNames();
  const status = $("#svc-status").value, connected = $("#svc-connected").value, q = $("#svc-search").value.trim().toLowerCase();
  const window = (lastOverview ? lastOverview.renewal_window_hours : 0) * 3600e3;
  const body = $("#services-table tbody"), rows = [];
  let shown = 0;
  for (const s of services) {
    if (status && s.status !== status) continue;
    if (connected && s.connected !== (connected === "yes")) continue;
    const text = [names[s.id], s.hostname, s.ip_address, s.id].join(" ").toLowerCase();
    if (q && !text.includes(q)) continue;
    shown++;
    const cert = s.certificate;
    const expiring = cert && Date.parse(cert.not_after) - Date.now() < window;
    const actions = el("td", {class: "actions"});
    if (s.status === "pending") {
      actions.append(actionButton("Approve", async () => { await api("POST", `/api/v1/services/${s.id}/approve`); return `Approved ${names[s.id]}`; }),
        actionButton("Reject", async () => { await api("POST", `/api/v1/services/${s.id}/reject`); return `Rejected ${names[s.id]}`; }));
    } else if (s.status !== "deactivated") {
      actions.append(actionButton("Deactivate", async () => {
        if (!await ask("Deactivate " + names[s.id] + "?", "Its connection is closed and every certificate it holds is revoked. It cannot come back without enrolling again.", "Deactivate")) return null;
        await api("DELETE", `/api/v1/services/${s.id}`); return `Deactivated ${names[s.id]}`;
      }, "action danger"));
    }
    rows.push(el("tr", {"data-service": s.id, "data-key": s.id},
      td(el("span", {}, el("strong", {}, opens(names[s.id], () => openService(s.id))), el("br"),
             el("small", {class: "mono", text: s.id.slice(0, 8)}))),
      td(s.kind), td(s.status, "status-" + s.status),
      td(el("span", {class: s.connected ? "dot on" : "dot off", text: s.connected ? "yes" : "no",
        title: s.controller ? "held by controller " + s.controller : ""}), "connected"),
      td(s.ip_address), td(s.proxy_ip ? `${s.proxy_ip} (${s.identity_source})` : (s.identity_source === "mtls" ? "direct (mTLS)" : s.identity_source || "–")),
      td(cert ? el("span", {}, "G" + cert.ca_generation + ", expires ", when(cert.not_after)) : null, expiring ? "expiring" : ""),
      td(when(s.last_seen_at)), actions));
  }
  fill(body, rows);
  if (!shown) emptyRow(body, 9, services.length ? "No service matches these filters."
    : "No services yet. Create an enrollment token (Tokens page) and start an agent with the command it shows.");
}

const REASON_WORDS = {keyCompromise: "key compromise", cACompromise: "CA compromise", affiliationChanged: "affiliation changed",
  superseded: "superseded", cessationOfOperation: "cessation of operation", certificateHold: "on hold",
  privilegeWithdrawn: "privilege withdrawn", aACompromise: "AA compromise", unspecified: "no reason given"};
const CERT_PAGE = 500;   // the newest matching certificates the page shows; the server filters the rest

async function loadCertificates() {
  await loadNames();
  const status = $("#cert-status").value, q = $("#cert-search").value.trim().toLowerCase();
  const params = new URLSearchParams({limit: String(CERT_PAGE)});
  if (status) params.set("status", status);
  if (/^[0-9a-f]{4,}$/.test(q)) params.set("q", q);   // a serial (prefix): let the server find it among all
  const {certificates, total} = await api("GET", "/api/v1/certificates?" + params);
  const window = (lastOverview ? lastOverview.renewal_window_hours : 0) * 3600e3;
  const body = $("#certificates-table tbody"), rows = [];
  let shown = 0;
  for (const c of certificates.reverse()) {
    const who = c.purpose === "server" ? "controller (server certificate)" : (names[c.service_id] || c.service_id);
    if (q && !params.has("q") && !(who + " " + c.serial).toLowerCase().includes(q)) continue;
    shown++;
    const expiring = c.status === "valid" && Date.parse(c.not_after) - Date.now() < window;
    const actions = el("td", {class: "actions"});
    if (c.status === "valid" && c.purpose === "server") {
      actions.append(el("small", {class: "hint", text: "re-issued automatically"}));
    } else if (c.status === "valid") {
      actions.append(actionButton("Revoke…", () => revokeDialog(c, who), "action danger"));
    }
    // whole: what is copied is what is used; a click opens the certificate
    const serial = opens(c.serial, () => openCertificate(c.serial), "link view mono serial");
    rows.push(el("tr", {"data-serial": c.serial, "data-key": c.serial}, td(who), td(serial), td("G" + c.ca_generation),
      td(when(c.not_after), expiring ? "expiring" : ""),
      td(c.revocation_reason ? el("span", {}, `revoked (${REASON_WORDS[c.revocation_reason] || c.revocation_reason}, `,
                                      when(c.revoked_at), ")")
         : c.status === "untrusted" ? "untrusted: its CA left the trust bundle" : c.status, "status-" + c.status),
      actions));
  }
  fill(body, rows);
  if (!shown) emptyRow(body, 6, total ? "No certificate matches these filters." : "No certificates yet.");
  else if (total > certificates.length) emptyRow(body, 6, `Showing the newest ${certificates.length} of ${total}: filter by status, or search a serial.`);
}

async function revokeDialog(c, who) {
  $("#revoke-what").textContent = `Serial ${c.serial} of ${who}, from CA generation ${c.ca_generation}.`;
  $("#revoke-reason").value = "unspecified";
  if ((await dialogAnswer($("#revoke-dialog"))) !== "revoke") return null;
  const reason = $("#revoke-reason").value;
  await api("POST", `/api/v1/certificates/${c.serial}/revoke`, {reason});
  return `Revoked ${c.serial} of ${who} (${reason})`;
}

async function loadRotation() {
  const r = await api("GET", "/api/v1/rotation");
  const o = lastOverview;
  if (o) dlRows($("#rot-cas"), [["Active CA", `generation ${o.active_ca.generation}, ${o.active_ca.days_left} days left`],
    ["Previous CA (still trusted)", o.previous_ca ? `generation ${o.previous_ca.generation}` : "none"]]);
  const total = r.renewed.length + r.on_old_generation.length;
  const summary = $("#rot-summary");
  if (o && !o.previous_ca && !r.rotated_at) {   // nothing rotated yet: nothing to renew, nothing to drop
    summary.className = "";
    summary.textContent = `No rotation yet: generation ${r.generation} is the only CA.`;
  } else {
  const without = r.without_certificate.length;
  summary.className = r.complete ? "ok" : "pending";
  summary.textContent = (r.rotated_at ? `Rotated to generation ${r.generation} at ${absolute(r.rotated_at)} (${rel(r.rotated_at)}); ${r.notified} connected service(s) were notified. ` : `Active generation ${r.generation}. `)
    + `${r.renewed.length} of ${total} renewed on the new generation, ${r.on_old_generation.length} still on an older one. `
    + (r.complete ? "Every service holding a certificate renewed: proxies may drop the previous CA." : "Keep the previous CA on the proxies until every service has renewed (offline services renew when they reconnect).")
    + (without ? ` ${without} approved service(s) hold no valid certificate: they get one from the new generation when they connect.` : "");
  }
  const body = $("#rot-table tbody"), rows = [];
  for (const [items, state] of [[r.on_old_generation, "old"], [r.renewed, "renewed"], [r.without_certificate, "none"]]) {
    for (const s of items) {
      rows.push(el("tr", {class: "rot-" + state, "data-key": s.id}, td(s.name), td(s.connected ? "yes" : "no"),
        td(s.ca_generation ? `generation ${s.ca_generation}` + (state === "old" ? " (not renewed yet)" : "") : "no valid certificate")));
    }
  }
  fill(body, rows);
  if (!body.children.length) emptyRow(body, 3, "No approved services.");
}

function agentCommand(tokenText) {
  // stops at the first failure (&&): an agent never starts with a ca.crt whose hash did not match
  const host = location.host, hash = lastOverview ? lastOverview.ca_bundle_hash : "";
  return [`# needs curl, and uptrakitd installed (docs/deployment/install.md): twistd is in its venv`,
    `curl -fsSk https://${host}/api/v1/pki/ca.crt -o ca.crt && \\`,
    `echo "${hash}  ca.crt" | sha256sum -c && \\`,
    `UPTRAKIT_ENROLLMENT_TOKEN='${tokenText}' twistd --pidfile=uptrakit-agent.pid -n uptrakit-agent \\`,
    `  --controller wss://${host} --ca-cert ca.crt --state-dir ./uptrakit-agent --friendly-name "$(hostname)"`].join("\n");
}

async function loadTokens() {
  const [{tokens: enroll}, {tokens: admins}] = await Promise.all([api("GET", "/api/v1/enrollment-tokens"), api("GET", "/api/v1/admin-tokens")]);
  const now = Date.now();
  const eb = $("#enroll-table tbody"), enrollRows = [];
  for (const t of enroll.slice().reverse()) {
    const expired = t.expires_at && Date.parse(t.expires_at) < now, used = t.max_uses !== null && t.uses >= t.max_uses;
    const state = t.revoked_at ? "deleted" : expired ? "expired" : used ? "used up" : "active";
    const actions = el("td", {class: "actions"});
    if (state === "active") actions.append(actionButton("Delete", async () => {
      if (!await ask(`Delete enrollment token ${t.name}?`, "Agents that have not enrolled with it yet cannot use it any more; services it already enrolled keep working.", "Delete")) return null;
      await api("DELETE", `/api/v1/enrollment-tokens/${t.id}`); forgetShownTokens(t.id); return `Deleted enrollment token ${t.name}`; }, "action danger"));
    enrollRows.push(el("tr", {"data-key": t.id}, td(t.name), td(t.kind || "any"), td(`${t.uses} of ${t.max_uses ?? "∞"}`),
      td(t.expires_at ? when(t.expires_at) : "never"), td(t.auto_approve ? "yes" : "no"), td(state), actions));
  }
  fill(eb, enrollRows);
  if (!enroll.length) emptyRow(eb, 7, "No enrollment tokens yet: create one above to connect the first agent.");
  const ab = $("#admin-table tbody"), adminRows = [];
  for (const t of admins.slice().reverse()) {
    const mine = session && t.id === session.id;
    const actions = el("td", {class: "actions"});
    // (one word with uptrakitctl tokens admin revoke and the audit trail's admin_token.revoked)
    if (!t.revoked_at) actions.append(actionButton("Revoke", async () => {
      if (!await ask(mine ? "Revoke your own token?" : `Revoke admin token ${t.name}?`, mine ? "You are signed in with it: you will be signed out." : "Whoever uses it is refused from now on.", "Revoke")) return null;
      await api("DELETE", `/api/v1/admin-tokens/${t.id}`); forgetShownTokens(t.id); return `Revoked admin token ${t.name}`; }, "action danger"));
    adminRows.push(el("tr", {"data-key": t.id}, td(t.name + (mine ? " (you)" : "")), td(t.permissions.includes("admin") ? "admin" : "read"),
      td(when(t.created_at)), td(t.revoked_at ? "revoked" : "active"), actions));
  }
  fill(ab, adminRows);
}

const NETWORK_FIELDS = [
  {key: "trusted_proxies", label: "Trusted proxies", type: "list",
   help: "IP addresses or CIDRs of your reverse proxies, one per line. Only these may send client-certificate and X-Forwarded-For headers; from anyone else those headers are removed. Never 0.0.0.0/0."},
  {key: "real_ip_header", label: "Real client IP header",
   help: "The header in which a trusted proxy passes the client's address: X-Forwarded-For (default), or e.g. X-Real-IP."},
  {key: "forwarded_client_cert_pem_header", label: "Client certificate header",
   help: "The header that carries the client's whole certificate (URL-escaped PEM, PEM or base64 DER): X-SSL-Client-Cert for nginx, HAProxy and Caddy as the guides set them up, X-Forwarded-Tls-Client-Cert for Traefik. Empty: not used."},
  {key: "forwarded_client_cert_info_header", label: "Client certificate info header",
   help: "A header with the certificate's subject, issuer and serial instead of the certificate, e.g. X-Forwarded-Client-Cert for Envoy. Empty: not used."},
  {key: "forwarded_client_cert_info_format", label: "Info header format", type: "select", options: ["auto", "kv", "xfcc", "traefik"],
   help: "How the info header is written: auto detects it; xfcc for Envoy, traefik for Traefik's info header, kv for Subject=\"…\";Issuer=\"…\";SerialNumber=…"},
  {key: "forwarded_client_verify_header", label: "Verify result header",
   help: "A header in which the proxy reports its own check (nginx: X-SSL-Client-Verify set to $ssl_client_verify). When set, anything but SUCCESS means no identity. Empty: not used."},
  {key: "pki_addr", label: "PKI address",
   help: "Base URL written into new certificates for OCSP, the CRL and the CA certificate, e.g. http://pki.example.net:8081. A change reaches certificates only after the next CA rotation."},
];
let networkLoaded = {};

async function loadNetwork() {
  networkLoaded = await api("GET", "/api/v1/settings/network");
  const form = $("#network-form"); form.replaceChildren();
  for (const f of NETWORK_FIELDS) {
    const id = "net-" + f.key, value = networkLoaded[f.key];
    let input;
    if (f.type === "list") input = el("textarea", {id, name: f.key, rows: "3", "aria-describedby": id + "-help " + id + "-error"});
    else if (f.type === "select") input = el("select", {id, name: f.key, "aria-describedby": id + "-help " + id + "-error"},
      ...f.options.map((o) => el("option", {value: o, text: o})));
    else input = el("input", {id, name: f.key, type: "text", "aria-describedby": id + "-help " + id + "-error"});
    input.value = Array.isArray(value) ? value.join("\n") : (value ?? "");
    form.append(el("div", {class: "field"}, el("label", {for: id, text: f.label}), input,
      el("small", {id: id + "-help", class: "help", text: f.help}),
      el("span", {id: id + "-error", class: "field-error", role: "alert"})));
  }
  form.append(el("button", {type: "submit", class: "action", text: "Save network settings"}));
  applyRole();
}

function networkChanges() {
  const changes = {};
  for (const f of NETWORK_FIELDS) {
    const raw = $("#net-" + f.key).value;
    const value = f.type === "list" ? raw.split(/[\s,]+/).filter(Boolean) : raw.trim();
    const before = networkLoaded[f.key];
    if (JSON.stringify(value) !== JSON.stringify(f.type === "list" ? before : (before ?? ""))) changes[f.key] = value;
  }
  return changes;
}

async function saveNetwork(e) {
  e.preventDefault();
  for (const s of $$("#network-form .field-error")) s.textContent = "";
  say("");
  const changes = networkChanges();
  if (!Object.keys(changes).length) { say("Nothing changed."); return; }
  const everyone = (changes.trusted_proxies || []).filter((n) => /^(0\.0\.0\.0|::|0)\/0$/.test(n));
  if (everyone.length && !await ask("Trust every address?", `${everyone.join(" and ")} makes ANY client a trusted proxy: anyone who can reach the controller can claim any service's identity with a header. Only do this on an isolated lab network.`, "Trust everyone")) {
    say("Not saved."); return;
  }
  try {
    const r = await api("PUT", "/api/v1/settings/network", changes);
    say("Network settings saved." + (r.pki_addr_warning ? " Warning: " + r.pki_addr_warning : ""), !!r.pki_addr_warning);
    await loadNetwork(); await loadBanners();
  } catch (err) {
    if (err.status === 401) return;
    const slot = err.field && $("#net-" + err.field + "-error");
    if (slot) { slot.textContent = err.message; $("#net-" + err.field).focus(); say("Not saved: see the field marked below.", true); }
    else say("Not saved: " + err.message, true);
  }
}

async function loadDoctor() {
  const d = await api("GET", "/api/v1/diagnostics/identity");
  $("#doc-max").textContent = d.max_peers;
  const h = d.configured_headers;
  dlRows($("#doc-config"), [["Trusted proxies", d.trusted_proxies.join(", ") || "none"], ["Real client IP header", d.real_ip_header],
    ["Certificate header", h.forwarded_client_cert_pem_header || "not set"], ["Info header", h.forwarded_client_cert_info_header || "not set"],
    ["Verify header", h.forwarded_client_verify_header || "not set"]]);
  const advice = $("#doc-advice"); advice.replaceChildren();
  for (const p of d.peers) for (const a of p.advice) {
    const item = el("p", {class: "advice " + a.severity, "data-code": a.code, "data-peer": p.peer, text: a.text + " "});
    if (a.trust) item.append(actionButton(`Trust ${a.trust}`, async () => {   // the fix that outlives a restart
      if (!await ask(`Trust ${a.trust} as a reverse proxy?`, `Its client-certificate and ${d.real_ip_header} headers will be believed from now on, on every controller. Do this only if ${p.peer} is your proxy.`, "Trust it")) return null;
      await api("PUT", "/api/v1/settings/network", {trusted_proxies: [...d.trusted_proxies, a.trust]});
      return `${a.trust} is a trusted proxy now.`;
    }));
    advice.append(item);
  }
  if (!advice.children.length) advice.append(el("p", {class: "ok", text: d.peers.length ? "No problems seen in recent requests." : "Nothing recorded yet: no trusted proxy has sent a request, and no untrusted peer sent client-certificate headers."}));
  const body = $("#doc-table tbody"); body.replaceChildren();
  for (const p of d.peers) {
    const decisions = Object.entries(p.decisions).map(([k, v]) => `${k} ${v}`).join(", ");
    const trust = (p.trusted ? "yes" : "no") + (p.trusted === p.trusted_when_seen ? "" : ` (${p.trusted_when_seen ? "was trusted" : "was not trusted"} when last seen)`);
    body.append(el("tr", {"data-peer": p.peer}, td(p.peer, "mono"), td(trust), td(String(p.count)),
      td([...p.header_families, ...(p.configured_header_seen ? ["the configured header"] : [])].join(", ") || "none"),
      td(p.forwarded_for_present === null ? "–" : p.forwarded_for_present ? "yes" : "missing"),
      td(decisions + (p.last_rejection ? ` (last refusal: ${p.last_rejection})` : "")), td(when(p.last_seen))));
  }
  if (!d.peers.length) emptyRow(body, 7, "No peers recorded yet.");
}

// -- audit trail -------------------------------------------------------------------------------------

let auditBefore = null;
let auditHeld = false;   // older pages shown or a detail open: the poll leaves the table as it is
async function loadAudit(more = false) {
  auditHeld = more;
  await loadNames();
  const params = new URLSearchParams({limit: "50"});
  for (const [key, id] of [["action", "#audit-action"], ["actor", "#audit-actor"], ["object", "#audit-object"]]) {
    const value = $(id).value.trim();
    if (value) params.set(key, value);
  }
  if (more && auditBefore) params.set("before", String(auditBefore));
  const {entries, next_before} = await api("GET", "/api/v1/audit?" + params);
  const body = $("#audit-table tbody");
  if (!more) body.replaceChildren();
  for (const e of entries) body.append(...auditRows(e));
  auditBefore = next_before;
  $("#audit-more").hidden = !next_before;
  if (!body.children.length) emptyRow(body, 7, "No entry matches these filters.");
}

async function exportAudit() {
  // the export needs the bearer token, so it is fetched here and handed to the browser as a file
  const r = await fetch("/api/v1/audit/export", {headers: {"Authorization": "Bearer " + token}});
  if (r.status === 401) { signOut("Your token is no longer accepted: sign in again."); return; }
  if (!r.ok) throw new ApiError((await r.json().catch(() => ({}))).error || r.statusText, r.status);
  const link = el("a", {href: URL.createObjectURL(await r.blob()), download: "uptrakit-audit.jsonl"});
  document.body.append(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
  say("Export downloaded: verify it with uptrakit-audit verify.");
}

function filterBy(id, value) { $(id).value = value || ""; loadAudit().catch((e) => say(e.message, true)); }
function pollAudit() { return auditHeld ? Promise.resolve() : loadAudit(); }

function auditRows(e) {
  const a = e.actor, o = e.object;
  // (class "view": reading buttons, which a read-only session may use too)
  const actor = el("button", {type: "button", class: "link view", title: "only this actor's entries",
    text: actorText(a),
    onclick: () => filterBy("#audit-actor", a.id || a.name)});
  const shown = o.kind === "service" ? (names[o.id] || o.id) : o.id;
  const object = el("button", {type: "button", class: "link view", title: "only this object's entries",
    text: `${o.kind.replace("_", " ")} ${shown || ""}`, onclick: () => filterBy("#audit-object", o.id)});
  const detail = el("tr", {class: "audit-detail", hidden: ""}, el("td", {colspan: "7"}, el("pre", {class: "mono",
    text: JSON.stringify({details: e.details, controller: e.controller, request_id: e.request_id,
                          prev_hash: e.prev_hash, hash: e.hash}, null, 2)})));
  const toggle = el("button", {type: "button", class: "view", text: "Details", "aria-expanded": "false",
    onclick: () => {
      detail.hidden = !detail.hidden; toggle.setAttribute("aria-expanded", String(!detail.hidden));
      auditHeld = auditHeld || !detail.hidden;
    }});
  const row = el("tr", {"data-seq": String(e.seq), "data-action": e.action}, td(String(e.seq)),
    td(when(new Date(e.at * 1000).toISOString())), td(e.action), td(actor), td(object), td(e.client || "–"),
    td(toggle, "actions"));
  return [row, detail];
}

// -- detail panels: one certificate, one service --------------------------------------------------

function actorText(a) {
  const who = a.name || (a.kind === "service" ? (names[a.id] || a.id) : a.id) || a.via;
  return who ? `${a.kind.replace("_", " ")}: ${who}${a.role ? " (" + a.role + ")" : ""}` : a.kind;
}

async function detailAudit(objectId) {
  const {entries} = await api("GET", "/api/v1/audit?" + new URLSearchParams({object: objectId, limit: "100"}));
  const body = $("#detail-audit tbody"); body.replaceChildren();
  for (const e of entries) {
    body.append(el("tr", {"data-action": e.action}, td(String(e.seq)), td(when(new Date(e.at * 1000).toISOString())),
      td(e.action + (e.details && e.details.reason ? ` (${e.details.reason})` : "")), td(actorText(e.actor))));
  }
  if (!entries.length) emptyRow(body, 4, "No audit entry names it.");
}

async function openCertificate(serial) {
  await loadNames();
  const c = await api("GET", `/api/v1/certificates/${serial}`);
  $("#detail-title").textContent = "Certificate";
  const holder = c.purpose === "server" ? "this controller (server certificate)"
    : el("button", {type: "button", class: "link view", text: names[c.service_id] || c.service_id,
                    onclick: () => { $("#detail-dialog").close(); openService(c.service_id); }});
  dlRows($("#detail-facts"), [
    ["Serial", el("span", {class: "mono serial", text: c.serial})], ["Held by", holder], ["Subject", c.subject],
    ["Names", c.sans.join(", ") || "–"], ["SPIFFE ID", c.spiffe_id], ["Issuer", `CA generation ${c.ca_generation}` +
      (c.issuer_custody ? ` (its key: ${c.issuer_custody})` : "")],
    ["Valid", `${c.not_before.slice(0, 16).replace("T", " ")} to ${c.not_after.slice(0, 16).replace("T", " ")} UTC`],
    ["Status", c.status + (c.revocation_reason ? ` (${c.revocation_reason}, ${rel(c.revoked_at)})` : "")]]);
  const pem = el("a", {class: "download", href: URL.createObjectURL(new Blob([c.pem], {type: "application/x-pem-file"})),
                       download: c.serial + ".pem", text: "Download PEM"});
  $("#detail-extra").replaceChildren(pem);
  await detailAudit(c.serial);
  if (!$("#detail-dialog").open) $("#detail-dialog").showModal();
}

async function openService(id) {
  await loadNames();
  const s = await api("GET", `/api/v1/services/${id}`);
  const {certificates} = await api("GET", "/api/v1/certificates?" + new URLSearchParams({service_id: id}));
  $("#detail-title").textContent = "Service " + (names[id] || s.hostname);
  dlRows($("#detail-facts"), [
    ["Id", el("span", {class: "mono", text: s.id})], ["Kind", s.kind], ["Status", s.status], ["Host name", s.hostname],
    ["Address", s.ip_address ? s.ip_address + (s.proxy_ip ? ` via ${s.proxy_ip} (${s.identity_source})` : "") : "–"],
    ["Connected", s.connected ? "yes" + (s.controller ? ", to " + s.controller : "") : "no"],
    ["Enrolled", when(s.created_at)], ["Last seen", when(s.last_seen_at)]]);
  const rows = el("tbody");
  for (const c of certificates.slice().reverse()) {
    rows.append(el("tr", {}, td(el("button", {type: "button", class: "link view mono", text: c.serial,
                                             onclick: () => openCertificate(c.serial)})),
      td("G" + c.ca_generation), td(when(c.not_after)), td(c.status + (c.revocation_reason ? ` (${c.revocation_reason})` : ""),
                                                           "status-" + c.status)));
  }
  $("#detail-extra").replaceChildren(el("h3", {text: "Certificates"}), el("div", {class: "scroll"},
    el("table", {id: "detail-certificates"}, el("thead", {}, el("tr", {}, el("th", {text: "Serial"}),
      el("th", {text: "CA"}), el("th", {text: "Expires"}), el("th", {text: "Status"}))), rows)));
  await detailAudit(id);
  if (!$("#detail-dialog").open) $("#detail-dialog").showModal();
}

function opens(text, opener, cls = "link view") {
  return el("button", {type: "button", class: cls, text, onclick: () => opener().catch((e) => say(e.message, true))});
}

const LOADERS = {overview: loadOverview, services: loadServices, certificates: loadCertificates, rotation: loadRotation,
                 tokens: loadTokens, network: null, audit: pollAudit, doctor: loadDoctor};

async function refresh() {
  if (!token || !session) return;
  try { await loadBanners(); if (LOADERS[page]) await LOADERS[page](); }
  catch (e) { if (e.status !== 401) say(e.message, true); }
}

function forgetShownTokens(only) {
  // a token's plaintext stays on screen only until the page is left or that token is deleted
  for (const [box, text] of [["enroll-created", "enroll-token-text"], ["admin-created", "admin-token-text"]]) {
    if (only && $("#" + box).dataset.id !== only) continue;
    $("#" + box).hidden = true; $("#" + text).textContent = ""; $("#" + box).dataset.id = "";
    if (box === "enroll-created") $("#enroll-command").textContent = "";
  }
}

async function show(name) {
  if (!(name in LOADERS)) name = "overview";
  const changed = name !== page;
  if (changed) forgetShownTokens();
  page = name;
  for (const s of $$(".page")) s.hidden = s.id !== "page-" + name;
  for (const a of $$("nav a")) { if (a.dataset.page === name) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current"); }
  if (changed) say("");
  try { if (name === "network") await loadNetwork(); } catch (e) { if (e.status !== 401) say(e.message, true); }
  await refresh();
}

// -- session --------------------------------------------------------------------------------------

function signOut(why, isError = true) {
  sessionStorage.removeItem("uptrakit-token"); token = null; session = null;
  clearInterval(pollTimer); pollTimer = null;
  $("#token").value = "";
  $("#app").hidden = true; $("#session").hidden = true; $("#login").hidden = false;
  $("#login-error").textContent = why || "";
  $("#login-error").className = isError ? "error" : "note";   // "Signed out." is no error
  forgetShownTokens();
}

async function signIn() {
  try { session = await api("GET", "/api/v1/session"); }
  catch (e) { signOut(e.status === 401 ? "This token is not accepted." : e.message); return; }
  sessionStorage.setItem("uptrakit-token", token);
  $("#token").value = "";
  $("#login").hidden = true; $("#app").hidden = false; $("#session").hidden = false; $("#login-error").textContent = "";
  $("#who").textContent = `${session.name} · ${session.role}`;
  applyRole();
  pollTimer = setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
  await show((location.hash || "#overview").slice(1));
}

// -- wiring ---------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (e) => { e.preventDefault(); token = $("#token").value.trim(); signIn(); });
  $("#app").addEventListener("click", (e) => {
    const locked = e.target.closest && e.target.closest('button[aria-disabled="true"]');
    if (locked) { e.preventDefault(); e.stopImmediatePropagation(); say(READONLY_TIP + ".", true); }
  }, true);
  $("#logout").addEventListener("click", () => signOut("Signed out.", false));
  window.addEventListener("hashchange", () => { if (session) show(location.hash.slice(1)); });
  for (const id of ["#svc-status", "#svc-connected", "#svc-search"]) $(id).addEventListener("input", () => loadServices().catch(() => {}));
  for (const id of ["#cert-status", "#cert-search"]) $(id).addEventListener("input", () => loadCertificates().catch(() => {}));
  for (const id of ["#audit-action", "#audit-actor", "#audit-object"]) $(id).addEventListener("input", () => loadAudit().catch(() => {}));
  $("#audit-more").addEventListener("click", () => loadAudit(true).catch((e) => say(e.message, true)));
  $("#audit-export").addEventListener("click", () => exportAudit().catch((e) => say("Export failed: " + e.message, true)));
  $("#rotate").addEventListener("click", async () => {
    const o = lastOverview, leaving = $("#rotate-leaving");
    leaving.hidden = !(o && o.previous_ca);
    if (o && o.previous_ca) {   // the bundle keeps two generations: the previous one leaves it now
      const r = await api("GET", "/api/v1/rotation").catch(() => null);
      const stuck = r ? r.on_old_generation.filter((s) => s.ca_generation === o.previous_ca.generation).length : 0;
      leaving.textContent = `Generation ${o.previous_ca.generation} leaves the trust bundle with this rotation: certificates it issued stop working.`
        + (stuck ? ` ${stuck} service(s) still hold one and will be refused until they enroll again.` : " No service holds one now.");
    }
    if ((await dialogAnswer($("#rotate-dialog"))) !== "rotate") return;
    try { const r = await api("POST", "/api/v1/settings/rotate-ca");
          say(`Rotated: generation ${r.generation} is active; ${r.notified} connected service(s) asked to renew.`); await refresh(); }
    catch (e) { if (e.status !== 401) say("Rotation failed: " + e.message, true); }
  });
  $("#enroll-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = e.target, body = {name: f.name.value.trim(), auto_approve: f.auto_approve.checked};
    if (f.kind.value) body.kind = f.kind.value;
    body.max_uses = f.max_uses.value ? Number(f.max_uses.value) : null;
    body.expires_in_seconds = f.expires_hours.value ? Math.round(Number(f.expires_hours.value) * 3600) : null;
    try {
      const t = await api("POST", "/api/v1/enrollment-tokens", body);
      $("#enroll-token-text").textContent = t.token; $("#enroll-command").textContent = agentCommand(t.token);
      $("#enroll-created").hidden = false; $("#enroll-created").dataset.id = t.id; say(`Created enrollment token ${t.name}.`); f.reset(); await loadTokens();
    } catch (err) { if (err.status !== 401) say("Not created: " + err.message, true); }
  });
  $("#admin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const f = e.target;
    try {
      const t = await api("POST", "/api/v1/admin-tokens", {name: f.name.value.trim(), permissions: [f.role.value]});
      $("#admin-token-text").textContent = t.token; $("#admin-created").hidden = false; $("#admin-created").dataset.id = t.id;
      say(`Created ${f.role.value} token ${t.name}.`); f.reset(); await loadTokens();
    } catch (err) { if (err.status !== 401) say("Not created: " + err.message, true); }
  });
  for (const b of $$("button.copy")) b.addEventListener("click", async () => {
    const text = $("#" + b.dataset.copy).textContent;
    try { await navigator.clipboard.writeText(text); b.textContent = "Copied"; }
    catch (e) { getSelection().selectAllChildren($("#" + b.dataset.copy)); b.textContent = "Selected: copy it (Ctrl+C, or Copy on a phone)"; }
    setTimeout(() => { b.textContent = "Copy"; }, 2000);
  });
  $("#network-form").addEventListener("submit", saveNetwork);
  if (token) signIn();
});
