// Turbo Live: the web UI's live panel for graphs that hold a Turbo Live Output node (protocol 2).
//
// Press Live and the panel hands the graph to its session on the pack's websocket
// (/comfy-turbo/live/<session>/ws); from then on the SERVER queues the runs, whenever the input changes:
//   - webcam (getUserMedia) or a paint canvas, as JPEG frames on that websocket, newest frame wins;
//   - prompt-as-you-type: an edit of a widget value (the panel's prompt box, a seed, a LoRA strength)
//     goes as {"type": "set"} with the changed values, any other edit of the graph as the graph again.
// The panel never queues a prompt itself. It keeps one frame at most waiting for a run, captured just
// before the running run should end, with an fps cap and StreamDiffusion's stochastic similarity filter
// for camera frames. Output frames come back on ComfyUI's own websocket as binary message type 4
// (JPEG/WebP + metadata), never through disk; the runs' progress and errors come there too.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/comfy-turbo/live";
const PROTOCOL = 2;
const OUTPUT_NODE = "TurboLiveOutput";
const INPUT_NODE = "TurboLiveInput";
const TEXT_NODES = ["TurboTextEncode", "CLIPTextEncode"];
const PREVIEW_IMAGE_WITH_METADATA = 4;
const MAX_SKIPS_IN_A_ROW = 10;         // StreamDiffusion's SimilarImageFilter default
const LATENCY_WINDOW = 120;            // latency percentiles over the last 120 frames
const FPS_WINDOW_MS = 5000;            // fps over the frames of the last 5 seconds
const STALL_MS = 3000;                 // a frame untaken (or a run unfinished) this long, at least, is looked into
const ANSWER_MS = 30000;               // a graph / set unanswered this long is given up on
const KEPT_RUNS = 64;                  // run records kept, to tell the session's runs on ComfyUI's socket
const EARLY_MS = 5000;                 // how long a ComfyUI message about a prompt not known yet is kept
const RUN_EVENTS = new Set(["execution_start", "executing", "execution_success", "execution_error",
  "execution_interrupted"]);

// --- pure helpers (exported for tests) ------------------------------------------------------

/** StreamDiffusion's skip probability for a frame with cosine similarity `cos` to the last sent one. */
export function skipProbability(cos, threshold) {
  if (threshold >= 1) return 0;
  return Math.max(0, 1 - (1 - cos) / (1 - threshold));
}

/** Cosine similarity of two equal-length vectors. */
export function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return na && nb ? dot / Math.sqrt(na * nb) : (na === nb ? 1 : 0);
}

/** The q-th percentile (0-100) of an array of numbers, or null. */
export function percentile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = (q / 100) * (sorted.length - 1), low = Math.floor(rank), high = Math.ceil(rank);
  return sorted[low] + (sorted[high] - sorted[low]) * (rank - low);
}

/** >I header length | header JSON | payload, the frame message of the live websocket. */
export function packFrame(header, payload) {
  const head = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(4 + head.length + payload.byteLength);
  new DataView(out.buffer).setUint32(0, head.length);
  out.set(head, 4);
  out.set(new Uint8Array(payload), 4 + head.length);
  return out.buffer;
}

/** {metadata, blob} of ComfyUI's binary message type 4, or null for other messages. */
export function unpackImageWithMetadata(buffer) {
  if (!(buffer instanceof ArrayBuffer) || buffer.byteLength < 8) return null;
  const view = new DataView(buffer);
  if (view.getUint32(0) !== PREVIEW_IMAGE_WITH_METADATA) return null;
  const length = view.getUint32(4);
  const metadata = JSON.parse(new TextDecoder().decode(buffer.slice(8, 8 + length)));
  return { metadata, blob: new Blob([buffer.slice(8 + length)], { type: metadata.image_type || "image/jpeg" }) };
}

/** Whether an API-prompt input holds a link ([node id, output index]) rather than a value. */
export function isLink(value) {
  return Array.isArray(value) && value.length === 2 && typeof value[0] === "string" && Number.isInteger(value[1]);
}

/** How API prompt `after` differs from `before`: {kind: "same"}, {kind: "set", values: {node id: {input:
 * value}}} when only values of the same nodes' inputs changed, or {kind: "graph"} for anything else (nodes,
 * class types, links, the set of inputs). Titles (_meta) do not count. */
export function promptChange(before, after) {
  if (!before || Object.keys(before).length !== Object.keys(after).length) return { kind: "graph" };
  const values = {};
  for (const [id, node] of Object.entries(after)) {
    const old = before[id], inputs = node.inputs ?? {}, oldInputs = old?.inputs ?? {};
    if (!old || old.class_type !== node.class_type) return { kind: "graph" };
    if (Object.keys(inputs).length !== Object.keys(oldInputs).length) return { kind: "graph" };
    for (const [name, value] of Object.entries(inputs)) {
      if (!Object.hasOwn(oldInputs, name)) return { kind: "graph" };
      if (JSON.stringify(value) === JSON.stringify(oldInputs[name])) continue;
      if (isLink(value) || isLink(oldInputs[name])) return { kind: "graph" };
      (values[id] ??= {})[name] = value;
    }
  }
  return Object.keys(values).length ? { kind: "set", values } : { kind: "same" };
}

