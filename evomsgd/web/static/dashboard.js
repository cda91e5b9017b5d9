// evomsgd dashboard: a client of the JSON API like any other (GET /health, /tasks, /stats/hourly,
// /callbacks; POST /tasks/{id}/retry, /callbacks/endpoints/{name}/enable; DELETE /tasks/{id}). Everything is rendered with textContent, never
// innerHTML: phone numbers and error texts come from clients and from Evolution.
"use strict";

(function () {
  const REFRESH_MS = 5000;
  const PAGE_SIZE = 25;
  const TOKEN_KEY = "evomsgd_token";
  const STATUSES = ["PENDING", "SCHEDULED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "CANCELED", "EXPIRED"];
  const RETRYABLE = new Set(["FAILURE", "EXPIRED", "CANCELED"]);
  const CANCELABLE = new Set(["PENDING", "SCHEDULED", "RETRY"]);
  const ATTENTION = "FAILURE,EXPIRED,RETRY";
  const SHORT_ID = 8; // hex digits of a task id's random tail shown in the Task column
  const TASK_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const SVG = "http://www.w3.org/2000/svg";
  const COLUMNS = 9; // of the task tables
  // The funnel of each hour, as GET /stats/hourly counts it: messages Evolution accepted in that
  // hour, and how many of them WhatsApp has since delivered, had read, or reported failed.
  const FUNNEL = [
    ["sent", "sent"],
    ["delivered", "delivered"],
    ["read", "read"],
    ["failed", "delivery failed"],
  ];
  // The time each delivery state was reached, in the task's delivery object.
  const DELIVERY_AT = {
    accepted: "accepted_at",
    server_ack: "server_ack_at",
    delivered: "delivered_at",
    read: "read_at",
    played: "played_at",
    failed: "failed_at",
    unconfirmed: "unconfirmed_at",
  };

  const state = {
    paused: false,
    running: null, // the refresh in progress, if any
    again: false, // refresh once more when it ends (an action happened meanwhile)
    filter: { q: "", status: "", instance: "" },
    cursor: null, // ?before= of the page shown; null = newest
    older: null, // next_before of the page shown
    previous: [], // cursors of newer pages, for "Newer"
    expanded: new Set(), // "list task-id": rows whose history is open, per table
    details: new Map(), // task id -> TaskView with history
    callbacks: new Map(), // task id -> its callbacks (GET /callbacks?task_id=)
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child instanceof Node ? child : String(child));
    return node;
  }

  // -- talking to the API -------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function storedToken() {
    try {
      return window.localStorage.getItem(TOKEN_KEY);
    } catch (err) {
      return null; // storage disabled: the API works without a token until tokens are required
    }
  }

  async function api(method, path, okStatuses) {
    const headers = { Accept: "application/json" };
    if (method !== "GET") headers["Content-Type"] = "application/json";
    const token = storedToken();
    if (token) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(path, { method, headers, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, "unreachable", "evomsgd does not answer - is the daemon running?");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (response.ok || (okStatuses || []).includes(response.status)) return body;
    $("auth").hidden = !(response.status === 401 || response.status === 403);
    const error = body && body.error;
    throw new ApiError(
      response.status,
      error ? error.code : "http_" + response.status,
      error ? error.message : response.status + " " + response.statusText,
    );
  }

  // -- formatting ---------------------------------------------------------------------------

  const number = new Intl.NumberFormat();

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  function ago(iso) {
    if (!iso) return "";
    const seconds = (Date.now() - Date.parse(iso)) / 1000;
    if (seconds < -1) return "in " + duration(-seconds);
    return seconds < 5 ? "just now" : duration(seconds) + " ago";
  }

  // One coarse unit, as `evomsgd status` says it: "40 s", "12 min", "3 h", "2 days".
  function roughly(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return Math.floor(s / 3600) + " h";
    const days = Math.floor(s / 86400);
    return days + (days === 1 ? " day" : " days");
  }

  function roughlyAgo(iso) {
    return roughly((Date.now() - Date.parse(iso)) / 1000) + " ago";
  }

  function localTime(iso) {
    return iso ? new Date(iso).toLocaleString() : "";
  }

  function when(iso) {
    return el("time", { datetime: iso, title: localTime(iso) }, ago(iso));
  }

  // Task ids are UUIDv7: the first 12 hex digits are the creation time in milliseconds, so the
  // ids of messages sent together share their start. Their tail is random and tells them apart.
  function shortId(id) {
    return "…" + id.slice(-SHORT_ID);
  }

  function taskIdCell(id) {
    const copy = el(
      "button",
      { type: "button", class: "btn-icon", "data-action": "copy", "data-copy": id, title: "Copy the whole task id", "aria-label": "Copy task id " + id },
      copyIcon(),
    );
    copy.addEventListener("click", () => copyText(id));
    return el("td", { class: "mono task-id", title: id }, el("span", { class: "short-id" }, shortId(id)), copy);
  }

  function copyIcon() {
    return svg(
      "svg",
      { viewBox: "0 0 16 16", width: 13, height: 13, "aria-hidden": "true" },
      svg("rect", { x: 5.5, y: 5.5, width: 8, height: 8, rx: 1.5 }),
      svg("path", { d: "M10.5 3.5v-1a1 1 0 0 0-1-1h-6a1 1 0 0 0-1 1v6a1 1 0 0 0 1 1h1" }),
    );
  }

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      toast("Copied " + text);
      return;
    } catch (err) {
      // No navigator.clipboard outside a secure context (http:// to another machine), or the
      // browser refused: select the text in the toast (which the refresh does not redraw).
    }
    const code = el("code", { class: "mono", "data-copy-fallback": "" }, text);
    toast([code, " is selected: press Ctrl+C (⌘C) to copy it"], false, 15000);
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function displayPhone(phone) {
    return /^[0-9]+$/.test(phone) ? "+" + phone : phone; // E.164 digits; a JID stays as it is
  }

  function pill(word, kind) {
    return el("span", { class: "pill pill-" + (kind || word).toLowerCase() }, word);
  }

  function outcomeText(task) {
    switch (task.status) {
      case "SUCCESS":
        return "sent " + ago(task.finished_at) + (task.sandbox ? " (sandbox)" : "");
      case "SCHEDULED":
        return "scheduled for " + localTime(task.send_at);
      case "PENDING":
        return task.last_error ? "queued again; last error: " + task.last_error : "queued";
      case "STARTED":
        return "sending now";
      case "RETRY":
        return (task.last_error || "retrying") + " - next try " + ago(task.next_attempt_at);
      case "CANCELED":
        return "canceled " + ago(task.finished_at);
      default:
        return task.last_error || task.status.toLowerCase();
    }
  }

  // What WhatsApp did with a sent message: its delivery state, the time it got there on hover;
  // "no receipts" where its instance sends none; nothing before a send (or in sandbox mode).
  function deliveryCell(delivery) {
    if (!delivery) return el("td", { class: "delivery" });
    if (delivery.note) {
      return el("td", { class: "delivery", "data-delivery": "no_receipts", title: delivery.note }, el("span", { class: "muted" }, "no receipts"));
    }
    const at = delivery[DELIVERY_AT[delivery.state]];
    const title = [delivery.state.replace("_", " ") + (at ? " " + localTime(at) : ""), delivery.error].filter(Boolean).join("\n");
    return el(
      "td",
      { class: "delivery", "data-delivery": delivery.state, title },
      pill(delivery.state.replace("_", " "), "delivery-" + delivery.state),
    );
  }

  // -- rendering ----------------------------------------------------------------------------

  function renderHealth(health) {
    $("version").textContent = "v" + health.version;
    $("sandbox").hidden = !health.sandbox;
    const status = $("health");
    status.className = "pill pill-" + health.status;
    status.textContent = health.status === "ok" ? "healthy" : health.status;
    const facts = [
      ["Evolution", health.sandbox ? "sandbox: nothing is sent" : health.evolution_url],
      ["Workers", health.workers_alive + " of " + health.workers_configured + " alive"],
      ["Ledger", health.database_writable ? "writable" : "NOT writable", health.data_dir],
      ["Uptime", duration(health.uptime_seconds) + (health.draining ? " · draining" : "")],
    ];
    $("daemon").replaceChildren(
      ...facts.flatMap(([key, value, title]) => [el("dt", {}, key), el("dd", { title: title }, value)]),
    );

    const problems = $("problems");
    problems.replaceChildren(...health.problems.map((text) => el("li", {}, text)));
    problems.hidden = health.problems.length === 0;

    const cards = STATUSES.map((name) =>
      el(
        "a",
        { class: "card card-" + name.toLowerCase(), href: "#", "data-status": name, title: "Show " + name + " messages" },
        el("span", { class: "card-label" }, name),
        el("span", { class: "card-value" }, number.format(health.counts[name] || 0)),
      ),
    );
    const oldest = health.oldest_waiting_seconds;
    cards.push(
      el(
        "div",
        { class: "card card-oldest" + (oldest && oldest > 300 ? " card-alert" : "") },
        el("span", { class: "card-label" }, "Oldest due"),
        el("span", { class: "card-value" }, oldest === null ? "–" : duration(oldest)),
      ),
    );
    $("counts").replaceChildren(...cards);

    const lanes = health.instances;
    $("lanes").replaceChildren(
      ...(lanes.length
        ? lanes.flatMap((lane) => [
            el(
              "tr",
              { "data-instance": lane.instance },
              el("td", { class: "strong" }, lane.instance),
              el("td", { title: lane.paused_reason || "" }, pill(lane.state)),
              el("td", { class: "num" }, number.format(lane.waiting)),
              el("td", { class: "num" }, number.format(lane.in_flight)),
              laneTrouble(lane),
            ),
            laneBudgets(lane),
          ].filter(Boolean))
        : [el("tr", {}, el("td", { colspan: 5, class: "empty" }, "No instance has queued a message yet."))]),
    );

    const select = $("instance");
    const known = new Set(Array.from(select.options, (option) => option.value));
    for (const lane of lanes) {
      if (!known.has(lane.instance)) select.append(el("option", { value: lane.instance }, lane.instance));
    }
  }

  // What stops a lane now, prominently; otherwise its last error as history, in the past tense
  // and muted, so an outage that is over does not read as a current fault.
  function laneTrouble(lane) {
    if (lane.problem) return el("td", { class: "lane-problem", title: lane.problem }, lane.problem);
    if (!lane.last_error) return el("td", {}, el("span", { class: "muted" }, "none"));
    let text = "last error" + (lane.last_error_at ? " " + roughlyAgo(lane.last_error_at) : "");
    let title = lane.last_error + (lane.last_error_at ? "\n" + localTime(lane.last_error_at) : "");
    if (lane.recovered_at) {
      text += ", recovered " + roughlyAgo(lane.recovered_at);
      title += "\nrecovered " + localTime(lane.recovered_at);
    }
    return el("td", { class: "lane-history muted", title }, text);
  }

  // What keeps the number alive, per lane, in a row under it: today's sends against the cap, the
  // warm-up day, new contacts against their budget, and when quiet hours end for the messages
  // they hold. None for a lane without any of them.
  function laneBudgets(lane) {
    const lines = [];
    if (lane.daily_cap !== null && lane.daily_cap !== undefined) {
      let text = "sent " + number.format(lane.sent_today || 0) + " of " + number.format(lane.daily_cap);
      if (lane.warmup_day) text += " · warm-up day " + lane.warmup_day + " of " + lane.warmup_days;
      lines.push(budgetLine("budget-sends", text, lane.sent_today || 0, lane.daily_cap));
    }
    if (lane.new_contacts_per_day) {
      const text = "new contacts " + number.format(lane.new_contacts_today || 0) + " of " + number.format(lane.new_contacts_per_day);
      lines.push(budgetLine("budget-contacts", text, lane.new_contacts_today || 0, lane.new_contacts_per_day));
    }
    if (lane.quiet_hours) lines.push(quietLine(lane));
    if (!lines.length) return null;
    return el("tr", { class: "lane-budgets-row", "data-budgets": lane.instance }, el("td", { colspan: 5 }, el("div", { class: "lane-budgets" }, ...lines)));
  }

  function budgetLine(kind, text, used, cap) {
    const full = used >= cap;
    return el(
      "div",
      { class: "budget " + kind + (full ? " budget-full" : "") },
      el("meter", { min: 0, max: cap, value: Math.min(used, cap), "aria-label": text }),
      el("span", {}, text + (full ? " (used up)" : "")),
    );
  }

  function quietLine(lane) {
    const ends = lane.quiet_ends || [];
    let title = "Normal-priority messages wait while it is " + lane.quiet_hours + " where their recipient lives";
    let held = null;
    if (ends.length) {
      const first = ends[0];
      let text = "· " + number.format(lane.quiet_held) + " held until " + zoneTime(first.until, first.zone) + " " + first.zone;
      if (ends.length > 1) text += " (+" + (ends.length - 1) + " zones)";
      held = el("span", { class: "quiet-held" }, text);
      title += "\n" + ends.map((end) => end.held + " until " + zoneTime(end.until, end.zone) + " in " + end.zone + " (" + localTime(end.until) + " here)").join("\n");
    }
    return el("div", { class: "budget budget-quiet", title }, el("span", {}, "quiet hours " + lane.quiet_hours), held);
  }

  // A time as the clocks read it in an IANA zone: "08:00" in America/Mexico_City.
  function zoneTime(iso, zone) {
    try {
      return new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23", timeZone: zone }).format(new Date(iso));
    } catch (_) {
      return localTime(iso); // a zone this browser does not know
    }
  }

  function renderChart(stats) {
    const buckets = stats.buckets;
    const width = 720;
    const height = 210;
    const left = 40;
    const right = 8;
    const top = 12;
    const bottom = 26;
    const plotW = width - left - right;
    const plotH = height - top - bottom;
    const funnel = (b) => b.funnel || { sent: 0, delivered: 0, read: 0, failed: 0 };
    const highest = Math.max(...buckets.map((b) => Math.max(...FUNNEL.map(([key]) => funnel(b)[key]))), 0);
    const scale = niceCeiling(highest);
    const slot = plotW / buckets.length;
    const groupW = Math.max(4, slot - 4);
    const barW = groupW / FUNNEL.length;
    const chart = svg("svg", {
      viewBox: "0 0 " + width + " " + height,
      role: "img",
      "aria-label": "Messages sent per hour, and how many of them were delivered, read, or failed, last 24 hours",
    });
    for (let i = 0; i <= 4; i++) {
      const y = top + plotH - (plotH * i) / 4;
      chart.append(svg("line", { x1: left, x2: width - right, y1: y, y2: y, class: i ? "grid" : "axis" }));
      chart.append(svg("text", { x: left - 6, y: y + 4, class: "tick tick-y" }, number.format((scale * i) / 4)));
    }
    buckets.forEach((bucket, i) => {
      const x = left + i * slot + (slot - groupW) / 2;
      const counts = funnel(bucket);
      const start = new Date(bucket.start);
      const end = new Date(start.getTime() + stats.bucket_seconds * 1000);
      const label =
        start.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) +
        "–" +
        end.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) +
        ": " + FUNNEL.map(([key, words]) => counts[key] + " " + words).join(", ") +
        " (" + bucket.failed + " failed attempts)";
      const group = svg("g", { class: "bar", "data-start": bucket.start }, svg("title", {}, label));
      group.append(svg("rect", { x: x - 1, y: top, width: groupW + 2, height: plotH, class: "hover" }));
      FUNNEL.forEach(([key], step) => {
        if (!counts[key]) return;
        const h = (counts[key] / scale) * plotH;
        group.append(svg("rect", { x: x + step * barW, y: top + plotH - h, width: barW, height: h, class: key, "data-count": counts[key] }));
      });
      chart.append(group);
      const fromEnd = buckets.length - i;
      if (fromEnd % 6 === 0 || i === buckets.length - 1) {
        const text = i === buckets.length - 1 ? "last hour" : "-" + fromEnd + "h";
        chart.append(svg("text", { x: x + groupW / 2, y: height - 8, class: "tick tick-x" }, text));
      }
    });
    $("chart").replaceChildren(chart);

    const add = (sum, b) => {
      const counts = funnel(b);
      const out = { attempts: sum.attempts + b.failed };
      for (const [key] of FUNNEL) out[key] = sum[key] + counts[key];
      return out;
    };
    const zero = { attempts: 0, sent: 0, delivered: 0, read: 0, failed: 0 };
    const last = add(zero, buckets[buckets.length - 1] || { failed: 0 });
    const day = buckets.reduce(add, zero);
    const words = (part) =>
      number.format(part.sent) + " sent, " + number.format(part.delivered) + " delivered, " +
      number.format(part.read) + " read, " + number.format(part.failed) + " failed";
    const rate = (part) => (part.sent ? " (" + Math.round((100 * part.delivered) / part.sent) + "% delivered)" : "");
    $("chart-summary").replaceChildren(
      el("strong", {}, "Last hour: "),
      words(last) + rate(last),
      el("span", { class: "muted" }, " · 24 h: " + words(day) + rate(day) + " · " + number.format(day.attempts) + " failed attempts"),
    );
  }

  function niceCeiling(value) {
    if (value <= 4) return 4;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * magnitude >= value) return Math.ceil((step * magnitude) / 4) * 4;
    }
    return value;
  }

  function renderTasks(tbody, tasks, emptyText) {
    const rows = [];
    for (const task of tasks) {
      rows.push(taskRow(task, tbody.id));
      if (isOpen(tbody.id, task.task_id)) rows.push(detailRow(task.task_id));
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: COLUMNS, class: "empty" }, emptyText)));
    tbody.replaceChildren(...rows);
  }

  function isOpen(list, taskId) {
    return state.expanded.has(list + " " + taskId);
  }

  function taskRow(task, list) {
    const open = isOpen(list, task.task_id);
    const row = el(
      "tr",
      { class: "task" + (open ? " open" : ""), "data-task-id": task.task_id, "data-status": task.status, tabindex: 0, "aria-expanded": open },
      el("td", {}, pill(task.status)),
      taskIdCell(task.task_id),
      el("td", {}, task.instance),
      el("td", { class: "mono", title: "as received: " + task.phone_input }, displayPhone(task.phone)),
      el("td", { class: "num" }, task.attempts),
      el("td", {}, when(task.created_at)),
      deliveryCell(task.delivery),
      el("td", { class: "result" + (task.last_error && task.status !== "SUCCESS" ? " error-text" : ""), title: outcomeText(task) }, outcomeText(task)),
      el("td", { class: "actions" }, ...actionButtons(task)),
    );
    row.addEventListener("click", (event) => {
      if (!event.target.closest("button")) toggle(list, task.task_id);
    });
    row.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && event.target === row) toggle(list, task.task_id);
    });
    return row;
  }

  function actionButtons(task) {
    const buttons = [];
    if (RETRYABLE.has(task.status)) {
      buttons.push(el("button", { type: "button", class: "btn btn-small btn-primary", "data-action": "retry", onclick: () => retry(task) }, "Retry"));
    }
    if (CANCELABLE.has(task.status)) {
      const cancel = el("button", { type: "button", class: "btn btn-small btn-danger", "data-action": "cancel" }, "Cancel");
      cancel.addEventListener("click", () => confirmThen(cancel, () => cancelTask(task)));
      buttons.push(cancel);
    }
    return buttons;
  }

  // A second click within a few seconds confirms: no modal dialog to block the page.
  function confirmThen(button, action) {
    if (button.dataset.armed) {
      action(button);
      return;
    }
    button.dataset.armed = "1";
    button.textContent = "Confirm cancel";
    setTimeout(() => {
      delete button.dataset.armed;
      button.textContent = "Cancel";
    }, 4000);
  }

  function detailRow(taskId) {
    const task = state.details.get(taskId);
    const cell = el("td", { colspan: COLUMNS });
    if (!task) {
      cell.append(el("span", { class: "muted" }, "Loading history…"));
    } else {
      const facts = [
        ["Task id", task.task_id],
        ["Phone as sent", task.phone_input],
        ["Priority", task.priority],
        ["Created", localTime(task.created_at)],
        ["Send at", localTime(task.send_at)],
        ["Expires", localTime(task.expires_at)],
        ["Finished", localTime(task.finished_at)],
        ["Evolution key", task.result && task.result.evolution_key],
      ].filter(([, value]) => value);
      cell.append(el("dl", { class: "facts" }, ...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
      if (task.media) cell.append(mediaBlock(task));
      cell.append(
        el(
          "ol",
          { class: "history" },
          ...task.history.map((entry) =>
            el(
              "li",
              { class: "history-" + (entry.outcome || entry.event) },
              el("time", { datetime: entry.at, title: entry.at }, localTime(entry.at)),
              el("span", { class: "strong" }, entry.event + (entry.attempt ? " #" + entry.attempt : "")),
              entry.outcome ? pill(entry.outcome, outcomeKind(entry.outcome)) : "",
              entry.http_status ? el("span", { class: "muted" }, "HTTP " + entry.http_status) : "",
              entry.detail ? el("span", { class: "history-detail" }, entry.detail) : "",
            ),
          ),
        ),
      );
      if (!task.history.length) cell.append(el("p", { class: "muted" }, "No attempt yet."));
      const callbacks = state.callbacks.get(taskId) || [];
      if (callbacks.length) cell.append(callbackList(callbacks));
    }
    return el("tr", { class: "details", "data-details-for": taskId }, cell);
  }

  // -- media (issue 16) ----------------------------------------------------------------------

  // A stored file is fetched with the token like every call and shown from memory: an <img src>
  // to the route could not send the Authorization header, and nothing is hot-linked.
  const mediaUrls = new Map(); // task id -> Promise of a blob: URL of its stored file

  function mediaUrl(task) {
    if (!mediaUrls.has(task.task_id)) {
      const loading = fetchMedia(task.media.download).then((blob) => URL.createObjectURL(blob));
      loading.catch(() => mediaUrls.delete(task.task_id)); // tried again next time
      mediaUrls.set(task.task_id, loading);
    }
    return mediaUrls.get(task.task_id);
  }

  async function fetchMedia(path) {
    const headers = {};
    const token = storedToken();
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, { headers, cache: "no-store" });
    if (!response.ok) throw new ApiError(response.status, "http_" + response.status, "the media file could not be loaded (HTTP " + response.status + ")");
    return response.blob();
  }

  function fileSize(bytes) {
    if (bytes < 1024) return number.format(bytes) + " bytes";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KB";
    return (bytes / (1024 * 1024)).toFixed(1) + " MB";
  }

  function mediaBlock(task) {
    const media = task.media;
    const facts = [media.type, media.filename, media.size !== null ? fileSize(media.size) : media.url].filter(Boolean);
    const block = el("div", { class: "media", "data-media-type": media.type }, el("span", { class: "media-facts" }, facts.join(" · ")));
    if (media.download) {
      if (media.type === "image") {
        const thumb = el("img", { class: "media-thumb", alt: "Image sent with task " + shortId(task.task_id) });
        mediaUrl(task).then(
          (url) => thumb.setAttribute("src", url),
          () => thumb.replaceWith(el("span", { class: "muted" }, "thumbnail unavailable")),
        );
        block.prepend(thumb);
      }
      block.append(el("button", { type: "button", class: "btn btn-small", "data-action": "download", onclick: () => download(task) }, "Download"));
    }
    return block;
  }

  async function download(task) {
    try {
      const link = el("a", { href: await mediaUrl(task), download: task.media.filename || "file", hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
    } catch (err) {
      toast(err.message, true);
    }
  }

  function outcomeKind(outcome) {
    return outcome === "sent" || outcome === "sent_unconfirmed" ? "success" : "failure";
  }

  async function toggle(list, taskId) {
    const key = list + " " + taskId;
    if (state.expanded.has(key)) state.expanded.delete(key);
    else state.expanded.add(key);
    if (!openTaskIds().has(taskId)) state.details.delete(taskId);
    rerenderDetails(taskId);
    if (state.expanded.has(key)) await loadDetails(taskId);
  }

  function openTaskIds() {
    return new Set(Array.from(state.expanded, (key) => key.split(" ")[1]));
  }

  async function loadDetails(taskId) {
    try {
      state.details.set(taskId, await api("GET", "/tasks/" + encodeURIComponent(taskId)));
      const page = await api("GET", "/callbacks?task_id=" + encodeURIComponent(taskId));
      state.callbacks.set(taskId, page.callbacks.slice().reverse()); // oldest first, as history
    } catch (err) {
      for (const key of state.expanded) if (key.endsWith(" " + taskId)) state.expanded.delete(key);
      toast(err.message, true);
    }
    rerenderDetails(taskId);
  }

  // The same task may show in both tables: update its rows in place.
  function rerenderDetails(taskId) {
    for (const row of document.querySelectorAll('tr.task[data-task-id="' + CSS.escape(taskId) + '"]')) {
      const old = row.nextElementSibling;
      if (old && old.classList.contains("details")) old.remove();
      const open = isOpen(row.parentElement.id, taskId);
      row.classList.toggle("open", open);
      row.setAttribute("aria-expanded", String(open));
      if (open) row.after(detailRow(taskId));
    }
  }

  // -- callbacks ----------------------------------------------------------------------------

  const CALLBACK_KIND = { sent: "success", pending: "pending", failed: "failure" };

  // A message's callbacks under its history: each event, its state, tries and the last answer.
  function callbackList(callbacks) {
    return el(
      "div",
      { class: "callbacks" },
      el("h4", {}, "Callbacks"),
      el(
        "ol",
        { class: "history callback-list" },
        ...callbacks.map((cb) =>
          el(
            "li",
            { "data-callback-id": String(cb.id), "data-state": cb.state },
            el("span", { class: "strong" }, cb.type),
            pill(cb.state, CALLBACK_KIND[cb.state]),
            el("span", { class: "muted" }, cb.attempts + (cb.attempts === 1 ? " try" : " tries") + " to " + (cb.endpoint || "relay")),
            cb.last_status ? el("span", { class: "muted" }, "HTTP " + cb.last_status) : "",
            cb.last_error ? el("span", { class: "history-detail" }, cb.last_error) : "",
            cb.state === "pending" && cb.next_attempt_at ? el("span", { class: "muted" }, "next " + localTime(cb.next_attempt_at)) : "",
          ),
        ),
      ),
    );
  }

  // Each endpoint's health; the panel shows only once there is an endpoint.
  async function loadEndpoints() {
    const body = await api("GET", "/callbacks/endpoints");
    $("callbacks-panel").hidden = body.endpoints.length === 0;
    $("endpoints").replaceChildren(
      ...body.endpoints.map((ep) => {
        const enable = el("button", { type: "button", class: "btn btn-ghost", "data-action": "enable" }, "Enable");
        enable.addEventListener("click", () => enableEndpoint(ep.name));
        return el(
          "tr",
          { "data-endpoint": ep.name, "data-disabled": ep.disabled_at ? "1" : "0" },
          el("td", { class: "strong" }, ep.name),
          el("td", {}, ep.disabled_at ? pill("disabled", "failure") : pill(ep.rotating ? "rotating" : "enabled", "ok")),
          el("td", { class: "num" }, String(ep.pending)),
          el("td", {}, ep.last_ok_at ? ago(ep.last_ok_at) : "-"),
          el("td", { class: "history-detail" }, ep.disabled_reason || ep.last_error || ""),
          el("td", {}, ep.disabled_at ? enable : ""),
        );
      }),
    );
  }

  async function enableEndpoint(name) {
    await act(() => api("POST", "/callbacks/endpoints/" + encodeURIComponent(name) + "/enable"), "Endpoint " + name + " enabled");
  }

  // -- loading ------------------------------------------------------------------------------

  function phoneQuery(text) {
    // The API matches normalised numbers (E.164 digits) or JIDs; strip what people type around digits.
    return text.includes("@") ? text : text.replace(/[^0-9]/g, "");
  }

  async function loadMessages() {
    const filter = state.filter;
    let tasks;
    if (TASK_ID.test(filter.q)) {
      try {
        tasks = [await api("GET", "/tasks/" + encodeURIComponent(filter.q))];
      } catch (err) {
        if (err.status !== 404) throw err;
        tasks = [];
      }
      state.older = null;
    } else {
      const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
      if (filter.status) params.set("status", filter.status);
      if (filter.instance) params.set("instance", filter.instance);
      if (filter.q) params.set("phone", phoneQuery(filter.q));
      if (state.cursor) params.set("before", state.cursor);
      const page = await api("GET", "/tasks?" + params.toString());
      tasks = page.tasks;
      state.older = page.next_before;
    }
    const searching = filter.q || filter.status || filter.instance;
    renderTasks($("recent"), tasks, searching ? "No message matches this search." : "No message yet.");
    $("older").disabled = !state.older;
    $("newer").disabled = state.previous.length === 0;
    $("page-info").textContent = tasks.length
      ? (state.cursor ? "Older page, " : "Newest ") + tasks.length + " shown"
      : "";
  }

  async function loadAttention() {
    const page = await api("GET", "/tasks?status=" + ATTENTION + "&limit=20");
    renderTasks($("attention"), page.tasks, "Nothing failed. All good.");
    $("attention-count").textContent = page.tasks.length ? String(page.tasks.length) + (page.next_before ? "+" : "") : "";
  }

  async function refreshOnce() {
    const [health, hourly] = await Promise.all([api("GET", "/health", [503]), api("GET", "/stats/hourly?hours=24"), loadAttention(), loadEndpoints()]);
    renderHealth(health);
    renderChart(hourly);
    // An operator reading an older page keeps it; the newest page follows new messages.
    if (state.cursor === null) await loadMessages();
    await Promise.all(Array.from(openTaskIds(), loadDetails));
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
    $("updated").classList.remove("stale");
  }

  async function refresh() {
    if (state.running) {
      state.again = true;
      return state.running;
    }
    state.running = (async () => {
      do {
        state.again = false;
        try {
          await refreshOnce();
        } catch (err) {
          $("updated").textContent = "Update failed: " + err.message;
          $("updated").classList.add("stale");
        }
      } while (state.again);
      state.running = null;
    })();
    return state.running;
  }

  // -- actions ------------------------------------------------------------------------------

  async function retry(task) {
    await act(() => api("POST", "/tasks/" + encodeURIComponent(task.task_id) + "/retry"), "Task " + shortId(task.task_id) + " queued again");
  }

  async function cancelTask(task) {
    await act(() => api("DELETE", "/tasks/" + encodeURIComponent(task.task_id)), "Task " + shortId(task.task_id) + " canceled");
  }

  async function act(call, done) {
    try {
      await call();
      toast(done);
    } catch (err) {
      toast(err.message, true);
    }
    await refresh();
  }

  let toastTimer = null;

  // `content`: a text, or nodes (built with el(), never parsed as HTML).
  function toast(content, isError, showMs) {
    const box = $("toast");
    box.replaceChildren(...(Array.isArray(content) ? content : [content]));
    box.className = "toast" + (isError ? " toast-error" : "");
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => {
      box.hidden = true;
    }, showMs || (isError ? 8000 : 4000));
  }

  function search(filter) {
    state.filter = filter;
    state.cursor = null;
    state.previous = [];
    $("q").value = filter.q;
    $("status").value = filter.status;
    $("instance").value = filter.instance;
    loadMessages().catch((err) => toast(err.message, true));
  }

  function start() {
    for (const status of STATUSES) $("status").append(el("option", { value: status }, status));
    $("search").addEventListener("submit", (event) => {
      event.preventDefault();
      search({ q: $("q").value.trim(), status: $("status").value, instance: $("instance").value });
    });
    $("clear").addEventListener("click", () => search({ q: "", status: "", instance: "" }));
    $("counts").addEventListener("click", (event) => {
      const card = event.target.closest("[data-status]");
      if (!card) return;
      event.preventDefault();
      search({ q: "", status: card.dataset.status, instance: "" });
    });
    $("older").addEventListener("click", () => {
      state.previous.push(state.cursor);
      state.cursor = state.older;
      loadMessages().catch((err) => toast(err.message, true));
    });
    $("newer").addEventListener("click", () => {
      state.cursor = state.previous.pop() || null;
      loadMessages().catch((err) => toast(err.message, true));
    });
    $("pause").addEventListener("click", () => {
      state.paused = !state.paused;
      $("pause").textContent = state.paused ? "Resume refresh" : "Pause refresh";
      $("pause").setAttribute("aria-pressed", String(state.paused));
      if (!state.paused) refresh();
    });
    $("auth-form").addEventListener("submit", (event) => {
      event.preventDefault();
      try {
        window.localStorage.setItem(TOKEN_KEY, $("auth-token").value.trim());
      } catch (err) {
        toast("This browser does not allow storing the token", true);
      }
      $("auth").hidden = true;
      refresh();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && !state.paused) refresh();
    });
    setInterval(() => {
      if (!state.paused && !document.hidden) refresh();
    }, REFRESH_MS);
    refresh();
  }

  start();
})();
