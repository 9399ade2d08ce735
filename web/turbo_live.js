// Turbo Live: the web UI's live loop for graphs that hold a Turbo Live Output node.
//
// Press Live and the panel streams an input into the graph and shows each output as it arrives:
//   - webcam (getUserMedia) or a paint canvas, as JPEG frames on the pack's websocket
//     (/comfy-turbo/live/<session>/ws), newest frame wins;
//   - prompt-as-you-type: any edit to the graph (the panel's prompt box, a widget, a LoRA strength)
//     re-queues it, and edits made while a frame runs fold into one follow-up.
// Scheduling: one prompt on the server at a time, the newest input waiting in the tab, an fps cap,
// and StreamDiffusion's stochastic similarity filter for camera frames. Output frames come back on
// ComfyUI's own websocket as binary message type 4 (JPEG/WebP + metadata), never through disk.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/comfy-turbo/live";
const OUTPUT_NODE = "TurboLiveOutput";
const INPUT_NODE = "TurboLiveInput";
const TEXT_NODES = ["TurboTextEncode", "CLIPTextEncode"];
const PREVIEW_IMAGE_WITH_METADATA = 4;
const MAX_SKIPS_IN_A_ROW = 10;            // StreamDiffusion's SimilarImageFilter default
const LATENCY_WINDOW = 120;            // latency percentiles over the last 120 frames
const FPS_WINDOW_MS = 5000;            // fps over the frames of the last 5 seconds

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
    this.reset();
  }

  reset() {
    this.inFlight = null;           // prompt id on the server
    this.promptInputTime = new Map();
    this.promptFrame = new Map();
    this.lastPromptKey = null;
    this.lastSubmitAt = 0;
    this.editedAt = null;           // first edit not yet in a submitted prompt
    this.edits = 0;                 // edits counted, to tell those made while a prompt was being queued
    this.frameId = 0;               // the newest frame sent
    this.captured = new Map();      // frame id -> capture time
    this.newestAcked = 0;
    this.consumed = 0;              // every frame up to this one was used, overtaken or refused
    this.promptsWithOutput = new Set();
    this.encoding = false;
    this.shown = [];                // times frames were shown
    this.latencies = [];
    this.serverFrames = null;
    this.skipped = 0;
    this.skipsInARow = 0;
    this.clientDropped = 0;
    this.lastSent = null;           // downsampled pixels of the last frame sent
    this.lastCaptureAt = -Infinity;
    this.submittedAt = 0;
    this.expectedMs = 0;            // how long a prompt takes, queue to done (moving average)
    this.leadMs = 5;                // how long a frame takes to reach the server, decoded (moving average)
    this.paintDirty = true;
    this.outputs = 0;
    this.submitted = 0;
    this.held = [];                 // ComfyUI messages that arrived while a prompt was being queued
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
      this.paintDirty = true;
      this.noteEdit();
    };
    canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); last = point(e); stroke(last, last); });
    canvas.addEventListener("pointermove", (e) => { if (last) { const p = point(e); stroke(last, p); last = p; } });
    const end = () => { last = null; };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    this.ui.clear.addEventListener("click", () => {
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, canvas.width, canvas.height);
      this.paintDirty = true;
      this.noteEdit();
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
    this.tick();
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
        if (reply.type === "attached") { attached = true; this.socket = socket; resolve(); }
        else if (reply.type === "frame") this.onAck(reply);
        else if (reply.type === "error") {
          if (!attached) refusal = reply.message;
          else {
            this.say(reply.message);
            if (reply.frame_id != null) this.consumed = Math.max(this.consumed, reply.frame_id);
          }
        }
      };
      socket.onclose = (event) => {
        if (!attached) reject(new Error(refusal ?? `The live connection was refused (code ${event.code}).`));
        else if (this.running) this.stop("The connection to the server closed (was it restarted?). Live stopped.");
      };
    });
  }

  // ComfyUI's own websocket: prompt status, and our output frames (binary type 4).
  bindComfySocket() {
    if (this.comfySocket === api.socket) return;
    this.comfySocket = api.socket;
    api.socket?.addEventListener("message", (event) => this.onComfyMessage(event));
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
    this.capture();
    this.maybeSubmit();
    this.render();
  }

  // A frame was sent that no prompt has taken yet (nor will the running one).
  frameWaiting() {
    return this.frameId > (this.inFlight ? (this.promptFrame.get(this.inFlight) ?? 0) : this.consumed);
  }

  // Frames are captured when the loop will use them: at once when no prompt runs, else shortly before the
  // running one should end (its expected time less the time a frame takes to reach the server, decoded), so
  // the next prompt starts on a fresh frame that is already there. One frame waits at most: none is
  // encoded, sent and decoded only to be dropped.
  wantsFrame(now) {
    if (this.source === "prompt" || this.encoding || !this.socket || this.frameWaiting()) return false;
    if (now - this.lastCaptureAt < 1000 / this.fpsCap()) return false;
    return !this.inFlight || now >= this.submittedAt + this.expectedMs - this.leadMs;
  }

  noteEdit() {
    if (!this.running) return;
    this.edits++;
    if (this.editedAt === null) this.editedAt = performance.now();
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
        this.socket.send(packFrame({ frame_id: frameId, format: "jpeg" }, bytes));
      } finally {
        this.encoding = false;
      }
      if (!this.inFlight) this.maybeSubmit();       // the prompt goes with the frame: decoding overlaps it
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

  onAck(reply) {
    const sentAt = this.captured.get(reply.frame_id);
    if (sentAt != null) this.leadMs = 0.8 * this.leadMs + 0.2 * 1.5 * (performance.now() - sentAt);
    this.newestAcked = Math.max(this.newestAcked, reply.frame_id);
    if (!reply.accepted) this.consumed = Math.max(this.consumed, reply.frame_id);    // overtaken on the server
    if (reply.frames) this.serverFrames = reply.frames;
  }

  async maybeSubmit() {
    if (!this.running || this.inFlight || this.submitting) return;
    if (performance.now() - this.lastSubmitAt < 1000 / Math.max(1, Number(this.ui.fps.value) || 30)) return;
    if (this.source !== "prompt" && this.newestAcked === 0) return;      // nothing for Turbo Live Input yet
    this.submitting = true;
    const edits = this.edits, editedAt = this.editedAt, frameId = this.frameId;
    // Edits made from here on are not in this prompt: they stay waiting for the next one.
    const settle = () => { this.editedAt = this.edits === edits ? null : performance.now(); };
    try {
      this.syncWithGraph();
      const { output } = await app.graphToPrompt();
      const key = JSON.stringify(output);
      // A prompt goes as soon as its frame is sent: the server decodes the frame while it validates the
      // prompt, and the prompt waits for the frame.
      const frameWaiting = this.source !== "prompt" && frameId > this.consumed;
      if (key === this.lastPromptKey && !frameWaiting) { settle(); return; }
      const response = await api.fetchApi("/prompt", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ client_id: api.clientId, prompt: output }) });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) {
        const details = Object.values(body.node_errors ?? {}).flatMap((e) => e.errors ?? [])
          .map((e) => `${e.message}: ${e.details}`).join("\n");
        this.stop(`ComfyUI refused the graph: ${body.error?.message ?? response.status}\n${details}\nLive stopped.`);
        return;
      }
      this.inFlight = body.prompt_id;
      this.submittedAt = performance.now();
      clearTimeout(this.presend);
      this.presend = setTimeout(() => this.capture(), Math.max(0, this.expectedMs - this.leadMs));
      this.submitted++;
      this.lastPromptKey = key;
      this.lastSubmitAt = performance.now();
      this.promptInputTime.set(body.prompt_id, editedAt);
      this.promptFrame.set(body.prompt_id, frameId);
      settle();
    } catch (error) {
      this.stop(`Could not reach ComfyUI to queue the graph (${error?.message ?? error}): was the server stopped? ` +
        "Live stopped.");
    } finally {
      this.submitting = false;
      // A fast (or fully cached) prompt can finish before /prompt's answer is read: its messages were held.
      for (const event of this.held.splice(0)) this.onComfyMessage(event);
    }
  }

  onComfyMessage(event) {
    if (!this.running) return;
    if (this.submitting) { this.held.push(event); return; }
    if (event.data instanceof ArrayBuffer) {
      const frame = unpackImageWithMetadata(event.data);
      if (frame?.metadata?.turbo_live?.session === this.graph?.session) this.display(frame);
      return;
    }
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    const data = message.data ?? {};
    if (!this.inFlight || data.prompt_id !== this.inFlight) return;
    if (message.type === "execution_error") {
      this.stop(`${data.node_type}: ${data.exception_message}\nLive stopped.`);
    } else if (message.type === "execution_interrupted") {
      this.stop("The prompt was interrupted (Cancel): Live stopped.");
    } else if (message.type === "executing" && data.node == null) {
      if (!this.promptsWithOutput.delete(this.inFlight)) {
        // Nothing new ran (all cached): the frames it was queued after that the server has acknowledged by
        // now were used already; one not acknowledged yet may still come.
        this.consumed = Math.max(this.consumed, Math.min(this.promptFrame.get(this.inFlight) ?? 0, this.newestAcked));
      }
      this.promptFrame.delete(this.inFlight);
      this.inFlight = null;
      const took = performance.now() - this.submittedAt;
      this.expectedMs = this.expectedMs ? 0.8 * this.expectedMs + 0.2 * took : took;
      this.capture();                    // no frame was sent ahead: capture one now
      this.maybeSubmit();                // the waiting input goes now, not at the next tick
    }
  }

  display({ metadata, blob }) {
    const now = performance.now(), live = metadata.turbo_live;
    const url = URL.createObjectURL(blob), img = this.ui.output, previous = img.dataset.url;
    img.onload = () => previous && URL.revokeObjectURL(previous);
    img.dataset.url = url;
    img.src = url;
    if (live.frame_id != null) this.consumed = Math.max(this.consumed, live.frame_id);
    this.promptsWithOutput.add(metadata.prompt_id);
    const origins = [live.fresh_frame ? this.captured.get(live.frame_id) : null,
      this.promptInputTime.get(metadata.prompt_id)].filter((t) => t != null);
    if (origins.length) {
      this.latencies.push(now - Math.max(...origins));
      if (this.latencies.length > LATENCY_WINDOW) this.latencies.shift();
    }
    this.promptInputTime.delete(metadata.prompt_id);
    this.shown.push(now);
    while (this.shown.length && now - this.shown[0] > FPS_WINDOW_MS) this.shown.shift();
    if (live.frames) this.serverFrames = live.frames;
    this.outputs++;
    this.lastMetadata = metadata;
  }

  /** Whether the web UI's own connection to ComfyUI is open (it reconnects by itself after a restart). */
  connected() {
    return api.socket?.readyState === WebSocket.OPEN;
  }

  stats() {
    const now = performance.now(), recent = this.shown.filter((t) => now - t <= FPS_WINDOW_MS);
    const span = recent.length > 1 ? (recent.at(-1) - recent[0]) / 1000 : 0;
    return {
      running: this.running, outputs: this.outputs, submitted: this.submitted, inFlight: !!this.inFlight,
      editWaiting: this.editedAt !== null,
      fps: span > 0 ? (recent.length - 1) / span : 0,
      p50: percentile(this.latencies, 50), p95: percentile(this.latencies, 95),
      dropped: (this.serverFrames?.dropped ?? 0) + this.clientDropped, skipped: this.skipped,
      frameId: this.lastMetadata?.turbo_live?.frame_id ?? null, promptId: this.lastMetadata?.prompt_id ?? null,
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