/** The message area's text for a refused graph or set: ComfyUI's validation error and each node's errors. */
export function refusalText(reply) {
  const what = reply.request === "set" ? "values" : "graph", error = reply.error;
  const head = error?.message
    ? `ComfyUI refused the ${what}: ${error.message}${error.details ? ` (${error.details})` : ""}`
    : String(reply.message ?? `status ${reply.status}`).replace(/^comfy-turbo live: /, "");
  const details = Object.entries(reply.node_errors ?? {}).flatMap(([id, node]) => (node.errors ?? []).map(
    (e) => `${node.class_type ?? "node"} #${id}: ${e.message}${e.details ? `: ${e.details}` : ""}`));
  return [head, ...details].join("\n");
}

// --- the graph --------------------------------------------------------------------------------

function nodesOfType(type) {
  return (app.graph?._nodes ?? app.graph?.nodes ?? []).filter((n) => n.type === type || n.comfyClass === type);
}

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function liveGraph() {
  const output = nodesOfType(OUTPUT_NODE)[0];
  if (!output) return null;
  const input = nodesOfType(INPUT_NODE)[0] ?? null;
  const text = TEXT_NODES.flatMap(nodesOfType).find((n) => widget(n, "text")) ?? null;
  return {
    session: String(widget(output, "session")?.value ?? "live"),
    inputSession: input ? String(widget(input, "session")?.value ?? "live") : null,
    width: Number(widget(input, "width")?.value ?? 0) || 512,
    height: Number(widget(input, "height")?.value ?? 0) || 512,
    source: input ? String(widget(input, "source")?.value ?? "webcam") : "prompt",
    textWidget: widget(text, "text") ?? null,
  };
}

// --- the panel --------------------------------------------------------------------------------

const STYLE = `
#turbo-live-panel { position: fixed; right: 16px; bottom: 16px; width: 460px; z-index: 1000;
  background: #1e1e22; color: #ddd; border: 1px solid #555; border-radius: 8px;
  font: 12px/1.4 system-ui, sans-serif; box-shadow: 0 4px 16px #0008; }
#turbo-live-panel header { display: flex; align-items: center; gap: 8px; padding: 6px 8px;
  cursor: move; border-bottom: 1px solid #444; user-select: none; }
#turbo-live-panel header b { flex: 1; }
#turbo-live-panel .tl-body { padding: 8px; display: flex; flex-direction: column; gap: 6px; }
#turbo-live-panel .tl-view { display: flex; gap: 6px; justify-content: center; }
#turbo-live-panel .tl-view > * { flex: 0 1 220px; min-width: 0; aspect-ratio: 1; border-radius: 4px;
  background: #111; object-fit: contain; display: block; }
#turbo-live-panel .tl-view > .tl-paint { background: #fff; touch-action: none; cursor: crosshair; }
#turbo-live-panel .tl-view > .tl-output:only-child, #turbo-live-panel .tl-view > .tl-output.alone {
  flex-basis: 300px; }
#turbo-live-panel .tl-row { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
#turbo-live-panel input[type=number] { width: 52px; }
#turbo-live-panel textarea { width: 100%; box-sizing: border-box; min-height: 40px; resize: vertical;
  background: #111; color: #eee; border: 1px solid #555; border-radius: 4px; }
#turbo-live-panel button.tl-toggle { font-weight: bold; padding: 4px 14px; border-radius: 4px; border: 0;
  background: #2a7; color: #fff; cursor: pointer; }
#turbo-live-panel button.tl-toggle.running { background: #c33; }
#turbo-live-panel .tl-stats { font-variant-numeric: tabular-nums; color: #9c9; }
#turbo-live-panel .tl-message { color: #f99; white-space: pre-wrap; max-height: 120px; overflow: auto; }
#turbo-live-panel .tl-message:empty { display: none; }
#turbo-live-panel [hidden] { display: none !important; }
`;

function element(tag, props = {}, children = []) {
  const el = Object.assign(document.createElement(tag), props);
  for (const child of children) el.append(child);
  return el;
}

class TurboLive {
  constructor() {
    this.running = false;
    this.panel = null;
    this.objectUrls = new Set();    // object URLs made for the output picture and not revoked yet
    this.shownUrl = null;           // the picture shown
    this.loadingUrl = null;         // the picture loading, to be shown next
    this.reset();
  }

