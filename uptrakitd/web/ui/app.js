"use strict";
// The admin UI: a thin client of the JSON API; the token stays in this tab's sessionStorage.
const $ = (s) => document.querySelector(s);
let token = sessionStorage.getItem("uptrakit-token");

async function api(method, path, body) {
  const r = await fetch(path, {method, headers: {"Authorization": "Bearer " + token,
    "Content-Type": "application/json"}, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) { signOut(); throw new Error("token not accepted"); }
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function cell(text) { const td = document.createElement("td"); td.textContent = text ?? "–"; return td; }
function say(text, isError) { const m = $("#message"); m.textContent = text; m.className = isError ? "error" : ""; }

async function loadServices() {
  const {services} = await api("GET", "/api/v1/services");
  const body = $("#services tbody"); body.replaceChildren();
  for (const s of services) {
    const tr = document.createElement("tr");
    tr.append(cell((s.friendly_name || s.hostname) + " (" + s.id.slice(0, 8) + ")"), cell(s.kind), cell(s.status),
      cell(s.connected ? "yes" : "no"), cell(s.ip_address), cell(s.identity_source),
      cell(s.certificate ? s.certificate.serial.slice(0, 12) + "… G" + s.certificate.ca_generation : null));
    const actions = document.createElement("td");
    if (s.status === "pending") {
      actions.append(button("Approve", () => api("POST", `/api/v1/services/${s.id}/approve`)),
                     button("Reject", () => api("POST", `/api/v1/services/${s.id}/reject`)));
    } else if (s.status !== "deactivated") {
      actions.append(button("Deactivate", () => confirm("Deactivate and revoke?") &&
                            api("DELETE", `/api/v1/services/${s.id}`)));
    }
    tr.append(actions); body.append(tr);
  }
}

async function loadCertificates() {
  const {certificates} = await api("GET", "/api/v1/certificates");
  const body = $("#certificates tbody"); body.replaceChildren();
  for (const c of certificates.reverse()) {
    const tr = document.createElement("tr");
    tr.append(cell(c.serial), cell(c.service_id || "(server)"), cell("G" + c.ca_generation), cell(c.not_after),
              cell(c.status + (c.revocation_reason ? " (" + c.revocation_reason + ")" : "")));
    const actions = document.createElement("td");
    if (c.status === "valid") actions.append(button("Revoke", () => confirm("Revoke " + c.serial + "?") &&
        api("POST", `/api/v1/certificates/${c.serial}/revoke`, {reason: "keyCompromise"})));
    tr.append(actions); body.append(tr);
  }
}

async function loadPki() {
  const p = await api("GET", "/api/v1/settings/pki");
  const dl = $("#pki-status"); dl.replaceChildren();
  const row = (k, v) => { const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v ?? "–"; dl.append(dt, dd); };
  for (const [label, ca] of [["Active CA", p.active_ca], ["Previous CA", p.previous_ca]]) {
    row(label, ca ? `G${ca.generation} ${ca.cn}, until ${ca.not_after}, CRL #${ca.crl_number} (${ca.crl_entries} entries)` : null);
  }
  row("CA bundle hash", p.ca_bundle_hash);
  row("Service certificates", `${p.service_certificates.lifetime_hours} h, renew ${p.service_certificates.renewal_window_hours} h before expiry`);
  row("PKI address", p.pki_addr);
  row("uptrakitd version", p.version);
}

async function loadNetwork() {
  const n = await api("GET", "/api/v1/settings/network");
  const form = $("#network-form"); form.replaceChildren();
  for (const [key, value] of Object.entries(n)) {
    const label = document.createElement("label"); label.textContent = key + " ";
    const input = document.createElement("input"); input.type = "text"; input.name = key;
    input.value = Array.isArray(value) ? value.join(", ") : (value ?? "");
    label.append(input); form.append(label);
  }
  const save = document.createElement("button"); save.type = "submit"; save.textContent = "Save"; form.append(save);
}

function button(text, action) {
  const b = document.createElement("button"); b.textContent = text;
  b.onclick = async () => { try { const r = await action(); if (r) say(text + ": done"); await refresh(); }
                            catch (e) { say(text + ": " + e.message, true); } };
  return b;
}

async function refresh() {
  try { await Promise.all([loadServices(), loadCertificates(), loadPki(), loadNetwork()]); }
  catch (e) { say(e.message, true); }
}

function show(tab) {
  for (const s of document.querySelectorAll(".tab")) s.hidden = s.id !== tab;
}

function signOut() { sessionStorage.removeItem("uptrakit-token"); token = null; $("#app").hidden = true; $("#login").hidden = false; }

async function signIn() {
  try { await api("GET", "/api/v1/settings/pki"); } catch (e) { $("#login-error").textContent = e.message; return; }
  sessionStorage.setItem("uptrakit-token", token);
  $("#login").hidden = true; $("#app").hidden = false; refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").onsubmit = (e) => { e.preventDefault(); token = $("#token").value.trim(); signIn(); };
  $("#logout").onclick = signOut;
  for (const b of document.querySelectorAll("nav [data-tab]")) b.onclick = () => show(b.dataset.tab);
  $("#rotate").onclick = async () => {
    if (!confirm("Rotate the CA? Every connected service will renew its certificate.")) return;
    try { const r = await api("POST", "/api/v1/settings/rotate-ca");
          say(`Rotated: generation ${r.generation}, ${r.notified} services notified`); await refresh(); }
    catch (e) { say("Rotation failed: " + e.message, true); }
  };
  $("#network-form").onsubmit = async (e) => {
    e.preventDefault();
    const body = {};
    for (const input of e.target.querySelectorAll("input")) {
      body[input.name] = input.name === "trusted_proxies"
        ? input.value.split(",").map((x) => x.trim()).filter(Boolean) : input.value.trim();
    }
    if (!body.real_ip_header) delete body.real_ip_header;
    if (!body.forwarded_client_cert_info_format) delete body.forwarded_client_cert_info_format;
    try { const r = await api("PUT", "/api/v1/settings/network", body);
          say(r.pki_addr_warning || "Network settings saved"); await refresh(); }
    catch (err) { say(err.message, true); }
  };
  if (token) signIn();
});
