// The playground at GET /: reads GET /v1/models (every model served by name, with a picker) or GET /v1/model
// (one unnamed model), draws a form fitted to the chosen model's task, sends what is typed to its predict
// endpoint like any other client, draws the answer for a person, and shows the same request as a curl command.
//
// Hand-written and framework-free on purpose: the page must work offline, straight from the package, with no
// build step. Model and user text only ever reach the page through textContent and text nodes (never
// innerHTML), and the server's Content-Security-Policy allows no inline script.
"use strict";

(() => {
  const KEY_STORAGE = "finetune-api-key";
  const ENTITY_HUES = { PER: 210, LOC: 130, ORG: 28, MISC: 280 };
  const TASK_NAMES = {
    classification: "classification",
    multi_label: "multi-label classification",
    regression: "regression",
    token_classification: "token classification",
    question_answering: "extractive question answering",
    multiple_choice: "multiple choice",
  };
  const $ = (id) => document.getElementById(id);
  let info = null; // what GET /v1/model (or the chosen entry of GET /v1/models) said
  let models = []; // every named model (GET /v1/models); empty when one unnamed model is served
  let keyInUse = false; // the server asked for a key: the curl snippet sends $FINETUNE_API_KEY
  let afterKey = null; // what to run again once the user gives an API key

  /** An element with properties and children; strings become text nodes, so they are never parsed as HTML. */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  // Python counts string offsets in code points, JavaScript in UTF-16 units: slice by code points so
  // entity and answer offsets land on the right characters after an emoji too.
  function slice(chars, start, end) {
    return chars.slice(start, end).join("");
  }

  function percent(score) {
    return `${(score * 100).toFixed(1)}%`;
  }

  function number(value) {
    return Math.abs(value) >= 1000 || Number.isInteger(value) ? String(value) : value.toPrecision(4);
  }

  // --- talking to the server --------------------------------------------------------------------------

  async function call(path, body) {
    const headers = {};
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers["X-API-Key"] = key;
    const init = { headers };
    if (body !== undefined) {
      init.method = "POST";
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (key) keyInUse = true;
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (_) {
      data = null; // not JSON (a proxy's error page, say): described by its status alone
    }
    return { status: response.status, ok: response.ok, data, sentKey: Boolean(key),
             retryAfter: response.headers.get("Retry-After") };
  }

  function askForKey(reply, then) {
    afterKey = then;
    if (reply.sentKey) sessionStorage.removeItem(KEY_STORAGE);
    $("key-message").textContent = reply.sentKey
      ? "The server refused that API key; give the right one."
      : "This server needs an API key.";
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  /** A 4xx/5xx reply as lines for a person: FastAPI's detail is a string or a list of {loc, msg}. */
  function describe(reply) {
    const detail = reply.data && reply.data.detail;
    const lines = [];
    if (Array.isArray(detail)) {
      for (const item of detail) {
        const where = (item.loc || []).filter((part) => part !== "body")
          .map((part, i) => (typeof part === "number" ? `[${part}]` : (i ? "." : "") + part)).join("");
        lines.push(where ? `${where}: ${item.msg}` : String(item.msg));
      }
    } else if (typeof detail === "string") {
      lines.push(detail);
    }
    if (!lines.length) lines.push("no reason given");
    if (reply.retryAfter) lines.push(`retry after ${reply.retryAfter} s`);
    return lines;
  }

  function showError(title, lines = []) {
    const box = $("error");
    box.replaceChildren(el("strong", { text: title }), el("ul", {}, ...lines.map((line) => el("li", { text: line }))));
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  // --- the model ---------------------------------------------------------------------------------------

  async function loadModel() {
    clearError();
    let reply;
    try {
      reply = await call("v1/models");
      if (reply.ok && !(reply.data && reply.data.models && reply.data.models.length)) reply = await call("v1/model");
    } catch (e) {
      showError("Cannot reach the server.", [String(e.message || e)]);
      return;
    }
    if (reply.status === 401) {
      keyInUse = true;
      return askForKey(reply, loadModel);
    }
    if (!reply.ok) return showError(`GET /v1/model answered ${reply.status}.`, describe(reply));
    models = (reply.data && reply.data.models) || [];
    drawPicker();
    choose(models.length ? (models.find((m) => m.name === reply.data.default) || models[0]) : reply.data);
  }

  /** The model picker: every model served by name; hidden when one unnamed model is served. */
  function drawPicker() {
    const picker = $("model-picker");
    picker.replaceChildren(...models.map((m) => el("option", { value: m.name, text: m.name })));
    $("picker").hidden = models.length < 2;
    picker.onchange = () => choose(models.find((m) => m.name === picker.value));
  }

  function choose(model) {
    info = model;
    if (models.length) $("model-picker").value = info.name;
    $("result").replaceChildren();
    $("result").dataset.state = "idle";
    clearError();
    drawInfo();
    drawForm();
  }

  /** Where the chosen model answers: its own endpoint when served by name, else /v1/predict. */
  function predictPath() {
    return models.length ? `v1/models/${encodeURIComponent(info.name)}/predict` : "v1/predict";
  }

  function drawInfo() {
    document.title = `${info.name} · finetune playground`;
    $("model-name").textContent = info.name;
    $("model-version").textContent = info.version ? `version ${info.version}` : "";
    const task = (TASK_NAMES[info.task] || info.task) + (info.text_pair ? " of sentence pairs" : "");
    const parts = [task, info.runtime, `reads up to ${info.max_length} tokens`];
    const summary = $("model-summary");
    summary.replaceChildren(el("span", { id: "model-task", dataset: { task: info.task }, text: parts[0] }),
                            ` · ${parts.slice(1).join(" · ")}`);
    summary.classList.remove("muted");
    const names = labelTypes();
    if (names && names.length) summary.append(el("br"), `${info.task === "token_classification" ? "Entity types" : "Labels"}: ${names.join(", ")}`);
    const body = $("metrics").tBodies[0];
    body.replaceChildren(...Object.entries(info.metrics || {}).map(([name, value]) =>
      el("tr", { dataset: { metric: name } }, el("th", { scope: "row", text: name }), el("td", { text: number(value) }))));
    $("metrics").hidden = body.rows.length === 0;
  }

  /** Label names as a person reads them: NER's B-/I- tags collapse to their entity types. */
  function labelTypes() {
    if (!info.label_names) return null;
    if (info.task !== "token_classification") return info.label_names;
    return [...new Set(info.label_names.filter((t) => t !== "O").map((t) => t.replace(/^[BIES]-/, "")))];
  }

  // --- the form ----------------------------------------------------------------------------------------

  function field(label, control, hint) {
    return el("div", { class: "field" }, el("label", { for: control.id, text: label }), control,
              hint ? el("small", { class: "muted", text: hint }) : null);
  }

  function textBox(id, placeholder, rows = 3) {
    return el("textarea", { id, rows, required: true, placeholder, spellcheck: "false" });
  }

  function choiceRow(value = "") {
    const input = el("input", { type: "text", class: "choice-input", required: true, "aria-label": "choice" });
    input.value = value;
    const remove = el("button", { type: "button", class: "remove-choice", title: "remove this choice", text: "×" });
    remove.addEventListener("click", () => {
      remove.parentElement.remove();
      numberChoices();
    });
    return el("li", {}, input, remove);
  }

  function numberChoices() {
    const rows = [...document.querySelectorAll("#choices li")];
    rows.forEach((row, i) => {
      row.querySelector("input").setAttribute("aria-label", `choice ${i}`);
      row.querySelector(".remove-choice").disabled = rows.length <= 2; // the API needs at least two
    });
  }

  function drawForm() {
    const fields = $("fields");
    fields.replaceChildren();
    const task = info.task;
    if (task === "question_answering") {
      fields.append(field("Question", el("input", { id: "question", type: "text", required: true })),
                    field("Context", textBox("context", "The text the answer is taken from.", 6)));
    } else if (task === "multiple_choice") {
      const add = el("button", { type: "button", id: "add-choice", text: "Add a choice" });
      const list = el("ol", { id: "choices", start: "0" }, choiceRow(), choiceRow());
      add.addEventListener("click", () => {
        list.append(choiceRow());
        numberChoices();
        list.lastElementChild.querySelector("input").focus();
      });
      fields.append(field("Context", textBox("context", "The situation the choices continue.")),
                    field("Start (optional)", el("input", { id: "start", type: "text" }),
                          "The beginning every choice continues."),
                    el("div", { class: "field" }, el("span", { class: "label", text: "Choices" }), list, add));
      numberChoices();
    } else {
      const hint = task === "token_classification" ? "Entities are marked in the text with their types." : null;
      fields.append(field(info.text_pair ? "First text" : "Text", textBox("text", "Type a text."), hint));
      if (info.text_pair) fields.append(field("Second text", textBox("text-pair", "The text it is paired with.")));
      if (task === "multi_label") {
        const threshold = el("input", { id: "threshold", type: "number", min: "0.01", max: "0.99", step: "0.01" });
        threshold.value = String(info.threshold);
        fields.append(field("Threshold", threshold, "Labels scoring at least this are predicted."));
      }
    }
    $("predict-form").hidden = false;
    $("curl").hidden = false;
    fields.querySelector("input, textarea").focus();
    drawCurl();
  }

  // --- copy as curl ------------------------------------------------------------------------------------

  /** Text in single quotes for a POSIX shell: nothing in it is expanded. */
  function shellQuote(text) {
    return `'${text.replace(/'/g, "'\\''")}'`;
  }

  function requestBody() {
    const body = { inputs: [readInput()] };
    if (info.task === "multi_label") body.options = { threshold: Number($("threshold").value) };
    return body;
  }

  /** The current request as a curl command; the key is never written out, only $FINETUNE_API_KEY. */
  function curlCommand() {
    const url = new URL(predictPath(), document.baseURI).href;
    const lines = [`curl -sS ${shellQuote(url)}`, `  -H 'Content-Type: application/json'`];
    if (keyInUse || sessionStorage.getItem(KEY_STORAGE)) lines.push(`  -H "X-API-Key: $FINETUNE_API_KEY"`);
    lines.push(`  -d ${shellQuote(JSON.stringify(requestBody()))}`);
    return lines.join(" \\\n");
  }

  function drawCurl() {
    if (!info) return;
    $("curl-snippet").textContent = curlCommand();
  }

  async function copyCurl() {
    drawCurl();
    const text = $("curl-snippet").textContent;
    try {
      await navigator.clipboard.writeText(text);
      $("curl-status").textContent = "Copied.";
    } catch (_) { // no clipboard outside a secure context: select it for Ctrl+C instead
      const range = document.createRange();
      range.selectNodeContents($("curl-snippet"));
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
      $("curl-status").textContent = "Selected: press Ctrl+C to copy.";
    }
  }

  function readInput() {
    const value = (id) => $(id).value;
    if (info.task === "question_answering") return { question: value("question"), context: value("context") };
    if (info.task === "multiple_choice") {
      const item = { context: value("context"), choices: [...document.querySelectorAll(".choice-input")].map((c) => c.value) };
      if (value("start").trim()) item.start = value("start");
      return item;
    }
    return info.text_pair ? [value("text"), value("text-pair")] : value("text");
  }

  async function predict(event) {
    event.preventDefault();
    clearError();
    const body = requestBody();
    drawCurl();
    const result = $("result");
    result.dataset.state = "busy";
    $("submit").disabled = true;
    $("status").textContent = "Predicting…";
    let reply;
    try {
      reply = await call(predictPath(), body);
    } catch (e) {
      reply = null;
      showError("Cannot reach the server.", [String(e.message || e)]);
    } finally {
      $("submit").disabled = false;
      $("status").textContent = "";
    }
    if (!reply) {
      result.dataset.state = "error";
    } else if (reply.status === 401) {
      result.dataset.state = "idle";
      askForKey(reply, () => $("predict-form").requestSubmit());
    } else if (!reply.ok) {
      result.dataset.state = "error";
      showError(`The server refused the request (${reply.status}).`, describe(reply));
    } else {
      drawAnswer(body.inputs[0], reply.data.predictions[0], reply.data);
      result.dataset.state = "done";
    }
  }

  // --- answers -----------------------------------------------------------------------------------------

  /** One bar per label, best first; the chosen labels marked. */
  function bars(scores, chosen) {
    const rows = Object.entries(scores).sort((a, b) => b[1] - a[1]).map(([label, score]) => {
      const fill = el("span", { class: "bar-fill" });
      fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
      const picked = chosen.includes(label);
      return el("li", { class: picked ? "bar chosen" : "bar", dataset: { label, score: String(score) } },
                el("span", { class: "bar-label", text: label }), el("span", { class: "bar-track" }, fill),
                el("span", { class: "bar-score", text: percent(score) }),
                picked ? el("span", { class: "mark", text: "✓" }) : null);
    });
    return el("ol", { class: "bars" }, ...rows);
  }

  /** The text with the given character spans (code-point offsets) wrapped in marks. */
  function highlighted(text, spans, className) {
    const chars = Array.from(text);
    const out = el("p", { class: "highlighted" });
    let at = 0;
    for (const span of [...spans].sort((a, b) => a.start - b.start)) {
      if (span.start < at) continue; // overlapping spans do not happen; never draw text twice if they did
      out.append(slice(chars, at, span.start));
      const mark = el("mark", { class: className, dataset: { start: String(span.start), end: String(span.end) } },
                      el("span", { class: "span-text", text: slice(chars, span.start, span.end) }));
      if (span.type) {
        mark.dataset.type = span.type;
        mark.style.setProperty("--hue", String(hue(span.type)));
        mark.title = `${span.type} ${percent(span.score)}`;
        mark.append(el("span", { class: "entity-type", text: span.type }));
      }
      out.append(mark);
      at = span.end;
    }
    out.append(slice(chars, at, chars.length));
    return out;
  }

  function hue(type) {
    if (type in ENTITY_HUES) return ENTITY_HUES[type];
    let h = 0;
    for (const c of type) h = (h * 31 + c.codePointAt(0)) % 360;
    return h;
  }

  function drawAnswer(input, answer, reply) {
    const parts = [];
    const task = info.task;
    if (task === "classification") {
      parts.push(el("h2", {}, "Label: ", el("span", { id: "answer-label", text: answer.label }), ` (${percent(answer.score)})`),
                 bars(answer.scores, [answer.label]));
    } else if (task === "multi_label") {
      const threshold = Number($("threshold").value);
      parts.push(el("h2", { text: answer.labels.length ? `Labels: ${answer.labels.join(", ")}`
                                                          : `No label scores ${threshold} or more` }),
                 el("p", { class: "muted", text: `✓ marks the labels at or above the threshold ${threshold}.` }),
                 bars(answer.scores, answer.labels));
    } else if (task === "regression") {
      parts.push(el("h2", { text: "Value" }),
                 el("p", { id: "answer-value", class: "value", dataset: { value: String(answer.value) }, text: number(answer.value) }));
    } else if (task === "token_classification") {
      parts.push(el("h2", { text: answer.entities.length ? `${answer.entities.length} entities` : "No entities found" }),
                 highlighted(input, answer.entities, "entity"));
      if (answer.entities.length) {
        parts.push(el("table", { class: "entities" },
          el("thead", {}, el("tr", {}, el("th", { text: "type" }), el("th", { text: "text" }), el("th", { text: "score" }))),
          el("tbody", {}, ...answer.entities.map((e) => el("tr", {}, el("td", { text: e.type }), el("td", { text: e.text }),
                                                           el("td", { text: percent(e.score) }))))));
      }
    } else if (task === "question_answering") {
      if (answer.answer) {
        parts.push(el("h2", {}, "Answer: ", el("span", { id: "answer-text", text: answer.answer }), ` (${percent(answer.score)})`),
                   highlighted(input.context, [answer], "answer"));
      } else {
        parts.push(el("h2", { text: "No answer found in the context" }));
      }
    } else if (task === "multiple_choice") {
      const items = input.choices.map((choice, i) => {
        const fill = el("span", { class: "bar-fill" });
        fill.style.width = `${answer.scores[i] * 100}%`;
        const picked = i === answer.choice;
        return el("li", { class: picked ? "bar chosen" : "bar", dataset: { choice: String(i), score: String(answer.scores[i]) } },
                  el("span", { class: "bar-label", text: choice }), el("span", { class: "bar-track" }, fill),
                  el("span", { class: "bar-score", text: percent(answer.scores[i]) }),
                  picked ? el("span", { class: "mark", text: "✓ chosen" }) : null);
      });
      parts.push(el("h2", {}, `Choice ${answer.choice}: `, el("span", { id: "answer-choice", text: answer.text }),
                    ` (${percent(answer.score)})`),
                 el("ol", { class: "bars choices", start: "0" }, ...items));
    } else {
      parts.push(el("pre", { text: JSON.stringify(answer, null, 2) })); // a task this page does not know yet
    }
    if (answer.truncated) {
      parts.push(el("p", { class: "note", text: `The input was longer than the ${info.max_length} tokens the model reads; `
                                                 + "the answer is for its beginning." }));
    }
    parts.push(el("p", { class: "muted", text: `Answered by ${reply.model}${reply.version ? ` version ${reply.version}` : ""}.` }));
    $("result").replaceChildren(...parts);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value;
    if (!/^[\x21-\x7e]+$/.test(key)) { // a header value: fetch refuses anything else before sending
      $("key-message").textContent = "An API key is printable ASCII without spaces; give it again.";
      return;
    }
    $("api-key").value = "";
    $("key-form").hidden = true;
    sessionStorage.setItem(KEY_STORAGE, key);
    const then = afterKey;
    afterKey = null;
    if (then) then();
  });
  $("predict-form").addEventListener("submit", predict);
  // Ctrl+Enter (or Cmd+Enter) in any box sends the form, so trying many texts needs no mouse.
  $("fields").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("predict-form").requestSubmit();
  });
  $("fields").addEventListener("input", drawCurl);
  $("fields").addEventListener("click", () => setTimeout(drawCurl)); // choices added or removed
  $("copy-curl").addEventListener("click", copyCurl);
  loadModel();
})();