  reset() {
    this.token = null;              // the session's secret, from "attached"
    // The graph: what the server holds, what was sent and not answered yet, what it refused.
    this.acked = null;              // the API prompt of the session's graph on the server
    this.ackedKey = null;
    this.refusedKey = null;         // a prompt whose values were refused: not sent again
    this.request = null;            // {kind, prompt, key, editedAt, sentAt}: the graph / set sent, no answer yet
    this.syncing = false;
    this.editedAt = null;           // first edit not yet sent
    this.edits = 0;                 // edits counted, to tell those made while the graph was being read
    this.refusalShown = false;
    this.graphs = 0;                // graph messages sent
    this.sets = 0;                  // set messages sent
    // The session's runs, from the server's "run" messages; ComfyUI's socket tells how each goes.
    this.runs = new Map();          // prompt id -> {notedAt, startedAt, endedAt, superseded}
    this.early = new Map();         // prompt id -> ComfyUI messages that came before its "run" message
    this.executing = null;          // the run of ours executing now
    this.lastRun = null;            // the newest run's prompt id
    this.promptInputTime = new Map();
    this.expectedMs = 0;            // how long a run takes, start to end (moving average)
    this.lastEndedAt = -Infinity;      // when the last run of ours ended
    this.checkedQueueAt = -Infinity;
    // Frames.
    this.frameId = 0;               // the newest frame sent
    this.captured = new Map();      // frame id -> capture time
    this.waiting = null;            // {id, sentAt}: the frame sent and not taken by a run yet
    this.encoding = false;
    this.leadMs = 5;                // how long a frame takes from capture to the server, decoded (moving average)
    this.lastSent = null;           // downsampled pixels of the last frame sent
    this.lastCaptureAt = -Infinity;
    this.paintDirty = true;
    this.stale = 0;                 // frames given up on, untaken
    // Stats.
    this.shown = [];                // times frames were shown
    this.latencies = [];
    this.serverFrames = null;
    this.skipped = 0;
    this.skipsInARow = 0;
    this.clientDropped = 0;
    this.outputs = 0;
    this.submitted = 0;             // runs the server queued for us
    this.ran = 0;                   // of those, the ones that started
    this.lastMetadata = null;
  }

  // -- panel -------------------------------------------------------------------------------
  ensurePanel() {
    if (this.panel) return this.panel;
    document.head.append(element("style", { textContent: STYLE }));
    const $ = (role, tag, props = {}, children = []) => {
      const el = element(tag, props, children);
      el.dataset.role = role;
      return el;
    };
    this.ui = {
      state: $("state", "span", { textContent: "idle" }),
      close: $("close", "button", { textContent: "×", title: "Hide the panel (stops Live)" }),
      output: $("output", "img", { className: "tl-output", alt: "" }),
      source: $("source", "select", {}, ["webcam", "paint", "prompt"].map(
        (s) => element("option", { value: s, textContent: s }))),
      fps: $("fps-cap", "input", { type: "number", min: 1, max: 120, value: 30, title: "fps cap" }),
      skip: $("skip", "input", { type: "checkbox", checked: true, title: "Skip camera frames almost equal to the last one sent" }),
      threshold: $("threshold", "input", { type: "number", min: 0.5, max: 1, step: 0.005, value: 0.98,
        title: "Similarity threshold (StreamDiffusion: 0.98)" }),
      prompt: $("prompt", "textarea", { placeholder: "Type a prompt: the image follows as you type" }),
      video: $("video", "video", { muted: true, playsInline: true, autoplay: true, title: "The camera" }),
      paint: $("paint", "canvas", { className: "tl-paint", width: 512, height: 512, title: "Paint here" }),
      color: $("color", "input", { type: "color", value: "#2050c0" }),
      size: $("brush", "input", { type: "range", min: 2, max: 80, value: 18 }),
      clear: $("clear", "button", { textContent: "Clear" }),
      toggle: $("toggle", "button", { className: "tl-toggle", textContent: "▶ Live" }),
      stats: $("stats", "div", { className: "tl-stats", textContent: "–" }),
      message: $("message", "div", { className: "tl-message" }),
    };
    const u = this.ui;
    const header = element("header", {}, [element("b", { textContent: "Turbo Live" }), u.state, u.close]);
    // The input (camera or canvas) and the output side by side, the controls below.
    this.paintTools = element("div", { className: "tl-row" }, ["brush", u.color, u.size, u.clear]);
    this.skipTools = element("label", {}, [u.skip, " skip similar ≥ ", u.threshold]);
    this.panel = element("div", { id: "turbo-live-panel" }, [header, element("div", { className: "tl-body" }, [
      element("div", { className: "tl-view" }, [u.video, u.paint, u.output]),
      element("div", { className: "tl-row" }, [u.toggle, element("label", {}, ["source ", u.source]),
        element("label", {}, ["fps ≤ ", u.fps]), this.skipTools]),
      this.paintTools, u.prompt, u.stats, u.message,
    ])]);
    document.body.append(this.panel);
    this.draggable(header);
    u.toggle.addEventListener("click", () => (this.running ? this.stop() : this.start()));
    u.close.addEventListener("click", () => this.hide());
    u.source.addEventListener("change", () => this.sourceChanged());
    u.prompt.addEventListener("input", () => {
      const graph = liveGraph();
      if (graph?.textWidget) {
        graph.textWidget.value = u.prompt.value;
        graph.textWidget.callback?.(u.prompt.value);
        app.graph.setDirtyCanvas(true, false);
      }
      this.noteEdit();
    });
    // The picture shown keeps its object URL until the next one has loaded (see display()).
    u.output.addEventListener("load", () => this.outputSettled(true));
    u.output.addEventListener("error", () => this.outputSettled(false));
    this.setUpPaint();
    return this.panel;
  }

  draggable(handle) {
    handle.addEventListener("pointerdown", (down) => {
      if (down.target !== handle && down.target.tagName !== "B") return;
      const box = this.panel.getBoundingClientRect(), dx = down.clientX - box.left, dy = down.clientY - box.top;
      const move = (e) => Object.assign(this.panel.style, { left: `${e.clientX - dx}px`, top: `${e.clientY - dy}px`,
        right: "auto", bottom: "auto" });
      const up = () => { window.removeEventListener("pointermove", move); window.removeEventListener("pointerup", up); };
      window.addEventListener("pointermove", move);
      window.addEventListener("pointerup", up);
    });
  }

  setUpPaint() {
    const canvas = this.ui.paint, ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    let last = null;
    const point = (e) => {
      const r = canvas.getBoundingClientRect();
      return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
    };
    const stroke = (from, to) => {
      ctx.strokeStyle = this.ui.color.value;
      ctx.lineWidth = Number(this.ui.size.value) * canvas.width / 512;
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(...from);
      ctx.lineTo(...to);
      ctx.stroke();
      this.painted();
    };
    canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); last = point(e); stroke(last, last); });
    canvas.addEventListener("pointermove", (e) => { if (last) { const p = point(e); stroke(last, p); last = p; } });
    const end = () => { last = null; };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    this.ui.clear.addEventListener("click", () => {
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      this.painted();
    });
  }

  show() {
    this.ensurePanel().hidden = false;
    this.syncWithGraph(true);
  }

  hide() {
    if (this.running) this.stop();
    if (this.panel) this.panel.hidden = true;
  }

  // What the graph says: its session, input size and source, and the prompt box's text.
  syncWithGraph(initial = false) {
    const graph = liveGraph();
    if (!this.panel || !graph) return graph;
    const u = this.ui;
    if (initial) {
      u.source.value = graph.source === "api" ? "prompt" : graph.source;
      for (const option of u.source.options) option.disabled = option.value !== "prompt" && graph.source === "prompt";
      this.sourceChanged();
    }
    u.prompt.hidden = !graph.textWidget;
    if (graph.textWidget && document.activeElement !== u.prompt && u.prompt.value !== graph.textWidget.value) {
      u.prompt.value = graph.textWidget.value;
    }
    if (u.paint.width !== graph.width || u.paint.height !== graph.height) {
      const old = u.paint.getContext("2d").getImageData(0, 0, u.paint.width, u.paint.height);
      Object.assign(u.paint, { width: graph.width, height: graph.height });
      const ctx = u.paint.getContext("2d");
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, graph.width, graph.height);
      ctx.putImageData(old, 0, 0);
      this.paintDirty = true;
    }
    return graph;
  }

  sourceChanged() {
    const source = this.ui.source.value;
    this.ui.paint.hidden = this.paintTools.hidden = source !== "paint";
    this.ui.video.hidden = this.skipTools.hidden = source !== "webcam";
    this.ui.output.classList.toggle("alone", source === "prompt");
    this.paintDirty = true;
    if (this.running) { this.stop(); this.start(); }
  }

  say(text, state) {
    if (!this.ui) return;
    this.ui.message.textContent = text ?? "";
    if (state) this.ui.state.textContent = state;
  }

  // -- start / stop --------------------------------------------------------------------------
  async start() {
    const graph = this.syncWithGraph();
    if (!graph) { this.say("This graph has no Turbo Live Output node.", "idle"); return; }
    if (graph.inputSession && graph.inputSession !== graph.session) {
      this.say(`Turbo Live Input uses session '${graph.inputSession}' but Turbo Live Output uses '${graph.session}': ` +
        "give both the same name.", "idle");
      return;
    }
    this.reset();
    this.graph = graph;
    this.source = this.ui.source.value;
    this.running = true;
    this.say("", "starting…");
    this.ui.toggle.textContent = "■ Stop";
    this.ui.toggle.classList.add("running");
    try {
      if (this.source === "webcam") await this.openCamera(graph);
      await this.openSocket(graph.session);
    } catch (error) {
      this.stop(String(error?.message ?? error));
      return;
    }
    this.bindComfySocket();
    this.ui.state.textContent = "live";
    this.tick();                    // hands the graph over, and sends the first frame
  }

  stop(message) {
    const wasRunning = this.running;
    this.running = false;
    clearTimeout(this.timer);
    clearTimeout(this.presend);
    this.timer = null;
    if (this.socket) { this.socket.onclose = null; this.socket.close(); this.socket = null; }
    for (const track of this.stream?.getTracks() ?? []) track.stop();
    this.stream = null;
    if (this.ui) {
      this.ui.video.srcObject = null;
      this.ui.toggle.textContent = "▶ Live";
      this.ui.toggle.classList.remove("running");
      this.say(message, "stopped");
      if (!message && wasRunning) this.ui.message.textContent = "";
    }
  }

  async openCamera(graph) {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("This browser gives no camera here: it allows one only on https:// or http://localhost.");
    }
    this.stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: graph.width }, height: { ideal: graph.height } }, audio: false });
    this.ui.video.srcObject = this.stream;
    await this.ui.video.play().catch(() => {});
  }

  openSocket(session) {
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}` +
      api.apiURL(`${ROUTE}/${encodeURIComponent(session)}/ws?clientId=${encodeURIComponent(api.clientId ?? "")}`);
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url);
      socket.binaryType = "arraybuffer";
      let attached = false, refusal = null;
      socket.onmessage = (event) => {
        const reply = JSON.parse(event.data);
        if (attached) this.onLiveMessage(reply);
        else if (reply.type === "attached" && reply.protocol !== PROTOCOL) {
          refusal = `The server speaks Turbo Live protocol ${reply.protocol}, this page ${PROTOCOL}: restart ComfyUI ` +
            "after updating comfy-turbo, and reload the page.";
          socket.close();
        } else if (reply.type === "attached") {
          attached = true;
          this.token = reply.token;
          this.socket = socket;
          resolve();
        } else if (reply.type === "error") refusal = reply.message;
      };
      socket.onclose = (event) => {
        if (!attached) reject(new Error(refusal ?? `The live connection was refused (code ${event.code}).`));
        else if (this.running) this.stop("The connection to the server closed (was it restarted?). Live stopped.");
      };
    });
  }

  // ComfyUI's own websocket: how the session's runs go, and our output frames (binary type 4).
  bindComfySocket() {
    if (this.comfySocket === api.socket) return;
    this.comfySocket = api.socket;
    api.socket?.addEventListener("message", (event) => this.onComfyMessage(event));
  }

  // -- the live websocket ----------------------------------------------------------------------
  onLiveMessage(reply) {
    if (!this.running) return;
    if (reply.type === "frame") this.onAck(reply);
    else if (reply.type === "run") this.noteRun(reply.prompt_id);
    else if (reply.type === "taken") this.onTaken(reply);
    else if (reply.type === "graph" || reply.type === "set") this.onAccepted(reply);
    else if (reply.type === "error") this.onRefusal(reply);
  }

  onAccepted(reply) {
    const request = this.request;
    this.request = null;
    if (request) Object.assign(this, { acked: request.prompt, ackedKey: request.key, refusedKey: null });
    if (this.refusalShown) { this.say(""); this.refusalShown = false; }
    if (reply.prompt_id) {
      this.noteRun(reply.prompt_id);
      if (request?.editedAt != null) this.promptInputTime.set(reply.prompt_id, request.editedAt);
    }
    this.syncGraph();               // edits made meanwhile go now
  }

  onRefusal(reply) {
    if (reply.request === "graph") {
      this.stop(`${refusalText(reply)}\nLive stopped.`);
    } else if (reply.request === "set") {
      // The server keeps its last good graph; these values are not sent again until they change.
      this.refusedKey = this.request?.key ?? null;
      this.request = null;
      this.say(`${refusalText(reply)}\nLive goes on with the last values ComfyUI accepted.`);
      this.refusalShown = true;
      this.syncGraph();
    } else {
      this.say(String(reply.message ?? reply.status).replace(/^comfy-turbo live: /, ""));
      if (reply.frame_id != null) this.frameConsumed(reply.frame_id);
    }
  }

  onAck(reply) {
    const capturedAt = this.captured.get(reply.frame_id);
    if (capturedAt != null) this.leadMs = 0.8 * this.leadMs + 0.2 * 1.5 * (performance.now() - capturedAt);
    if (!reply.accepted) this.frameConsumed(reply.frame_id);    // overtaken on the server
    if (reply.frames) this.serverFrames = reply.frames;
  }

  onTaken(reply) {
    this.noteRun(reply.prompt_id);
    const run = this.runs.get(reply.prompt_id);
    if (run) this.runStarted(run);
    this.frameConsumed(reply.frame_id);
  }

  frameConsumed(frameId) {
    if (this.waiting && frameId >= this.waiting.id) {
      this.waiting = null;
      this.capture();
    }
  }

  // -- the session's runs ----------------------------------------------------------------------
  noteRun(promptId) {
    if (!promptId || this.runs.has(promptId)) return;
    const now = performance.now();
    // One run of a session waits at most: one not started by now was replaced (or it started, and ComfyUI's
    // socket has not told yet: its first message there brings it back).
    for (const run of this.runs.values()) {
      if (run.startedAt == null && run.endedAt == null) Object.assign(run, { endedAt: now, superseded: true });
    }
    this.runs.set(promptId, { notedAt: now, startedAt: null, endedAt: null, superseded: false });
    while (this.runs.size > KEPT_RUNS) this.runs.delete(this.runs.keys().next().value);
    this.submitted++;
    this.lastRun = promptId;
    const early = this.early.get(promptId) ?? [];
    this.early.delete(promptId);
    for (const message of early) this.onRunMessage(message);
  }

  runStarted(run) {
    if (run.superseded) Object.assign(run, { superseded: false, endedAt: null });
    if (run.startedAt != null || run.endedAt != null) return;
    run.startedAt = performance.now();
    this.ran++;
    this.executing = run;
    // The next frame is captured to reach the server, decoded, just before this run ends.
    clearTimeout(this.presend);
    this.presend = setTimeout(() => this.capture(), Math.max(0, this.expectedMs - this.leadMs));
  }

  runEnded(run, measured = true) {
    if (run.endedAt != null && !run.superseded) return;
    const now = performance.now();
    Object.assign(run, { endedAt: now, superseded: false });
    if (measured && run.startedAt != null) {
      const took = now - run.startedAt;
      this.expectedMs = this.expectedMs ? 0.8 * this.expectedMs + 0.2 * took : took;
    }
    if (this.executing === run) this.executing = null;
    this.lastEndedAt = now;
    this.capture();                 // no run executes: a frame now, if one is wanted
  }

  inFlight() {
    for (const run of this.runs.values()) if (run.endedAt == null) return true;
    return false;
  }

  onComfyMessage(event) {
    if (!this.running) return;
    if (event.data instanceof ArrayBuffer) {
      const frame = unpackImageWithMetadata(event.data);
      if (frame?.metadata?.turbo_live?.session === this.graph?.session) this.display(frame);
      return;
    }
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    const data = message.data ?? {};
    if (message.type === "status" && data.status?.exec_info?.queue_remaining === 0) this.queueEmpty();
    if (!RUN_EVENTS.has(message.type) || !data.prompt_id) return;
    if (this.runs.has(data.prompt_id)) { this.onRunMessage(message); return; }
    // The two sockets race: a run's first messages here may come before its "run" message.
    const now = performance.now();
    for (const [id, held] of this.early) if (now - held[0].at > EARLY_MS) this.early.delete(id);
    if (!this.early.has(data.prompt_id)) this.early.set(data.prompt_id, []);
    this.early.get(data.prompt_id).push({ ...message, at: now });
  }

  onRunMessage(message) {
    const data = message.data ?? {}, run = this.runs.get(data.prompt_id);
    if (!run || !this.running) return;
    if (message.type === "execution_error") {
      this.stop(`${data.node_type}: ${data.exception_message}\nLive stopped.`);
    } else if (message.type === "execution_interrupted") {
      this.stop("The prompt was interrupted (Cancel): Live stopped.");
    } else if (message.type === "execution_success" || (message.type === "executing" && data.node == null)) {
      this.runStarted(run);         // (a run taken for replaced did run)
      this.runEnded(run);
    } else {
      this.runStarted(run);
    }
  }

  // Nothing is queued or running in ComfyUI: no run of ours is in flight (but one the server has just
  // queued may have been announced before this status was sent).
  queueEmpty() {
    const now = performance.now();
    for (const run of this.runs.values()) {
      if (run.endedAt == null && now - run.notedAt > 1000) this.runEnded(run, false);
    }
  }

  // Runs that left ComfyUI's queue unrun (someone cleared it) send nothing: ask the queue.
  async checkQueue() {
    const asked = performance.now();
    if (this.checkingQueue || asked - this.checkedQueueAt < STALL_MS) return;
    this.checkingQueue = true;
    try {
      const queue = await (await api.fetchApi("/queue")).json();
      const queued = new Set([...queue.queue_running ?? [], ...queue.queue_pending ?? []].map((item) => item[1]));
      for (const [id, run] of this.runs) {
        if (run.endedAt == null && run.notedAt < asked && !queued.has(id)) this.runEnded(run, false);
      }
    } catch {
      // the next stall asks again; a server that went away stops Live by itself
    } finally {
      this.checkingQueue = false;
      this.checkedQueueAt = performance.now();
    }
  }

  // The panel never waits forever: a frame no run takes counts as consumed, so a fresh one goes (the
  // server recovers a run that vanished by itself), and a run that never ends is looked for in the queue.
  watchdog(now) {
    if (this.request && now - this.request.sentAt > ANSWER_MS) {
      if (this.request.kind === "graph") {
        this.stop("The server did not answer the graph. Live stopped.");
        return;
      }
      this.say("The server did not answer the new values; they go again when they change.");
      Object.assign(this, { refusedKey: this.request.key, request: null, refusalShown: true });
    }
    // A frame waits legitimately while a run of ours executes (the next run takes it): count from its end.
    const stall = Math.max(STALL_MS, 4 * (this.expectedMs + this.leadMs));
    const idle = !this.executing || this.executing.endedAt != null;
    if (this.waiting && idle && now - Math.max(this.waiting.sentAt, this.lastEndedAt) > stall) {
      this.waiting = null;
      this.stale++;
      this.checkQueue();
    }
    for (const run of this.runs.values()) {
      if (run.endedAt == null && now - (run.startedAt ?? run.notedAt) > stall) { this.checkQueue(); break; }
    }
  }

  // -- edits -----------------------------------------------------------------------------------
  noteEdit() {
    if (!this.running) return;
    this.edits++;
    this.editedAt ??= performance.now();
    this.syncGraph();
  }

  painted() {
    this.paintDirty = true;
    if (this.running) this.capture();
  }

  // The graph as it is now against what the server holds: nothing, the changed values, or the graph. One
  // request waits for its answer at a time; edits made meanwhile go with the next.
  async syncGraph() {
    if (!this.running || !this.socket || this.request || this.syncing) return;
    this.syncing = true;
    const edits = this.edits;
    // Edits made from here on may not be in the prompt read: they stay waiting for the next sync.
    const settle = () => { this.editedAt = this.edits === edits ? null : performance.now(); };
    try {
      this.syncWithGraph();
      const { output } = await app.graphToPrompt();
      if (!this.running || !this.socket || this.request) return;
      const key = JSON.stringify(output);
      if (key === this.ackedKey || key === this.refusedKey) { settle(); return; }
      const change = promptChange(this.acked, output);
      if (change.kind === "same") { Object.assign(this, { acked: output, ackedKey: key }); settle(); return; }
      this.request = { kind: change.kind, prompt: output, key, editedAt: this.editedAt ?? performance.now(),
        sentAt: performance.now() };
      settle();
      if (change.kind === "set") this.sets++;
      else this.graphs++;
      this.socket.send(JSON.stringify(change.kind === "set" ? { type: "set", values: change.values }
        : { type: "graph", prompt: output }));
    } catch (error) {
      this.stop(`Could not turn the graph into a prompt (${error?.message ?? error}). Live stopped.`);
    } finally {
      this.syncing = false;
      if (this.edits !== edits) setTimeout(() => this.syncGraph(), 0);     // an edit came while reading
    }
  }

  // -- the loop ------------------------------------------------------------------------------
  fpsCap() {
    return Math.min(120, Math.max(1, Number(this.ui.fps.value) || 30));
  }

  tick() {
    if (!this.running) return;
    clearTimeout(this.timer);
    this.bindComfySocket();
    this.timer = setTimeout(() => this.tick(), 1000 / this.fpsCap());
    this.watchdog(performance.now());
    this.syncGraph();
    this.capture();
    this.render();
  }

  // Frames are captured when a run will use them: at once when none of ours executes, else shortly before
  // the running one should end (its expected time less the time a frame takes to reach the server, decoded),
  // so the next run starts on a fresh frame that is already there. One frame waits at most: none is
  // encoded, sent and decoded only to be dropped.
  wantsFrame(now) {
    if (this.source === "prompt" || this.encoding || !this.socket || this.waiting) return false;
    if (now - this.lastCaptureAt < 1000 / this.fpsCap()) return false;
    const run = this.executing;
    return !run || run.endedAt != null || now >= run.startedAt + this.expectedMs - this.leadMs;
  }

  capture() {
    const now = performance.now();
    if (!this.running || !this.wantsFrame(now)) return;
    if (this.socket.bufferedAmount > 1 << 20) { this.clientDropped++; return; }     // the network is behind
    if (this.source === "paint" && !this.paintDirty) return;
    this.lastCaptureAt = now;
    const { width, height } = this.graph;
    let canvas;
    if (this.source === "paint") {
      this.paintDirty = false;
      canvas = this.ui.paint;
    } else {
      const video = this.ui.video;
      if (!video.videoWidth) return;
      canvas = this.frameCanvas ??= document.createElement("canvas");
      Object.assign(canvas, { width, height });
      const scale = Math.max(width / video.videoWidth, height / video.videoHeight);
      const w = width / scale, h = height / scale;
      canvas.getContext("2d").drawImage(video, (video.videoWidth - w) / 2, (video.videoHeight - h) / 2, w, h,
        0, 0, width, height);
      if (this.similarToLastSent(canvas)) { this.skipped++; return; }
    }
    this.encoding = true;
    canvas.toBlob(async (blob) => {
      try {
        const bytes = blob && await blob.arrayBuffer();
        if (!bytes || !this.running || this.socket?.readyState !== WebSocket.OPEN) return;   // stopped meanwhile
        const frameId = ++this.frameId;
        this.captured.set(frameId, now);
        if (this.captured.size > 512) this.captured.delete(this.captured.keys().next().value);
        this.waiting = { id: frameId, sentAt: performance.now() };
        this.socket.send(packFrame({ frame_id: frameId, format: "jpeg" }, bytes));
      } finally {
        this.encoding = false;
      }
    }, "image/jpeg", 0.9);
  }

  // StreamDiffusion's stochastic similarity filter on a 32x32 thumbnail, pixels centred on 0.
  similarToLastSent(canvas) {
    if (!this.ui.skip.checked) return false;
    const thumb = this.thumbCanvas ??= Object.assign(document.createElement("canvas"), { width: 32, height: 32 });
    const ctx = thumb.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(canvas, 0, 0, 32, 32);
    const data = ctx.getImageData(0, 0, 32, 32).data, pixels = new Float32Array(32 * 32 * 3);
    for (let i = 0, j = 0; i < data.length; i += 4) {
      pixels[j++] = data[i] / 127.5 - 1; pixels[j++] = data[i + 1] / 127.5 - 1; pixels[j++] = data[i + 2] / 127.5 - 1;
    }
    if (this.lastSent) {
      const p = skipProbability(cosine(this.lastSent, pixels), Number(this.ui.threshold.value));
      if (p > Math.random() && this.skipsInARow < MAX_SKIPS_IN_A_ROW) { this.skipsInARow++; return true; }
    }
    this.skipsInARow = 0;
    this.lastSent = pixels;
    return false;
  }

  // -- output ----------------------------------------------------------------------------------
  // Outputs may come faster than the <img> loads them: a picture still loading when the next comes is
  // dropped (its URL revoked at once), so two object URLs live at most, the one shown and the one loading.
  display({ metadata, blob }) {
    const now = performance.now(), live = metadata.turbo_live;
    const url = URL.createObjectURL(blob), superseded = this.loadingUrl;
    this.objectUrls.add(url);
    this.loadingUrl = url;
    this.ui.output.src = url;
    if (superseded) this.revoke(superseded);
    const origins = [live.fresh_frame ? this.captured.get(live.frame_id) : null,
      this.promptInputTime.get(metadata.prompt_id)].filter((t) => t != null);
    if (origins.length) {
      this.latencies.push(now - Math.max(...origins));
      if (this.latencies.length > LATENCY_WINDOW) this.latencies.shift();
    }
    this.promptInputTime.delete(metadata.prompt_id);
    if (this.promptInputTime.size > KEPT_RUNS) this.promptInputTime.delete(this.promptInputTime.keys().next().value);
    this.shown.push(now);
    while (this.shown.length && now - this.shown[0] > FPS_WINDOW_MS) this.shown.shift();
    if (live.frames) this.serverFrames = live.frames;
    this.outputs++;
    this.lastMetadata = metadata;
  }

  outputSettled(loaded) {
    const url = this.ui.output.src;
    if (url !== this.loadingUrl) return;          // a load that was superseded (its URL revoked already)
    this.loadingUrl = null;
    if (this.shownUrl) this.revoke(this.shownUrl);
    this.shownUrl = loaded ? url : null;
    if (!loaded) this.revoke(url);
  }

  revoke(url) {
    URL.revokeObjectURL(url);
    this.objectUrls.delete(url);
  }

  /** Whether the web UI's own connection to ComfyUI is open (it reconnects by itself after a restart). */
  connected() {
    return api.socket?.readyState === WebSocket.OPEN;
  }

  stats() {
    const now = performance.now(), recent = this.shown.filter((t) => now - t <= FPS_WINDOW_MS);
    const span = recent.length > 1 ? (recent.at(-1) - recent[0]) / 1000 : 0;
    return {
      running: this.running, outputs: this.outputs, submitted: this.submitted, ran: this.ran, inFlight: this.inFlight(),
      editWaiting: this.editedAt !== null || this.request !== null,
      fps: span > 0 ? (recent.length - 1) / span : 0,
      p50: percentile(this.latencies, 50), p95: percentile(this.latencies, 95),
      dropped: (this.serverFrames?.dropped ?? 0) + this.clientDropped, skipped: this.skipped, stale: this.stale,
      frameId: this.lastMetadata?.turbo_live?.frame_id ?? null, promptId: this.lastMetadata?.prompt_id ?? null,
      lastRun: this.lastRun, frameWaiting: this.waiting !== null, graphs: this.graphs, sets: this.sets,
      objectUrls: this.objectUrls.size,
    };
  }

  render() {
    const s = this.stats(), ms = (v) => (v == null ? "–" : `${Math.round(v)} ms`);
    this.ui.stats.textContent = `${s.fps.toFixed(1)} fps · latency p50 ${ms(s.p50)} · p95 ${ms(s.p95)} · ` +
      `dropped ${s.dropped} · skipped ${s.skipped}`;
  }
}

const live = new TurboLive();
window.__turboLive = live;        // for tests and the console

function graphHasLiveOutput() {
  return nodesOfType(OUTPUT_NODE).length > 0;
}

app.registerExtension({
  name: "comfy-turbo.live",
  commands: [{ id: "comfy-turbo.live.panel", label: "Turbo Live: show the panel", icon: "pi pi-video",
    function: () => live.show() }],
  async setup() {
    window.addEventListener("pagehide", () => live.stop());
    api.addEventListener("reconnecting", () => live.running && live.stop("The server went away: Live stopped."));
  },
  async afterConfigureGraph() {
    if (graphHasLiveOutput()) live.show();
    else live.hide();
  },
  async nodeCreated(node) {
    if (node.comfyClass === OUTPUT_NODE && !app.configuringGraph) setTimeout(() => live.show(), 0);
  },
});
